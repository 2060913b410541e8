"""Right answers and wrong ones at a known rate, so an evaluation's figures can be checked.

The local API's own answers are drawn from a hash of the messages: they have no right answer to be
measured against. Two things give it one:

- A ``[[truth:FIELD=VALUE]]`` marker in the last user message (one per field; a job template writes it
  from its gold column, e.g. ``[[truth:sentiment={label}]]``) makes VALUE the answer's FIELD: a
  top-level property of a schema answer (converted to the property's JSON type), or, with the field
  name ``text``, the whole content of a text answer.
- ``ServerConfig.field_error_rates`` (``seedbatch serve --error-rate sentiment=0.2``) makes FIELD wrong
  in that share of answers: another enum member, the other boolean, the number plus one (minus one at
  a ``maximum``), or ``"not VALUE"`` for free text. A field with no truth marker is wrong against the
  answer the server would otherwise give.

Asked for them (``logprobs: true``, ``top_logprobs: n``), the server returns each content token's
log-probability in OpenAI's shape (``choices[0].logprobs.content[*]``; a refusal's tokens under
``logprobs.refusal``). Each token's probability is drawn from the request body and the token's place:
in [0.80, 1.0) for an answer it did not make wrong, in [0.25, 0.60) for one it did, so the mean token
probability (seedbatch's ``confidence``) is below 0.6 exactly for the answers the error rates spoiled.

Whether an answer errs is drawn from the SHA-256 of the whole request body and the field name, so it
is the same for the same request every time (resume and dedup see one answer), independent between
fields, and may differ for a request that differs in anything else, such as its ``seed`` (votes rely on
that). Over n answers the measured accuracy is 1 - rate within binomial noise.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from pipeline.errors import SpecError
from pipeline.localapi.answers import Answer
from pipeline.localapi.validation import TOKEN_RE, Parsed

TRUTH_MARKER = re.compile(r"\[\[truth:([A-Za-z0-9_.-]+)=([^\]]*)\]\]")
#: The field name a truth marker and an error rate use for a text answer's whole content.
TEXT_FIELD = "text"
_TEXT_LABELS = ("positive", "negative", "neutral")


def truths(last_user: str) -> dict[str, str]:
    """Field → right value, from the ``[[truth:…]]`` markers of the last user message."""
    if "[[truth:" not in last_user:
        return {}
    return {m.group(1): m.group(2).strip() for m in TRUTH_MARKER.finditer(last_user)}


def draw(body_hash: bytes, field: str) -> float:
    """A uniform number in [0, 1) fixed by the request body and the field."""
    digest = hashlib.sha256(body_hash + b"\x1f" + field.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _typed(value: str, schema: Mapping[str, Any]) -> Any:
    """A marker's text as the property's JSON type; left as text when it does not convert."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    try:
        if "boolean" in kinds:
            return value.lower() in ("true", "1", "yes")
        if "integer" in kinds:
            return int(value)
        if "number" in kinds:
            return float(value)
    except ValueError:
        return value
    return value


def wrong(value: Any, schema: Mapping[str, Any], body_hash: bytes) -> Any:
    """A value of the same type that is not ``value``."""
    options = [v for v in schema.get("enum") or () if v != value]
    if options:
        return options[int(draw(body_hash, "choice") * len(options))]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        bumped = value + 1
        maximum = schema.get("maximum")
        return value - 1 if maximum is not None and bumped > maximum else bumped
    return f"not {value}"


def apply(answer: Answer, parsed: Parsed, body_hash: bytes, error_rates: Mapping[str, float]) -> None:
    """Set the marked right values on ``answer``, then make each rated field wrong at its rate."""
    marked = truths(parsed.last_user)
    if not marked and not error_rates:
        return
    if parsed.fmt == "text":
        if TEXT_FIELD not in marked and TEXT_FIELD not in error_rates:
            return
        content = marked.get(TEXT_FIELD, answer.content or "")
        if draw(body_hash, TEXT_FIELD) < error_rates.get(TEXT_FIELD, 0.0):
            answer.erred = True
            content = wrong(content, {"enum": list(_TEXT_LABELS)} if content in _TEXT_LABELS else {}, body_hash)
        answer.set_content(content)
        return
    if parsed.fmt != "json_schema" or parsed.schema is None or not answer.content:
        return
    try:
        document = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        return
    if not isinstance(document, dict):
        return
    properties = parsed.schema.get("properties") or {}
    changed = False
    for field in dict.fromkeys((*marked, *error_rates)):
        schema = properties.get(field)
        if not isinstance(schema, dict):
            continue
        if field in marked:
            document[field] = _typed(marked[field], schema)
            changed = True
        if field in document and draw(body_hash, field) < error_rates.get(field, 0.0):
            document[field] = wrong(document[field], schema, body_hash)
            answer.erred = changed = True
    if changed:
        answer.set_content(orjson.dumps(document).decode())


#: Token probabilities of a right answer and of one made wrong on purpose: [low, high).
SURE, UNSURE = (0.80, 1.0), (0.25, 0.60)


def _tokens(text: str) -> list[str]:
    """``text`` cut at each billed token's start, so the pieces join back into ``text`` (spaces included)."""
    starts = [m.start() for m in TOKEN_RE.finditer(text)]
    if not starts:
        return [text] if text else []
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _token_logprobs(
    text: str | None, body_hash: bytes, low: float, high: float, top: int
) -> list[dict[str, Any]] | None:
    if text is None:
        return None
    out: list[dict[str, Any]] = []
    for i, token in enumerate(_tokens(text)):
        p = low + (high - low) * draw(body_hash, f"logprob:{i}")
        # The alternatives share what the token left: halves, quarters… each one a placeholder token.
        alternatives = [(f"<alt{j}>", (1 - p) / 2 ** (j + 1)) for j in range(max(top - 1, 0))]
        ranked = sorted([(token, p), *alternatives], key=lambda a: -a[1])[:top]
        out.append(
            {
                "token": token,
                "logprob": math.log(p),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": math.log(q) if q > 0 else -9999.0, "bytes": list(t.encode())}
                    for t, q in ranked
                ],
            }
        )
    return out


def logprobs(answer: Answer, body_hash: bytes, top_logprobs: int) -> dict[str, Any]:
    """``choices[0].logprobs`` of ``answer``: its content tokens (its refusal's when it refused)."""
    low, high = UNSURE if answer.erred else SURE
    return {
        "content": _token_logprobs(answer.content, body_hash, low, high, top_logprobs),
        "refusal": _token_logprobs(answer.refusal, body_hash, low, high, top_logprobs),
    }


def parse_error_rates(items: Iterable[str]) -> dict[str, float]:
    """``["sentiment=0.2"]`` → ``{"sentiment": 0.2}``; a malformed item is a ``SpecError`` naming it."""
    rates: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            rate = float(text)
        except ValueError:
            rate = -1.0
        if not sep or not name.strip() or not 0.0 <= rate <= 1.0:
            raise SpecError(f"--error-rate {item!r}: write FIELD=RATE with a rate from 0 to 1, e.g. sentiment=0.2")
        rates[name.strip()] = rate
    return rates
