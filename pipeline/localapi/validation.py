"""Request validation for the local API: one pass that rejects what the real endpoint rejects.

A dry run against the local API is only worth something if a request the provider would answer with
400 gets a 400 here too, with the same ``param`` and a message naming the bad value; otherwise the
first real run finds the bug and pays for it. The same pass collects everything the answer depends on
(``Parsed``), because the server has to keep up with thousands of requests per second on one core:
one walk over the messages, one regex count of tokens, one hash.

Prompt tokens are counted as the provider bills them: the text's tokens plus the chat template's
overhead per request and per message and a flat charge per image or video. Those overheads are the
constants ``pipeline.requests.prompts`` uses for its pre-send estimate, imported from there so the estimate and
the bill cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.requests.prompts import (
    CHARS_PER_TOKEN,
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REQUEST,
    TOKENS_PER_VIDEO,
)

#: The chat template's own tokens per request (see ``pipeline.requests.prompts.TOKENS_PER_REQUEST``).
PRIMING_TOKENS = TOKENS_PER_REQUEST
#: The local API's tokenizer: a word or one punctuation mark is one token.
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
#: Reasoning sentences the answer carries per ``reasoning_effort``.
EFFORTS = {"low": 3, "medium": 8, "high": 20}

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_HTTP_URL = re.compile(r"https?://[^\s/?#]+\S*\Z", re.IGNORECASE)
_DATA_HEAD = {
    "image": re.compile(r"data:image/(?:png|jpeg|jpg|gif|webp);base64\Z", re.IGNORECASE),
    "video": re.compile(r"data:video/[a-z0-9.+-]+;base64\Z", re.IGNORECASE),
}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


class BadRequest(Exception):
    """A 400 found while reading the body; raised deep in validation, answered once at the top."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class Parsed:
    """What the answer depends on, gathered in the single validation pass."""

    prompt_tokens: int
    digest: bytes  # hash of roles, texts and media: the seed of the deterministic answer
    last_user: str
    media: list[str]
    max_tokens: int | None
    effort: str | None
    fmt: str  # "text" | "json_object" | "json_schema"
    schema: dict[str, Any] | None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage
    tools: dict[str, dict[str, Any]] | None = None
    """Function name → its parameters schema, in the order sent."""
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function"
    forced: str | None = None
    parallel: bool = True
    logprobs: bool = False
    """``logprobs: true``: the answer carries its tokens' log-probabilities."""
    top_logprobs: int = 0


def count_tokens(text: str) -> int:
    """Tokens of ``text`` as the local API bills them."""
    return len(TOKEN_RE.findall(text))


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> None:
    """An optional sampling parameter must be a number in the provider's range (bools are not numbers)."""
    value = body.get(key)
    if value is None:
        return
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise BadRequest(f"Invalid '{key}': {value!r}; expected a number between {lo:g} and {hi:g}.", key)


def _media_key(url: Any, kind: str, param: str) -> str:
    """Echo id of one image/video: from the decoded bytes for data URIs, so tests can match the file."""
    if not isinstance(url, str):
        raise BadRequest(f"Invalid '{param}': expected a string URL.", param)
    if url[:5].lower() == "data:":
        head, sep, payload = url.partition(",")
        if not sep or not _DATA_HEAD[kind].match(head):
            raise BadRequest(
                f"Invalid '{param}': malformed data URI; expected data:{kind}/<type>;base64,<data>"
                + (" with type png, jpeg, gif or webp." if kind == "image" else "."),
                param,
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            raise BadRequest(f"Invalid '{param}': the data URI does not hold valid base64 {kind} data.", param)
        return hashlib.sha256(data).hexdigest()[:12]
    if _HTTP_URL.match(url):
        return hashlib.sha256(url.encode()).hexdigest()[:12]
    raise BadRequest(f"Invalid '{param}': expected an http(s) URL or a base64 data URI.", param)


def parse(body: Any) -> Parsed:
    """Validate like the real endpoint and collect everything the answer needs in one pass.

    The steps run in the order the fields are checked, so a body with several mistakes gets the same
    first error every time.
    """
    if not isinstance(body, dict):
        raise BadRequest("We could not parse the JSON body of your request: expected a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter (a string).", "model")
    prompt = _messages(body.get("messages"))
    max_tokens = _max_tokens(body)
    effort = _sampling(body)
    stream, include_usage = _streaming(body)
    logprobs, top_logprobs = _logprobs(body)
    fmt, schema = response_format(body.get("response_format"))
    _pass_through(body)
    tools = _tools(body.get("tools"))
    choice, forced = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("Invalid 'parallel_tool_calls': expected a boolean.", "parallel_tool_calls")

    joined = "\n".join(prompt.texts)
    prompt_tokens = len(TOKEN_RE.findall(joined)) + prompt.extra_tokens
    if tools is not None:
        # Providers render function definitions into the prompt in a compact form, not as JSON punctuation
        # (each a token here): billed at a token per CHARS_PER_TOKEN characters of their JSON.
        prompt_tokens += int(len(orjson.dumps(body["tools"])) / CHARS_PER_TOKEN + 0.5)
    digest = hashlib.sha256("\x1f".join(prompt.keys).encode() + b"\x1e" + joined.encode()).digest()
    return Parsed(
        prompt_tokens,
        digest,
        prompt.last_user,
        prompt.media,
        max_tokens,
        effort,
        fmt,
        schema,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        tool_choice=choice,
        forced=forced,
        parallel=parallel is not False,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


@dataclass(slots=True)
class _Prompt:
    """The messages as the answer and the bill see them, gathered in one walk."""

    texts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    """Roles and media tokens in order: with the texts, what the answer's digest is taken of."""
    media: list[str] = field(default_factory=list)
    extra_tokens: int = TOKENS_PER_REQUEST
    """Billed beyond the texts' tokens: the chat template per request and per message, each image or video."""
    last_user: str = ""


def _messages(messages: Any) -> _Prompt:
    """``messages``: a non-empty array of messages with a known role and a string or an array of parts."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", "messages")
    prompt = _Prompt()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"Invalid 'messages[{i}]': expected an object.", f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise BadRequest(
                f"Invalid value for 'messages[{i}].role': {role!r}. "
                "Supported values are: 'system', 'user', 'assistant' and 'tool'.",
                f"messages[{i}].role",
            )
        prompt.extra_tokens += TOKENS_PER_MESSAGE
        prompt.keys.append(role)
        content = msg.get("content")
        if isinstance(content, str):
            prompt.texts.append(content)
            if role == "user":
                prompt.last_user = content
        elif isinstance(content, list):
            own = _content_parts(content, f"messages[{i}].content", role, prompt)
            prompt.texts.extend(own)
            if role == "user":
                prompt.last_user = "\n".join(own)
        elif not (content is None and role == "assistant" and msg.get("tool_calls")):
            raise BadRequest(
                f"Invalid 'messages[{i}].content': expected a string or an array of content parts.",
                f"messages[{i}].content",
            )
    return prompt


def _content_parts(content: list[Any], at: str, role: str, prompt: _Prompt) -> list[str]:
    """The texts of one message's content parts; its images and videos are added to ``prompt``."""
    own: list[str] = []
    for j, part in enumerate(content):
        where = f"{at}[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"Invalid '{where}': expected an object.", where)
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"Invalid '{where}.text': expected a string.", f"{where}.text")
            own.append(text)
        elif ptype in ("image_url", "video_url"):
            _media_part(part, ptype, where, prompt)
        elif ptype == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            own.append(part["refusal"])
        else:
            raise BadRequest(
                f"Invalid value for '{where}.type': {ptype!r}. "
                "Supported values are: 'text', 'image_url' and 'video_url'.",
                f"{where}.type",
            )
    return own


def _media_part(part: dict[str, Any], ptype: str, where: str, prompt: _Prompt) -> None:
    """One ``image_url`` or ``video_url`` part: its echo token, its place in the digest, its flat charge."""
    kind = ptype[:5]
    spec = part.get(ptype)
    if not isinstance(spec, dict):
        raise BadRequest(f"Invalid '{where}.{ptype}': expected an object.", f"{where}.{ptype}")
    key = _media_key(spec.get("url"), kind, f"{where}.{ptype}.url")
    detail = spec.get("detail")
    if kind == "image" and detail is not None and detail not in ("low", "high", "auto"):
        raise BadRequest(
            f"Invalid '{where}.image_url.detail': {detail!r}; expected 'low', 'high' or 'auto'.",
            f"{where}.image_url.detail",
        )
    token = f"[{kind}:{key}]"
    prompt.media.append(token)
    prompt.keys.append(token)
    prompt.extra_tokens += TOKENS_PER_IMAGE if kind == "image" else TOKENS_PER_VIDEO


def _max_tokens(body: dict[str, Any]) -> int | None:
    """``max_tokens`` (or ``max_completion_tokens``): an integer >= 1, given as an int or a whole float."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None:
        if type(max_tokens) not in (int, float) or max_tokens < 1 or max_tokens != int(max_tokens):
            raise BadRequest(f"Invalid 'max_tokens': {max_tokens!r}; expected an integer >= 1.", "max_tokens")
        max_tokens = int(max_tokens)
    return max_tokens


def _sampling(body: dict[str, Any]) -> str | None:
    """The sampling options in the provider's ranges; the ``reasoning_effort`` asked for."""
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.01, 1.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or seed < 1):
        raise BadRequest(f"Invalid 'seed': {seed!r}; expected an integer >= 1.", "seed")
    effort = body.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise BadRequest(
            f"Invalid 'reasoning_effort': {effort!r}; expected 'low', 'medium' or 'high'.", "reasoning_effort"
        )
    return effort


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the answer streams, and whether its last chunk carries the usage (``stream_options``)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("Invalid 'stream': expected a boolean.", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage"), bool):
            raise BadRequest("Invalid 'stream_options': expected {\"include_usage\": true|false}.", "stream_options")
        if not stream:
            raise BadRequest("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        include_usage = options["include_usage"]
    return bool(stream), include_usage


def _logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """``logprobs`` (a boolean) and ``top_logprobs`` (0–20, only with ``logprobs``), as OpenAI checks them."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest("Invalid 'logprobs': expected a boolean.", "logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if type(top_logprobs) is not int or not 0 <= top_logprobs <= 20:
            raise BadRequest(
                f"Invalid 'top_logprobs': {top_logprobs!r}; expected an integer between 0 and 20.", "top_logprobs"
            )
        if logprobs is not True:
            raise BadRequest("'top_logprobs' is only allowed when 'logprobs' is true.", "top_logprobs")
    return bool(logprobs), top_logprobs or 0


def _pass_through(body: dict[str, Any]) -> None:
    """Fields seedbatch sends only when a job's ``model.extra`` names them, shaped as the reference says."""
    prediction = body.get("prediction")
    if prediction is not None:
        if not isinstance(prediction, dict) or prediction.get("type") != "content":
            raise BadRequest('Invalid \'prediction\': expected {"type": "content", "content": ...}.', "prediction")
        content = prediction.get("content")
        if not isinstance(content, str | list):
            raise BadRequest("Invalid 'prediction.content': expected a string or an array of text parts.", "prediction")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage"), bool)):
        raise BadRequest("Invalid 'stream_options': expected {\"include_usage\": true|false}.", "stream_options")


def _tools(raw: Any) -> dict[str, dict[str, Any]] | None:
    """``tools`` as the reference defines it: up to 128 functions, each a name and a parameters object."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("Invalid 'tools': expected an array.", "tools")
    if len(raw) > 128:
        raise BadRequest(f"Invalid 'tools': array too long; expected at most 128 tools, got {len(raw)}.", "tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise BadRequest(f'Invalid \'{where}\': expected {{"type": "function", "function": {{...}}}}.', where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequest(f"Missing required parameter: '{where}.function'.", f"{where}.function")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise BadRequest(f"Unknown parameter: '{where}.function.{sorted(unknown)[0]}'.", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise BadRequest(
                f"Invalid '{where}.function.name': expected 1-64 characters of a-z, A-Z, 0-9, _ or -.",
                f"{where}.function.name",
            )
        params = fn.get("parameters")
        if not isinstance(params, dict):
            raise BadRequest(
                f"Missing required parameter: '{where}.function.parameters' (an object).",
                f"{where}.function.parameters",
            )
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise BadRequest(f"Invalid '{where}.function.strict': expected a boolean.", f"{where}.function.strict")
        out[name] = params
    return out


def _tool_choice(raw: Any, tools: dict[str, dict[str, Any]] | None) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "function", the forced function); without tools only "none" is possible."""
    param = "tool_choice"
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise BadRequest(
                f"Invalid value for 'tool_choice': {raw!r}. Supported values are: 'none', 'auto' and 'required'.", param
            )
        if raw != "none" and not tools:
            raise BadRequest(f"Invalid value for 'tool_choice': {raw!r} is only allowed with 'tools'.", param)
        return raw, None
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(fn, dict):
        raise BadRequest(
            'Invalid \'tool_choice\': expected a string or {"type": "function", "function": {"name": ...}}.',
            param,
        )
    name = fn.get("name")
    if not tools or name not in tools:
        raise BadRequest(f"Invalid 'tool_choice': function {name!r} is not among the 'tools'.", param)
    return "function", str(name)


def response_format(rf: Any) -> tuple[str, dict[str, Any] | None]:
    """The answer format and schema; a ``json_schema`` without a schema is answered as ``json_object``."""
    if rf is None:
        return "text", None
    param = "response_format"
    if not isinstance(rf, dict):
        raise BadRequest("Invalid 'response_format': expected an object.", param)
    kind = rf.get("type")
    if kind == "text":
        return "text", None
    if kind == "json_object":
        schema = rf.get("schema")  # llama.cpp's dialect: a schema riding on json_object
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest("Invalid 'response_format.schema': expected an object.", f"{param}.schema")
        return ("json_schema", schema) if schema is not None else ("json_object", None)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise BadRequest("Missing required parameter: 'response_format.json_schema'.", f"{param}.json_schema")
        name = js.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise BadRequest(
                "Invalid 'response_format.json_schema.name': expected 1-64 characters of a-z, A-Z, 0-9, _ or -.",
                f"{param}.json_schema.name",
            )
        schema = js.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest(
                "Invalid 'response_format.json_schema.schema': expected an object.", f"{param}.json_schema.schema"
            )
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise BadRequest(
                "Invalid 'response_format.json_schema.strict': expected a boolean.", f"{param}.json_schema.strict"
            )
        unknown = set(js) - {"name", "schema", "strict", "description"}
        if unknown:
            raise BadRequest(
                f"Unknown parameter: 'response_format.json_schema.{sorted(unknown)[0]}'.", f"{param}.json_schema"
            )
        return ("json_schema", schema) if schema is not None else ("json_object", None)
    raise BadRequest(
        f"Invalid value for 'response_format.type': {kind!r}. "
        "Supported values are: 'text', 'json_object' and 'json_schema'.",
        f"{param}.type",
    )
