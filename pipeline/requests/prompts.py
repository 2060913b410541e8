"""Rows → request bodies and their hashes. Pure: the same row and spec always give the same bytes.

The request hash is the identity of paid work: blake2b-128 over the canonical body (sorted keys,
compact JSON), so changing the prompt, the model or a parameter re-sends exactly the rows it changes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import SpecError
from pipeline.job.spec import JobSpec
from pipeline.records import NotSent, Request, Row, ToolCall
from pipeline.requests import conversations
from pipeline.requests.templates import closest, compile_pieces, parse_template, split_template

if TYPE_CHECKING:  # the local API imports this module's constants: keep jsonschema and polars out of it
    from pipeline.requests.tools import Tools

#: Characters per token for the pre-send estimate (English prose averages ~4 with BPE tokenizers).
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4
#: The chat template's tokens per request. The API reference's example bills 57 prompt tokens for a
#: 9-token message: 44 besides the message's own 4. Other servers use fewer; over-estimating by a few
#: dozen tokens only makes budgets and TPM pacing conservative.
TOKENS_PER_REQUEST = 44
#: Flat estimates for media parts: providers bill images by tiles; we only need an order of magnitude.
TOKENS_PER_IMAGE = 85
TOKENS_PER_VIDEO = 200

#: A row's media parts by column (None for a null cell) and its media error; see ``media.MediaBuilder.cells``.
MediaBuilder = Callable[[Row], tuple[dict[str, dict[str, Any] | None], str | None]]


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN + 0.5)


def structured_format(spec: JobSpec, schema: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The ``response_format`` to send and any schema instructions for the system message, per dialect."""
    fmt = spec.output.format
    if fmt == "text":
        return None, None
    if fmt == "json_object":
        return {"type": "json_object"}, None
    assert schema is not None
    dialect = spec.structured_output
    if dialect == "tool":
        return None, None  # the schema travels as the forced function's parameters (``tools.answer_tool``)
    if dialect == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": spec.output.name, "schema": schema, "strict": spec.output.strict},
        }, None
    if dialect == "json_object_schema":
        # A grammar-based server (llama.cpp) enforces only what its grammar can express: bounded integer
        # ranges become enums, open strings and arrays get lengths that fit max_tokens. The answer is
        # still validated against the job's own schema.
        from pipeline.requests.grammar import enforceable  # (imported here: the local API uses prompts' constants)

        return {"type": "json_object", "schema": enforceable(schema, max_tokens=spec.model.max_tokens)}, None
    instructions = (
        "Answer with one JSON document and nothing else. It must validate against this JSON Schema:\n"
        + orjson.dumps(schema).decode()
    )
    return None, instructions


class Renderer:
    """Built once per job: compiled templates and the fixed part of every body."""

    def __init__(
        self,
        spec: JobSpec,
        schema: dict[str, Any] | None = None,
        media: MediaBuilder | None = None,
        load_media: conversations.MediaLoader | None = None,
        tools: Tools | None = None,
    ) -> None:
        self.user = spec.prompt.user or ""
        self.media = media
        self.media_first = spec.media.position == "before"
        self.salted = not spec.job.dedupe
        #: Whole message lists per row (``prompt.messages_column``, or an OpenAI Batch file's ``body``).
        self.messages_column = spec.prompt.messages_column
        self.batch = spec.job.input_format == "openai_batch"
        self.load_media = load_media
        source = f"{spec.source}: " if spec.source else ""
        user = parse_template(self.user, f"{source}prompt.user") if spec.prompt.user is not None else []
        system = parse_template(spec.prompt.system, f"{source}prompt.system") if spec.prompt.system else []
        user_names = [p[0] for p in user if isinstance(p, tuple)]
        system_names = [p[0] for p in system if isinstance(p, tuple)]
        media_columns = [*spec.media.image_columns, *spec.media.video_columns]
        inline = spec.media.position == "inline" and bool(media_columns)
        if inline:
            unplaced = [c for c in media_columns if c not in user_names]
            if unplaced:
                raise SpecError(
                    f"prompt.user: media.position = 'inline' needs a placeholder for each media column; "
                    f"add {', '.join('{' + c + '}' for c in unplaced)} where the media should go"
                )
            user_names = [f for f in user_names if f not in media_columns]  # never format a path or bytes as text
        #: The columns rendered as text, in the order of the positional fields of the compiled templates.
        self.slots = list(dict.fromkeys([*user_names, *system_names]))
        #: Which template names each placeholder column, for messages.
        self.named_in = {**dict.fromkeys(system_names, "prompt.system"), **dict.fromkeys(user_names, "prompt.user")}
        fields = [self.messages_column] if self.messages_column is not None else user_names
        self.fields = list(dict.fromkeys([*fields, *system_names]))
        index = {name: i for i, name in enumerate(self.slots)}
        self.user_format = "" if inline else compile_pieces(user, index)
        self.pieces: list[str | tuple[str]] | None = None
        if inline:
            self.pieces = [
                p if isinstance(p, tuple) else compile_pieces(p, index) for p in split_template(user, media_columns)
            ]
        response_format, instructions = structured_format(spec, schema)
        if instructions:
            system = [*system, f"\n\n{instructions}" if system else instructions]
        self.system_format = compile_pieces(system, index) if system else None
        self.few_shot = [{"role": m.role, "content": m.content} for m in spec.prompt.few_shot]
        m = spec.model
        self.params: dict[str, Any] = {"model": m.name, "max_tokens": m.max_tokens}
        for key in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "reasoning_effort"):
            value = getattr(m, key)
            if value is not None:
                self.params[key] = value
        if response_format is not None:
            self.params["response_format"] = response_format
        if tools is not None:
            self.params.update(tools.request_fields())
        self.params.update(m.extra)  # model.extra never names a field set above (checked at load)
        #: The body keys the job decides over a Batch line's own (model is always the job's).
        self.job_keys = frozenset(
            {
                "model",
                *(k for k in self.params if k != "max_tokens"),
                *(["max_tokens"] if "max_tokens" in m.model_fields_set else []),
            }
        )
        self.max_tokens = m.max_tokens
        self.context_tokens = spec.context_tokens
        self.send_empty = spec.prompt.send_empty
        self.media_columns = media_columns
        fixed_text = "".join(x["content"] for x in self.few_shot)
        self.fixed_tokens = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * (
            len(self.few_shot) + 1 + bool(self.system_format)
        )
        self.fixed_tokens += estimate_tokens(fixed_text)
        # Providers bill the function definitions as prompt text, whichever way the messages are made.
        self.tools_tokens = estimate_tokens(orjson.dumps(list(tools.definitions)).decode()) if tools else 0
        self.fixed_tokens += self.tools_tokens

    def _empty(self, cells: list[str], parts: list[dict[str, Any]]) -> bool:
        """Every placeholder null or blank (and no media): the answer could only be invented."""
        if self.send_empty or not (self.slots or self.media_columns) or parts:
            return False
        return not any(v.strip() for v in cells)

    def check_columns(self, columns: Sequence[str], where: str) -> None:
        job = where.removesuffix(": prompt")
        if self.batch:
            if "body" not in columns:
                raise SpecError(
                    f"{job}: job.input_format = 'openai_batch' needs a 'body' on each line (an OpenAI Batch input "
                    f"file: custom_id, method, url, body); the input has {', '.join(repr(c) for c in columns[:12])}"
                )
            # Without method/url (some providers' batch files) the body alone is the request.
            self.fields = [c for c in ("method", "url", "body") if c in columns] + [
                f for f in self.fields if f not in ("method", "url", "body")
            ]
        if self.messages_column is not None and self.messages_column not in columns:
            raise SpecError(
                f"{job}: prompt.messages_column {self.messages_column!r} is not an input column; "
                f"input has {', '.join(repr(c) for c in columns[:12])}"
            )
        missing = [f for f in self.fields if f not in columns]
        quoted = next((f for f in missing if '"' in f), None)
        if quoted is not None:  # {"a": 1}: JSON meant literally, not a column
            raise SpecError(
                f"{job}: {self.named_in.get(quoted, 'prompt.user')}: '{{{quoted}}}' is not a column of the input; "
                "to write literal braces (e.g. JSON) in a template, double them: {{ and }}"
            )
        if missing:
            named = []
            for name in missing:
                near = closest(name, columns)
                named.append(f"{name!r} (closest: {', '.join(map(repr, near))})" if near else repr(name))
            templates = " and ".join(sorted({self.named_in.get(f, "prompt.user") for f in missing}, reverse=True))
            verb = "use" if " and " in templates else "uses"
            more = ", …" if len(columns) > 12 else ""
            raise SpecError(
                f"{job}: {templates} {verb} column(s) {', '.join(named)} not in the input; input has "
                f"{', '.join(repr(c) for c in columns[:12])}{more}; a placeholder is a column's name exactly as "
                "the input spells it (write {{ and }} for literal braces)"
            )

    def render(self, row: Row) -> Request:
        # The hot loop of a run (and of every rerun, which must hash each row): kept lean on purpose.
        if self.batch or self.messages_column is not None:
            return self._render_messages(row)
        values = row.values
        cells = [_cell(values.get(name)) for name in self.slots]
        nulls = sum(1 for name in self.slots if values.get(name) is None)
        if self.pieces is None:
            pieces: list[str | tuple[str]] = []
            user_text = self.user_format.format(*cells)
        else:
            pieces = [p if isinstance(p, tuple) else p.format(*cells) for p in self.pieces]
            user_text = "".join(p for p in pieces if isinstance(p, str))
        text_len = len(user_text)
        if self.system_format is not None:
            system_text = self.system_format.format(*cells)
            text_len += len(system_text)
            messages: list[dict[str, Any]] = [{"role": "system", "content": system_text}, *self.few_shot]
        else:
            messages = [*self.few_shot]
        extra_tokens = 0
        media_error = None
        content: Any = user_text
        parts: list[dict[str, Any]] = []
        if self.media is not None:
            by_column, media_error = self.media(row)
            nulls += sum(p is None for p in by_column.values())
            parts = [p for p in by_column.values() if p is not None]
            extra_tokens = sum(TOKENS_PER_IMAGE if p["type"] == "image_url" else TOKENS_PER_VIDEO for p in parts)
            if self.pieces is not None and parts:
                content = [
                    {"type": "text", "text": p} if isinstance(p, str) else by_column[p[0]]
                    for p in pieces
                    if p != "" and (isinstance(p, str) or by_column.get(p[0]) is not None)
                ]
            elif parts:
                text_part = {"type": "text", "text": user_text}
                content = [*parts, text_part] if self.media_first else [text_part, *parts]
        messages.append({"role": "user", "content": content})
        body = orjson.dumps({**self.params, "messages": messages}, option=orjson.OPT_SORT_KEYS)
        h = hashlib.blake2b(body, digest_size=16)
        if self.salted:
            h.update(b"\x00row:" + row.key.encode())
        if media_error:
            # A row whose media failed sends nothing; its hash must not collide with a text-only row's.
            h.update(b"\x00media_error:" + media_error.encode())
        est = self.fixed_tokens + int(text_len / CHARS_PER_TOKEN + 0.5) + extra_tokens
        not_sent = None
        if media_error:
            not_sent = NotSent("error", media_error, "media")
        elif self._empty(cells, parts):
            not_sent = NotSent(
                "skipped",
                f"every placeholder ({', '.join(self.slots + self.media_columns)}) is null or empty; "
                "not sent (prompt.send_empty = true sends such rows)",
                "empty",
            )
        else:
            not_sent = self._too_long(est, self.max_tokens)
        return Request(
            row_index=row.index,
            row_key=row.key,
            body=body,
            request_hash=h.hexdigest(),
            est_prompt_tokens=est,
            max_tokens=self.max_tokens,
            null_cells=nulls,
            not_sent=not_sent,
        )

    def _too_long(self, est: int, max_tokens: int) -> NotSent | None:
        """A row whose estimated prompt plus ``max_tokens`` exceeds the model's context: never sent."""
        if self.context_tokens is None or est + max_tokens <= self.context_tokens:
            return None
        return NotSent(
            "too_long",
            f"prompt ~{est:,} tokens + max_tokens {max_tokens:,} exceeds the model's context of "
            f"{self.context_tokens:,} tokens (model.context_tokens); not sent",
            "too_long",
        )

    def _render_messages(self, row: Row) -> Request:
        """A row that carries its whole message list; a list that cannot be sent is the row's error."""
        values = row.values
        column = "body" if self.batch else str(self.messages_column)
        cells = [_cell(values.get(name)) for name in self.slots]
        params: dict[str, Any] = self.params
        error = None
        messages: list[dict[str, Any]] = []
        chars = media = 0
        try:
            if self.batch:
                raw, params = conversations.batch_line(values, self.params, self.job_keys)
            else:
                raw = conversations.decode(values.get(column))
            if raw is not None:
                messages, chars, media = conversations.normalize(raw, self.load_media)
        except conversations.BadMessages as exc:
            raw, error = None, f"row {row.key!r}: column {column!r}: {exc}"
        system = self.system_format.format(*cells) if self.system_format is not None else None
        if system:
            chars += len(system)
        sent = conversations.with_system(system, self.few_shot, messages)
        if error is not None:
            body = orjson.dumps({**params, "messages_error": error}, option=orjson.OPT_SORT_KEYS)
        else:
            body = orjson.dumps({**params, "messages": sent}, option=orjson.OPT_SORT_KEYS)
        h = hashlib.blake2b(body, digest_size=16)
        if self.salted:
            h.update(b"\x00row:" + row.key.encode())
        max_tokens = int(params.get("max_tokens", self.max_tokens))
        est = (
            TOKENS_PER_REQUEST
            + TOKENS_PER_MESSAGE * len(sent)
            + estimate_tokens("".join(x["content"] for x in self.few_shot))
            + int(chars / CHARS_PER_TOKEN + 0.5)
            + TOKENS_PER_IMAGE * media
            + self.tools_tokens
        )
        not_sent = None
        if error is not None:
            not_sent = NotSent("error", error, "messages")
        elif raw is None:
            not_sent = NotSent("skipped", f"column {column!r} is null or holds no messages; not sent", "empty")
        else:
            not_sent = self._too_long(est, max_tokens)
        return Request(
            row_index=row.index,
            row_key=row.key,
            body=body,
            request_hash=h.hexdigest(),
            est_prompt_tokens=est,
            max_tokens=max_tokens,
            null_cells=int(values.get(column) is None),
            not_sent=not_sent,
        )


def _cell(value: Any) -> str:
    """A cell as prompt text: null renders empty (and is counted by the caller); see ``as_text``."""
    if value is None:
        return ""
    if type(value) is str:
        return value
    render = _RENDER.get(type(value))
    return render(value) if render is not None else as_text(value)


def as_text(value: Any) -> str:
    """A non-text value as it goes into a prompt: lists and structs as compact JSON (never Python's repr),
    dates, times and timestamps as ISO 8601, binary as base64, numbers and booleans as ``str`` gives them."""
    if isinstance(value, list | dict | tuple):
        return _json(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    return str(value)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS).decode()


def _isoformat(value: dt.date | dt.time) -> str:
    return value.isoformat()


#: ``as_text`` by exact type, for the types cells come as (one dict lookup per cell in the render loop).
_RENDER: dict[type, Callable[[Any], str]] = {
    int: str,
    float: str,
    bool: str,
    list: _json,
    dict: _json,
    dt.date: _isoformat,
    dt.datetime: _isoformat,
    dt.time: _isoformat,
}

#: Keys of a map column may be numbers. Timestamps are written as ``isoformat`` writes them (orjson's RFC 3339
#: is that form): naive ones stay naive, with no invented time zone.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    """What orjson does not write itself, inside a list or struct: decimals, durations, binary."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    return str(value)


def with_changes(
    body: bytes,
    *,
    max_tokens: int | None = None,
    reask: tuple[str, str] | None = None,
    reask_calls: tuple[tuple[ToolCall, ...], str] | None = None,
) -> bytes:
    """A follow-up attempt's body: larger ``max_tokens``, or the bad answer and its error appended.

    A bad function call goes back as the conversation the API defines for it: the assistant's calls,
    then one ``tool`` message per call carrying the error, so the model calls again with fixed arguments.
    """
    data = orjson.loads(body)
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    if reask_calls is not None:
        calls, error = reask_calls
        data["messages"] = [
            *data["messages"],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ],
            },
            *(
                {
                    "role": "tool",
                    "tool_call_id": c.id,
                    "content": f"Not run: {error}. Call the function again with corrected arguments.",
                }
                for c in calls
            ),
        ]
    if reask is not None:
        answer, error = reask
        data["messages"] = [
            *data["messages"],
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"That answer is invalid: {error}. Reply with the corrected JSON only."},
        ]
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


#: How far a re-ask of a deterministic request moves the temperature: far enough to leave a repeated
#: mistake, little enough to stay close to what the job asked for.
TEMPERATURE_STEP = 0.3


def vary_sampling(body: bytes) -> bytes:
    """The same request with a sampling step, so a deterministic server cannot repeat its answer.

    Temperature below 1 steps up by ``TEMPERATURE_STEP``; otherwise the seed moves on (set to 1 when
    the job has none). The request hash of the row is unchanged: this is one row's later attempt.
    """
    data = orjson.loads(body)
    temperature = data.get("temperature")
    if isinstance(temperature, int | float) and temperature < 1.0:
        data["temperature"] = round(min(1.0, temperature + TEMPERATURE_STEP), 3)
    else:
        seed = data.get("seed")
        data["seed"] = seed + 1 if isinstance(seed, int) else 1
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
