"""Whole message lists as rows: a conversation cell, or an OpenAI Batch line's ``body``. Pure.

A cell may hold a list of ``{role, content}`` messages (a Parquet list<struct> column) or the same list as
JSON text (a CSV or JSONL column). What cannot be sent (bad JSON, not a list, a message without a role, a
role the API does not know, a bad content part, a missing image file) is a ``BadMessages`` naming the
message: the caller records it as the row's error before anything is sent. Images and video inside
messages follow the media rules of ``[media]`` columns: an http(s) URL or data URI is sent as is, a local
path or bytes become a base64 data URI (through the ``MediaLoader`` the caller passes in), so the request
hash covers the file's bytes, not its path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import orjson

#: The roles the endpoint accepts (the AIML API reference and the built-in local API: the same four).
ROLES = ("system", "user", "assistant", "tool")
#: Content part types; ``image_url`` and ``video_url`` carry media.
PART_TYPES = ("text", "image_url", "video_url")
#: Body keys a Batch line may not decide: the job's model is sent, answers are never streamed.
BODY_DROPPED = ("model", "stream", "stream_options")
#: Sampling keys of ``[model]``: set in the job they win over a Batch line's body.
SAMPLING_KEYS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "reasoning_effort")
#: The one endpoint a Batch line may name.
CHAT_PATH = "/chat/completions"

#: (cell, kind) → the URL to send: data URI for paths and bytes, the URL itself for http(s); ValueError if bad.
MediaLoader = Callable[[Any, Literal["image", "video"]], str]


class BadMessages(ValueError):
    """A message list that cannot be sent; the text says which message and what to fix."""


def decode(cell: Any) -> list[Any] | None:
    """A cell as a Python list of messages; None for a null or blank cell (nothing to send)."""
    if cell is None:
        return None
    if isinstance(cell, str):
        if not cell.strip():
            return None
        try:
            cell = orjson.loads(cell)
        except orjson.JSONDecodeError as exc:
            raise BadMessages(f"not valid JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(cell, tuple):
        cell = list(cell)
    if not isinstance(cell, list):
        raise BadMessages(f'not a list of messages ({_kind(cell)}); write [{{"role": "user", "content": ...}}]')
    return cell or None


def normalize(messages: Sequence[Any], load: MediaLoader | None) -> tuple[list[dict[str, Any]], int, int]:
    """Checked messages ready to send, with their text length and media part count (for the estimate).

    Null struct fields (a Parquet row holds every field of the struct) are dropped; local media become
    data URIs.
    """
    out: list[dict[str, Any]] = []
    chars = media = 0
    for i, raw in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(raw, Mapping):
            raise BadMessages(f"{where} is {_kind(raw)}, not an object with role and content")
        msg = {k: v for k, v in raw.items() if v is not None}
        role = msg.get("role")
        if role is None:
            raise BadMessages(f"{where} has no role; give each message a role ({', '.join(ROLES)})")
        if role not in ROLES:
            raise BadMessages(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list | tuple):
            parts = []
            for j, part in enumerate(content):
                built, n = _part(part, f"{where}, part {j + 1}", load)
                parts.append(built)
                chars += n
                media += built["type"] != "text"
            msg["content"] = parts
        elif not (content is None and role == "assistant" and msg.get("tool_calls")):
            raise BadMessages(f"{where} ({role}) has no content; give it text or a list of content parts")
        out.append(msg)
    return out, chars, media


def _part(part: Any, where: str, load: MediaLoader | None) -> tuple[dict[str, Any], int]:
    if isinstance(part, str):  # a bare string in a content list is its text
        return {"type": "text", "text": part}, len(part)
    if not isinstance(part, Mapping):
        raise BadMessages(f"{where} is {_kind(part)}, not a content part")
    part = {k: v for k, v in part.items() if v is not None}
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadMessages(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": text}, len(text)
    if kind in ("image_url", "video_url"):
        spec = part.get(kind)
        spec = {"url": spec} if isinstance(spec, str | bytes) else spec
        if not isinstance(spec, Mapping) or spec.get("url") in (None, "", b""):
            raise BadMessages(f"{where}: an {kind} part needs {kind}.url (an http(s) URL, a local path or bytes)")
        url = spec["url"]
        if load is not None:
            try:
                url = load(url, "image" if kind == "image_url" else "video")
            except ValueError as exc:
                raise BadMessages(f"{where}: {exc}") from None
        elif not isinstance(url, str):
            raise BadMessages(f"{where}: {kind}.url must be text")
        return {"type": kind, kind: {**spec, "url": url}}, 0
    raise BadMessages(f"{where}: unknown content part type {kind!r}; use one of {', '.join(PART_TYPES)}")


def with_system(
    system: str | None, few_shot: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The job's system text and few-shot messages around a row's own messages.

    The job's ``system`` comes first; when the row starts with its own system message the two are joined
    into one (the job's text, a blank line, the row's), since some servers take only one system message.
    Few-shot messages follow the system message, then the row's.
    """
    if not system:
        return [*few_shot, *messages] if few_shot else messages
    rest = messages
    text = system
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        text = f"{system}\n\n{messages[0]['content']}"
        rest = messages[1:]
    return [{"role": "system", "content": text}, *few_shot, *rest]


def batch_line(
    values: Mapping[str, Any], params: Mapping[str, Any], job_keys: frozenset[str]
) -> tuple[list[Any] | None, dict[str, Any]]:
    """One OpenAI Batch input line → (its messages, the request's parameters).

    The body supplies the messages and its sampling fields; the job's ``[model]`` wins for every key it
    sets (``job_keys``), and always for ``model``: the line names a model of the server it was written
    for. ``max_completion_tokens`` is sent as ``max_tokens``.
    """
    method, url = values.get("method"), values.get("url")
    if method is not None and str(method).upper() != "POST":
        raise BadMessages(f"method {method!r}: a Batch line seedbatch sends is a POST")
    if url is not None and not str(url).rstrip("/").endswith(CHAT_PATH):
        raise BadMessages(f"url {url!r}: seedbatch sends chat completions only (url /v1/chat/completions)")
    raw = values.get("body")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise BadMessages("the line has no body")
    if isinstance(raw, str):
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadMessages(f"body is not valid JSON ({str(exc).splitlines()[0]})") from None
    else:
        body = raw
    if not isinstance(body, dict):
        raise BadMessages(f"body is {_kind(body)}, not an object")
    if body.get("n") not in (None, 1):
        raise BadMessages(f"body.n = {body['n']!r}: seedbatch keeps one answer per row; remove n")
    if "messages" not in body:
        raise BadMessages("body has no messages")
    out = {k: v for k, v in body.items() if k not in (*BODY_DROPPED, "messages", "n") and v is not None}
    if "max_completion_tokens" in out:
        out.setdefault("max_tokens", out.pop("max_completion_tokens"))
        out.pop("max_completion_tokens", None)
    for key, value in params.items():
        if key == "model" or key in job_keys or key not in out:
            out[key] = value
    messages = body["messages"]
    if messages is not None and not isinstance(messages, list):
        raise BadMessages(f"body.messages is {_kind(messages)}, not a list of messages")
    return messages or None, out


def _kind(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, Mapping):
        return "an object"
    if value is None:
        return "null"
    if isinstance(value, bytes):
        return "bytes"
    return "a number"
