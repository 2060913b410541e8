"""The built-in local API: an OpenAI/AIML-compatible ``/v1/chat/completions`` on 127.0.0.1.

It exists so demos, tests, benchmarks and users' dry runs exercise the real HTTP path (client, retries,
rate limits, ledger) without paying: answers are deterministic functions of the messages, usage and
``meta.usage`` follow the AIML API's shape, and every failure a provider can produce (429 with headers,
5xx, dropped connections, hangs, broken or off-schema JSON, refusals, truncation) can be switched on at
a chosen rate. It has to keep up with the pipeline at thousands of requests per second on one core, so
the request path avoids anything heavier than one ``orjson`` parse, one regex pass and one hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import math
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

#: The model id the AIML API documents; listed by ``/v1/models``. Any other name is accepted too.
API_MODEL_ID = "bytedance/dola-seed-2-0-lite"
#: Requests naming this model get 404, so tests can reach the "every row would fail" path.
MISSING_MODEL = "missing-model"
#: AIML credits per dollar, from the reference response (6653 credits = $0.0033265).
CREDITS_PER_USD = 2_000_000
PER_MESSAGE_TOKENS = 4
#: The chat template's own tokens, fitted to the reference response: "Hi! What do you think about
#: mankind?" (9 tokens) was billed as 57 prompt tokens, so 57 - 9 - 4 (one message) = 44 per request.
PRIMING_TOKENS = 44
IMAGE_TOKENS = 85
VIDEO_TOKENS = 200
MAX_BODY_BYTES = 64 * 1024 * 1024
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
STATUS_MARKER = re.compile(r"\[\[status:(\d{3})\]\]")
REFUSE_MARKER = "[[refuse]]"

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_EFFORTS = {"low": 3, "medium": 8, "high": 20}  # reasoning sentences per effort
_HTTP_URL = re.compile(r"https?://[^\s/?#]+\S*\Z", re.IGNORECASE)
_DATA_HEAD = {
    "image": re.compile(r"data:image/(?:png|jpeg|jpg|gif|webp);base64\Z", re.IGNORECASE),
    "video": re.compile(r"data:video/[a-z0-9.+-]+;base64\Z", re.IGNORECASE),
}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_LABELS = ("positive", "negative", "neutral")
_SENTENCES = (
    "The wording states its point plainly.",
    "Tone and word choice point the same way.",
    "Most of the cues agree with this reading.",
    "A few phrases are mixed, but the overall lean is clear.",
    "The key sentence carries the judgement.",
    "Nothing in the text contradicts this reading.",
    "The text is short but unambiguous.",
    "The surrounding context supports this label.",
)
_THOUGHTS = (
    "Let me read the request carefully before answering.",
    "The user wants a short, direct answer.",
    "I should look at the tone of the key sentences first.",
    "Some words lean one way, a few lean the other.",
    "Weighing them, one reading is clearly stronger.",
    "I should not overthink the edge cases here.",
    "The instructions ask for a compact format, so I will keep it brief.",
    "Let me double-check that nothing contradicts this.",
)
_REFUSAL = "I'm sorry, but I can't help with that request."
_WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper")
_SCHEMA_BUCKETS = 16
_SCHEMA_CACHE_MAX = 4096
_MAX_DEPTH = 6  # below this, generated documents stop optional nesting so recursive $refs terminate
_HARD_DEPTH = 40
_JSON = "application/json"


@dataclass
class ServerConfig:
    """How the local API behaves; mutable so a test can change fault rates between runs."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 2.0
    fail_5xx_rate: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    invalid_json_rate: float = 0.0
    require_key: str | None = None
    input_per_million: float = 0.25
    output_per_million: float = 2.0
    seed: int = 0
    model_name: str = "seed-2-0-lite-local"


class _BadRequest(Exception):
    """A 400 found while reading the body; raised deep in validation, answered once at the top."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class _Parsed:
    """What the answer depends on, gathered in the single validation pass."""

    prompt_tokens: int
    digest: bytes  # hash of roles, texts and media: the seed of the deterministic answer
    last_user: str
    media: list[str]
    max_tokens: int | None
    effort: str | None
    fmt: str  # "text" | "json_object" | "json_schema"
    schema: dict[str, Any] | None


@dataclass(slots=True)
class _Answer:
    content: str | None
    reasoning: str | None
    refusal: str | None = None
    finish_reason: str = "stop"
    content_tokens: int = 0
    reasoning_tokens: int = 0


# ---------------------------------------------------------------- validation


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise _BadRequest(f"Invalid '{key}': {value!r}; expected a number between {lo:g} and {hi:g}.", key)


def _media_key(url: Any, kind: str, param: str) -> str:
    """Echo id of one image/video: from the decoded bytes for data URIs, so tests can match the file."""
    if not isinstance(url, str):
        raise _BadRequest(f"Invalid '{param}': expected a string URL.", param)
    if url[:5].lower() == "data:":
        head, sep, payload = url.partition(",")
        if not sep or not _DATA_HEAD[kind].match(head):
            raise _BadRequest(
                f"Invalid '{param}': malformed data URI; expected data:{kind}/<type>;base64,<data>"
                + (" with type png, jpeg, gif or webp." if kind == "image" else "."),
                param,
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            raise _BadRequest(f"Invalid '{param}': the data URI does not hold valid base64 {kind} data.", param)
        return hashlib.sha256(data).hexdigest()[:12]
    if _HTTP_URL.match(url):
        return hashlib.sha256(url.encode()).hexdigest()[:12]
    raise _BadRequest(f"Invalid '{param}': expected an http(s) URL or a base64 data URI.", param)


def _parse(body: Any) -> _Parsed:
    """Validate like the real endpoint and collect everything the answer needs in one pass."""
    if not isinstance(body, dict):
        raise _BadRequest("We could not parse the JSON body of your request: expected a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("You must provide a model parameter (a string).", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array.", "messages")
    texts: list[str] = []
    keys: list[str] = []
    media: list[str] = []
    extra = PRIMING_TOKENS
    last_user = ""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRequest(f"Invalid 'messages[{i}]': expected an object.", f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _BadRequest(
                f"Invalid value for 'messages[{i}].role': {role!r}. "
                "Supported values are: 'system', 'user', 'assistant' and 'tool'.",
                f"messages[{i}].role",
            )
        extra += PER_MESSAGE_TOKENS
        keys.append(role)
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            if role == "user":
                last_user = content
        elif isinstance(content, list):
            own: list[str] = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise _BadRequest(f"Invalid '{where}': expected an object.", where)
                ptype = part.get("type")
                if ptype == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise _BadRequest(f"Invalid '{where}.text': expected a string.", f"{where}.text")
                    own.append(text)
                elif ptype in ("image_url", "video_url"):
                    kind = ptype[:5]
                    spec = part.get(ptype)
                    if not isinstance(spec, dict):
                        raise _BadRequest(f"Invalid '{where}.{ptype}': expected an object.", f"{where}.{ptype}")
                    key = _media_key(spec.get("url"), kind, f"{where}.{ptype}.url")
                    detail = spec.get("detail")
                    if kind == "image" and detail is not None and detail not in ("low", "high", "auto"):
                        raise _BadRequest(
                            f"Invalid '{where}.image_url.detail': {detail!r}; expected 'low', 'high' or 'auto'.",
                            f"{where}.image_url.detail",
                        )
                    token = f"[{kind}:{key}]"
                    media.append(token)
                    keys.append(token)
                    extra += IMAGE_TOKENS if kind == "image" else VIDEO_TOKENS
                elif ptype == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
                    own.append(part["refusal"])
                else:
                    raise _BadRequest(
                        f"Invalid value for '{where}.type': {ptype!r}. "
                        "Supported values are: 'text', 'image_url' and 'video_url'.",
                        f"{where}.type",
                    )
            texts.extend(own)
            if role == "user":
                last_user = "\n".join(own)
        elif not (content is None and role == "assistant" and msg.get("tool_calls")):
            raise _BadRequest(
                f"Invalid 'messages[{i}].content': expected a string or an array of content parts.",
                f"messages[{i}].content",
            )

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None:
        if type(max_tokens) not in (int, float) or max_tokens < 1 or max_tokens != int(max_tokens):
            raise _BadRequest(f"Invalid 'max_tokens': {max_tokens!r}; expected an integer >= 1.", "max_tokens")
        max_tokens = int(max_tokens)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.01, 1.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or seed < 1):
        raise _BadRequest(f"Invalid 'seed': {seed!r}; expected an integer >= 1.", "seed")
    effort = body.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort not in _EFFORTS):
        raise _BadRequest(
            f"Invalid 'reasoning_effort': {effort!r}; expected 'low', 'medium' or 'high'.", "reasoning_effort"
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _BadRequest("Invalid 'stream': expected a boolean.", "stream")
    if stream:
        raise _BadRequest("'stream': true is not supported by the seedbatch local API.", "stream")
    fmt, schema = _response_format(body.get("response_format"))

    joined = "\n".join(texts)
    prompt_tokens = len(TOKEN_RE.findall(joined)) + extra
    digest = hashlib.sha256("\x1f".join(keys).encode() + b"\x1e" + joined.encode()).digest()
    return _Parsed(prompt_tokens, digest, last_user, media, max_tokens, effort, fmt, schema)


def _response_format(rf: Any) -> tuple[str, dict[str, Any] | None]:
    if rf is None:
        return "text", None
    param = "response_format"
    if not isinstance(rf, dict):
        raise _BadRequest("Invalid 'response_format': expected an object.", param)
    kind = rf.get("type")
    if kind == "text":
        return "text", None
    if kind == "json_object":
        schema = rf.get("schema")  # llama.cpp's dialect: a schema riding on json_object
        if schema is not None and not isinstance(schema, dict):
            raise _BadRequest("Invalid 'response_format.schema': expected an object.", f"{param}.schema")
        return ("json_schema", schema) if schema is not None else ("json_object", None)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _BadRequest("Missing required parameter: 'response_format.json_schema'.", f"{param}.json_schema")
        name = js.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise _BadRequest(
                "Invalid 'response_format.json_schema.name': expected 1-64 characters of a-z, A-Z, 0-9, _ or -.",
                f"{param}.json_schema.name",
            )
        schema = js.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise _BadRequest(
                "Invalid 'response_format.json_schema.schema': expected an object.", f"{param}.json_schema.schema"
            )
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _BadRequest(
                "Invalid 'response_format.json_schema.strict': expected a boolean.", f"{param}.json_schema.strict"
            )
        unknown = set(js) - {"name", "schema", "strict", "description"}
        if unknown:
            raise _BadRequest(
                f"Unknown parameter: 'response_format.json_schema.{sorted(unknown)[0]}'.", f"{param}.json_schema"
            )
        return ("json_schema", schema) if schema is not None else ("json_object", None)
    raise _BadRequest(
        f"Invalid value for 'response_format.type': {kind!r}. "
        "Supported values are: 'text', 'json_object' and 'json_schema'.",
        f"{param}.type",
    )


# ---------------------------------------------------------------- schema documents


class _DocGen:
    """Builds one document valid against a JSON Schema subset, deterministically from a seed.

    Covers what structured-output schemas use in practice (objects, enums, nullable unions, $defs refs,
    bounded numbers, sized arrays, dates); keywords it cannot satisfy in general (``pattern``) are ignored.
    """

    def __init__(self, root: dict[str, Any], seed: int, media: str = "") -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.media = media  # appended to the first free-text string so media rows stay identifiable

    def ref(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for raw in ref[1:].split("/")[1:]:
            key = raw.replace("~1", "/").replace("~0", "~")
            node = node[int(key)] if isinstance(node, list) else node.get(key, {}) if isinstance(node, dict) else {}
        return node

    def gen(self, s: Any, depth: int = 0, name: str = "value") -> Any:
        if depth > _HARD_DEPTH or s is False:
            return None
        if not isinstance(s, dict):  # ``true``: anything goes
            return name
        if "$ref" in s:
            merged = {**self.ref(s["$ref"]), **{k: v for k, v in s.items() if k != "$ref"}}
            return self.gen(merged, depth, name)
        if "const" in s:
            return s["const"]
        if s.get("enum"):
            options = [v for v in s["enum"] if v is not None] or s["enum"]
            return options[self.rng.randrange(len(options))]
        if "allOf" in s:
            merged = {k: v for k, v in s.items() if k != "allOf"}
            for branch in s["allOf"]:
                sub = self.ref(branch["$ref"]) if isinstance(branch, dict) and "$ref" in branch else branch
                if isinstance(sub, dict):
                    for key, value in sub.items():
                        if key == "properties":
                            merged["properties"] = {**merged.get("properties", {}), **value}
                        elif key == "required":
                            merged["required"] = [*merged.get("required", []), *value]
                        else:
                            merged.setdefault(key, value)
            return self.gen(merged, depth, name)
        for key in ("anyOf", "oneOf"):
            if s.get(key):
                branches = s[key]
                nulls = [b for b in branches if isinstance(b, dict) and b.get("type") == "null"]
                real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
                chosen = nulls[0] if (depth >= _MAX_DEPTH and nulls) or not real else real[0]
                rest = {k: v for k, v in s.items() if k != key}
                return self.gen({**rest, **chosen} if isinstance(chosen, dict) else chosen, depth, name)
        kind = s.get("type")
        if isinstance(kind, list):
            real_types = [t for t in kind if t != "null"]
            kind = "null" if not real_types or (depth >= _MAX_DEPTH and "null" in kind) else real_types[0]
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else "string"
        if kind == "object":
            return self.obj(s, depth)
        if kind == "array":
            return self.arr(s, depth, name)
        if kind in ("integer", "number"):
            return self.num(s, kind == "integer")
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self.text(s, name)

    def obj(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = s.get("properties") or {}
        required = [r for r in s.get("required") or [] if isinstance(r, str)]
        names = list(props) if depth < _MAX_DEPTH else [p for p in props if p in required]
        out = {p: self.gen(props[p], depth + 1, p) for p in names}
        extra = s.get("additionalProperties")
        for r in required:
            if r not in out:
                out[r] = self.gen(extra if isinstance(extra, dict) else {}, depth + 1, r)
        return out

    def arr(self, s: dict[str, Any], depth: int, name: str) -> list[Any]:
        lo = int(s.get("minItems") or 0)
        hi = s.get("maxItems")
        count = lo if depth >= _MAX_DEPTH else max(lo, 2)
        if hi is not None:
            count = min(count, int(hi))
        prefix = s.get("prefixItems") or []
        items = s.get("items", {})
        out: list[Any] = []
        seen: set[bytes] = set()
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            value = self.gen(sub, depth + 1, name)
            if s.get("uniqueItems"):
                for _ in range(8):
                    key = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
                    if key not in seen:
                        break
                    value = self.gen(sub, depth + 1, f"{name} {i}")
                seen.add(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
            out.append(value)
        return out

    def num(self, s: dict[str, Any], integer: bool) -> int | float:
        lo: float = s.get("minimum", -math.inf)
        hi: float = s.get("maximum", math.inf)
        xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
        if isinstance(xlo, int | float) and not isinstance(xlo, bool):
            lo = max(lo, math.nextafter(xlo, math.inf) if not integer else math.floor(xlo) + 1)
        if isinstance(xhi, int | float) and not isinstance(xhi, bool):
            hi = min(hi, math.nextafter(xhi, -math.inf) if not integer else math.ceil(xhi) - 1)
        if math.isinf(lo) and math.isinf(hi):
            lo, hi = 0, 100
        elif math.isinf(lo):
            lo = hi - 100
        elif math.isinf(hi):
            hi = lo + 100
        step = s.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first, last = math.ceil(lo / step), math.floor(hi / step)
            for k in itertools.chain([first + self.rng.randrange(max(last - first + 1, 1))], range(first, last + 1)):
                value = int(k * step) if integer else k * step
                if value / step == int(value / step) and lo <= value <= hi:
                    return value
            return int(first * step) if integer else first * step
        if integer:
            ilo, ihi = math.ceil(lo), math.floor(hi)
            return self.rng.randint(ilo, ihi) if ilo <= ihi else ilo
        value = round(lo + (hi - lo) * (0.25 + self.rng.random() / 2), 2)
        return value if lo <= value <= hi else (lo + hi) / 2

    def text(self, s: dict[str, Any], name: str) -> str:
        r = self.rng.randrange(1 << 30)
        fmt = s.get("format")
        if fmt == "date":
            value = f"20{20 + r % 6}-{1 + r % 12:02d}-{1 + r % 28:02d}"
        elif fmt == "date-time":
            value = f"20{20 + r % 6}-{1 + r % 12:02d}-{1 + r % 28:02d}T{r % 24:02d}:{r % 60:02d}:00Z"
        elif fmt == "time":
            value = f"{r % 24:02d}:{r % 60:02d}:00Z"
        elif fmt == "email":
            value = f"{_WORDS[r % len(_WORDS)]}@example.com"
        elif fmt in ("uri", "url", "uri-reference", "iri"):
            value = f"https://example.com/{_WORDS[r % len(_WORDS)]}"
        elif fmt == "uuid":
            value = f"{r:08x}-0000-4000-8000-{r * 7919 % (1 << 48):012x}"
        elif fmt == "ipv4":
            value = f"192.0.2.{r % 254 + 1}"
        elif fmt == "hostname":
            value = f"{_WORDS[r % len(_WORDS)]}.example.com"
        else:
            value = f"{name} {_WORDS[r % len(_WORDS)]}"
            if self.media:
                value, self.media = f"{value} {self.media}", ""
        lo, hi = s.get("minLength"), s.get("maxLength")
        if isinstance(lo, int) and len(value) < lo:
            value += "x" * (lo - len(value))
        if isinstance(hi, int) and len(value) > hi:
            value = value[:hi]
        return value


def _root_object(schema: dict[str, Any]) -> dict[str, Any]:
    node: Any = schema
    for _ in range(8):
        if isinstance(node, dict) and "$ref" in node:
            node = _DocGen(schema, 0).ref(node["$ref"])
    return node if isinstance(node, dict) else {}


def _off_schema(doc: Any, schema: dict[str, Any] | None) -> Any:
    """A well-formed document that breaks the schema the way models do: a key missing, an enum off."""
    root = _root_object(schema) if schema is not None else {}
    if isinstance(doc, dict) and (schema is None or root.get("type", "object") == "object"):
        for key in root.get("required") or []:
            if key in doc:
                return {k: v for k, v in doc.items() if k != key}
        for key, prop in (root.get("properties") or {}).items():
            if isinstance(prop, dict) and "enum" in prop and key in doc:
                return {**doc, key: "not-a-listed-value"}
        return [doc]
    return {"unexpected": True}


# ---------------------------------------------------------------- rate limits


class _Bucket:
    """A continuously refilled token bucket; debt is allowed so one large request can still pass."""

    __slots__ = ("capacity", "level", "limit", "per_s", "stamp")

    def __init__(self, per_minute: float, burst_s: float) -> None:
        self.limit = per_minute
        self.per_s = per_minute / 60.0
        self.capacity = max(self.per_s * burst_s, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait(self, cost: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_s)
        self.stamp = now
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.per_s

    def headers(self, kind: str, out: dict[str, str]) -> None:
        out[f"x-ratelimit-limit-{kind}"] = str(int(self.limit))
        out[f"x-ratelimit-remaining-{kind}"] = str(max(int(self.level), 0))
        out[f"x-ratelimit-reset-{kind}"] = _duration((self.capacity - self.level) / self.per_s)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


# ---------------------------------------------------------------- server


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


class _Server:
    """Counters, limiters and handlers of one server; lives on one event loop, so no locks."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._schema_docs: dict[tuple[bytes, int], str] = {}
        self._hanging: set[asyncio.Future[None]] = set()
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.answered_ok = 0
        self.by_status: dict[int, int] = {}
        self.dropped = 0
        self.hung = 0
        self.rate_limited = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usd_spent = 0.0
        self.ok_by_hash: dict[bytes, int] = {}
        self.attempts: dict[bytes, int] = {}
        self.rng = random.Random(self.config.seed)
        self.jitter_rng = random.Random(self.config.seed + 1)
        self._limit_key: tuple[float | None, float | None, float] | None = None
        self.rpm_bucket: _Bucket | None = None
        self.tpm_bucket: _Bucket | None = None

    def snapshot(self) -> dict[str, Any]:
        ok = {digest.hex(): n for digest, n in self.ok_by_hash.items()}
        return {
            "received": self.received,
            "answered_ok": self.answered_ok,
            "by_status": dict(self.by_status),
            "dropped": self.dropped,
            "hung": self.hung,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usd_spent": self.usd_spent,
            "ok_by_body_hash": ok,
            "duplicates": sum(n - 1 for n in ok.values()),
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/_stats", self.stats_view)
        app.router.add_post("/_reset", self.reset_view)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int) -> tuple[web.AppRunner, str]:
        # handler_cancellation: a client giving up must end its hang/latency sleep, as on a real server.
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        addresses = runner.addresses
        bound = addresses[0][1] if addresses else port
        shown = f"[{host}]" if ":" in host else host
        return runner, f"http://{shown}:{bound}/v1"

    async def close(self, runner: web.AppRunner) -> None:
        for fut in list(self._hanging):
            fut.cancel()
        await runner.cleanup()

    # -- small endpoints

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.snapshot(), option=orjson.OPT_NON_STR_KEYS), content_type=_JSON)

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        data = {
            "object": "list",
            "data": [{"id": API_MODEL_ID, "object": "model", "created": 1_767_225_600, "owned_by": "seedbatch-local"}],
        }
        return web.Response(body=orjson.dumps(data), content_type=_JSON)

    def _auth(self, request: web.Request) -> web.Response | None:
        key = self.config.require_key
        if key is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return None
        message = (
            "Incorrect API key provided. Pass 'Authorization: Bearer <key>' with the key the local API "
            "was started with."
            if given
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        return _error(401, message, "invalid_request_error", code="invalid_api_key")

    # -- chat completions

    def _count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.received += 1
        cfg = self.config
        denied = self._auth(request)
        if denied is not None:
            self._count(401)
            return denied
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and body.get("model") == MISSING_MODEL:
            self._count(404)
            return _error(
                404,
                f"The model '{MISSING_MODEL}' does not exist or you do not have access to it.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        parsed: _Parsed | None = None
        bad: _BadRequest | None = None
        try:
            parsed = _parse(body)
        except _BadRequest as exc:
            bad = exc
        answer: _Answer | None = None
        limit_headers: dict[str, str] | None = None
        if cfg.rpm is not None or cfg.tpm is not None:
            if parsed is not None and cfg.tpm is not None and parsed.max_tokens is None:
                answer = self._answer(parsed)
            limit_headers, retry, which = self._limit(cfg, parsed, answer, len(raw))
            if retry:
                self._count(429)
                self.rate_limited += 1
                limit_headers["Retry-After"] = str(retry)
                return _error(
                    429,
                    f"Rate limit reached for {which} on the local API; retry after {retry}s.",
                    which,
                    None,
                    "rate_limit_exceeded",
                    limit_headers,
                )
        if parsed is None:
            assert bad is not None
            self._count(400)
            return _error(400, bad.message, "invalid_request_error", bad.param)
        last = parsed.last_user
        refuse = False
        if "[[" in last:
            match = STATUS_MARKER.search(last)
            if match and 400 <= int(match.group(1)) <= 599:
                status = int(match.group(1))
                self._count(status)
                if status == 429:
                    self.rate_limited += 1
                kind = "invalid_request_error" if status < 500 else "server_error"
                return _error(
                    status,
                    f"Simulated HTTP {status} requested by a [[status:{status}]] marker.",
                    kind,
                    headers={"Retry-After": "1"} if status in (429, 503) else None,
                )
            refuse = REFUSE_MARKER in last

        fault = self.rng.random()
        if fault < cfg.drop_rate:
            self.dropped += 1
            if request.transport is not None:
                request.transport.close()
            await self._forever()
        fault -= cfg.drop_rate
        if fault < cfg.hang_rate:
            self.hung += 1
            await self._forever()
        fault -= cfg.hang_rate
        if fault < cfg.fail_5xx_rate:
            status = (500, 502, 503)[int(fault / cfg.fail_5xx_rate * 3) % 3]
            self._count(status)
            return _error(status, "The local API simulated a server error; retry the request.", "server_error")

        if cfg.latency_ms > 0 or cfg.latency_jitter_ms > 0:
            jitter = self.jitter_rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms)
            await asyncio.sleep(max(cfg.latency_ms + jitter, 0.0) / 1000.0)

        body_hash = hashlib.sha256(raw).digest()
        if refuse:
            answer = _Answer(None, None, _REFUSAL, content_tokens=len(TOKEN_RE.findall(_REFUSAL)))
        else:
            if answer is None:
                answer = self._answer(parsed)
            if parsed.fmt != "text" and cfg.invalid_json_rate > 0:
                self._maybe_corrupt(answer, parsed, body_hash, cfg.invalid_json_rate)
            _truncate(answer, parsed.max_tokens)
        return self._ok(cfg, parsed, answer, body_hash, limit_headers)

    async def _forever(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hanging.add(fut)
        try:
            await fut
        finally:
            self._hanging.discard(fut)

    def _limit(
        self, cfg: ServerConfig, parsed: _Parsed | None, answer: _Answer | None, raw_len: int
    ) -> tuple[dict[str, str], int, str]:
        """Headers to send, whole seconds to wait (0: admitted) and which limit bit."""
        key = (cfg.rpm, cfg.tpm, cfg.burst_s)
        if key != self._limit_key:
            self._limit_key = key
            self.rpm_bucket = _Bucket(cfg.rpm, cfg.burst_s) if cfg.rpm is not None else None
            self.tpm_bucket = _Bucket(cfg.tpm, cfg.burst_s) if cfg.tpm is not None else None
        now = time.monotonic()
        headers: dict[str, str] = {}
        wait_r = wait_t = 0.0
        cost = 0
        if self.rpm_bucket is not None:
            wait_r = self.rpm_bucket.wait(1, now)
        if self.tpm_bucket is not None:
            if parsed is None:
                cost = max(raw_len // 4, 1)
            elif parsed.max_tokens is not None:
                cost = parsed.prompt_tokens + parsed.max_tokens
            else:
                assert answer is not None
                cost = parsed.prompt_tokens + answer.content_tokens + answer.reasoning_tokens
            wait_t = self.tpm_bucket.wait(cost, now)
        if wait_r == 0.0 and wait_t == 0.0:
            if self.rpm_bucket is not None:
                self.rpm_bucket.level -= 1
            if self.tpm_bucket is not None:
                self.tpm_bucket.level -= cost
        if self.rpm_bucket is not None:
            self.rpm_bucket.headers("requests", headers)
        if self.tpm_bucket is not None:
            self.tpm_bucket.headers("tokens", headers)
        if wait_r == 0.0 and wait_t == 0.0:
            return headers, 0, ""
        return headers, max(1, math.ceil(max(wait_r, wait_t))), "requests" if wait_r >= wait_t else "tokens"

    def _answer(self, parsed: _Parsed) -> _Answer:
        """The deterministic answer: a function of the messages only, never of timing or attempt."""
        h = int.from_bytes(parsed.digest[:8], "big")
        reasoning = None
        r_tokens = 0
        if parsed.effort is not None:
            n = _EFFORTS[parsed.effort]
            reasoning = " ".join(_THOUGHTS[(h + 3 * i) % len(_THOUGHTS)] for i in range(n))
            r_tokens = len(TOKEN_RE.findall(reasoning))
        label = _LABELS[h % 3]
        sentence = _SENTENCES[(h >> 8) % len(_SENTENCES)]
        media = " ".join(parsed.media)
        if parsed.fmt == "text":
            content = f"{label}. {sentence}" + (f" {media}" if media else "")
        elif parsed.fmt == "json_object":
            content = orjson.dumps({"answer": f"{label}. {sentence}" + (f" {media}" if media else "")}).decode()
        else:
            assert parsed.schema is not None
            content = self._schema_doc(parsed.schema, h, media)
        return _Answer(content, reasoning, content_tokens=len(TOKEN_RE.findall(content)), reasoning_tokens=r_tokens)

    def _schema_doc(self, schema: dict[str, Any], h: int, media: str) -> str:
        bucket = h % _SCHEMA_BUCKETS
        if media:
            return orjson.dumps(_DocGen(schema, bucket, media).gen(schema)).decode()
        key = (orjson.dumps(schema), bucket)
        doc = self._schema_docs.get(key)
        if doc is None:
            if len(self._schema_docs) >= _SCHEMA_CACHE_MAX:
                self._schema_docs.clear()
            doc = self._schema_docs[key] = orjson.dumps(_DocGen(schema, bucket).gen(schema)).decode()
        return doc

    def _maybe_corrupt(self, answer: _Answer, parsed: _Parsed, body_hash: bytes, rate: float) -> None:
        """Break the n-th answer to this body or not, decided by (body, n): a retry can come back clean."""
        attempt = self.attempts.get(body_hash, 0)
        self.attempts[body_hash] = attempt + 1
        roll = hashlib.sha256(body_hash + attempt.to_bytes(4, "big")).digest()
        if int.from_bytes(roll[:8], "big") / 2**64 >= rate:
            return
        text = answer.content or ""
        mode = roll[8] % 3
        if mode == 0:
            text = text[: max(len(text) // 2, 1)]
        elif mode == 1:
            text = orjson.dumps(_off_schema(orjson.loads(text), parsed.schema)).decode()
        else:
            text = f"```json\n{text}\n```\nLet me know if you need anything else!"
        answer.content = text
        answer.content_tokens = len(TOKEN_RE.findall(text))

    def _ok(
        self, cfg: ServerConfig, parsed: _Parsed, answer: _Answer, body_hash: bytes, headers: dict[str, str] | None
    ) -> web.Response:
        completion = answer.content_tokens + answer.reasoning_tokens
        prompt = parsed.prompt_tokens
        usd = round(prompt * cfg.input_per_million / 1e6 + completion * cfg.output_per_million / 1e6, 12)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        message["refusal"] = answer.refusal
        data = {
            "id": f"chatcmpl-local-{self._id_prefix}{next(self._ids):016x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": cfg.model_name,
            "service_tier": "default",
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
            },
            "meta": {"usage": {"credits_used": round(usd * CREDITS_PER_USD), "usd_spent": usd}},
        }
        self._count(200)
        self.answered_ok += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.usd_spent += usd
        self.ok_by_hash[body_hash] = self.ok_by_hash.get(body_hash, 0) + 1
        return web.Response(body=orjson.dumps(data), content_type=_JSON, headers=headers)


def _cut(text: str, tokens: int) -> str:
    """The prefix of ``text`` holding its first ``tokens`` tokens, as a model stopped mid-answer."""
    if tokens <= 0:
        return ""
    for i, match in enumerate(TOKEN_RE.finditer(text), 1):
        if i == tokens:
            return text[: match.end()]
    return text


def _truncate(answer: _Answer, max_tokens: int | None) -> None:
    """Apply ``max_tokens`` the way reasoning models spend it: reasoning first, then content."""
    if max_tokens is None or answer.content_tokens + answer.reasoning_tokens <= max_tokens:
        return
    answer.finish_reason = "length"
    if answer.reasoning is not None and answer.reasoning_tokens >= max_tokens:
        answer.reasoning = _cut(answer.reasoning, max_tokens)
        answer.reasoning_tokens = max_tokens
        answer.content, answer.content_tokens = "", 0
        return
    left = max_tokens - answer.reasoning_tokens
    answer.content = _cut(answer.content or "", left)
    answer.content_tokens = left


# ---------------------------------------------------------------- public entry points


@dataclass
class _Running:
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread
    base_url: str


class LocalAPI:
    """Runs the server on 127.0.0.1 in a background thread with its own event loop.

    A thread (not a process) so tests and ``run_job`` can start one in milliseconds and read its
    counters directly; benchmarks that need the pipeline's own core to themselves use ``run_server``.
    """

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server(config or ServerConfig())
        self.host = host
        self.port = port
        self._running: _Running | None = None

    @property
    def config(self) -> ServerConfig:
        return self._server.config

    @config.setter
    def config(self, value: ServerConfig) -> None:
        self._server.config = value

    @property
    def base_url(self) -> str:
        if self._running is None:
            raise RuntimeError("the local API is not running; call start() first")
        return self._running.base_url

    def start(self) -> str:
        if self._running is not None:
            return self._running.base_url
        started = threading.Event()
        box: dict[str, Any] = {}

        async def serve() -> None:
            runner, url = await self._server.start(self.host, self.port)
            stop = asyncio.Event()
            box["loop"], box["stop"], box["url"] = asyncio.get_running_loop(), stop, url
            started.set()
            try:
                await stop.wait()
            finally:
                await self._server.close(runner)

        def main() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:
                box["error"] = exc
            finally:
                started.set()

        thread = threading.Thread(target=main, name="seedbatch-localapi", daemon=True)
        thread.start()
        started.wait()
        if "error" in box:
            thread.join()
            cause: BaseException = box["error"]
            raise RuntimeError(f"the local API could not start on {self.host}:{self.port}: {cause}") from cause
        self._running = _Running(box["loop"], box["stop"], thread, box["url"])
        return self._running.base_url

    def stop(self) -> None:
        running, self._running = self._running, None
        if running is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be gone
            running.loop.call_soon_threadsafe(running.stop.set)
        running.thread.join(timeout=10)

    def __enter__(self) -> LocalAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop: the counters belong to that thread, so no lock is needed."""
        running = self._running
        if running is None:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), running.loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._on_loop(self._server.snapshot)
        return result

    def reset(self) -> None:
        self._on_loop(self._server.reset)


def run_server(
    config: ServerConfig, host: str = "127.0.0.1", port: int = 8765, ready: Callable[[str], None] | None = None
) -> None:
    """Blocking; for `seedbatch serve` and benchmarks in a separate process.

    Calls ``ready(base_url)`` once listening, so a parent can wait for the line instead of polling.
    Stops on SIGINT/SIGTERM.
    """

    async def main() -> None:
        server = _Server(config)
        runner, url = await server.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            if ready is not None:
                ready(url)
            await stop.wait()
        finally:
            await server.close(runner)

    asyncio.run(main())
