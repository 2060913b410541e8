"""The sections of a job file (``[job]``, ``[model]``, ``[prompt]``, …): one strict model each, every key documented.

``spec.JobSpec`` puts them together and checks what spans sections; these check only their own keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = "bytedance/dola-seed-2-0-lite"

#: Request fields seedbatch sets itself → the job key that sets them. ``model.extra`` may not name these:
#: the job key is checked, the extra field would not be. (``max_completion_tokens`` is max_tokens' other
#: name; streaming is ``endpoint.stream``, which also asks for the usage in the stream.)
OWN_FIELDS: dict[str, str] = {
    "model": "model.name",
    "messages": "prompt.system, prompt.user and prompt.few_shot",
    "max_tokens": "model.max_tokens",
    "max_completion_tokens": "model.max_tokens",
    "temperature": "model.temperature",
    "top_p": "model.top_p",
    "seed": "model.seed",
    "frequency_penalty": "model.frequency_penalty",
    "presence_penalty": "model.presence_penalty",
    "reasoning_effort": "model.reasoning_effort",
    "response_format": "output.format and output.schema",
    "tools": "model.tools",
    "tool_choice": "model.tool_choice",
    "parallel_tool_calls": "model.parallel_tool_calls",
    "stream": "endpoint.stream",
    "stream_options": "endpoint.stream (it asks for stream_options.include_usage)",
}


class StrictModel(BaseModel):
    """A section: an unknown key is an error (a misspelled key must not be ignored), and values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSection(StrictModel):
    name: str | None = None
    """Name used in logs and the manifest; defaults to the job file's stem."""
    input: Path
    """The prompt table: .parquet, .csv, .tsv or .jsonl/.ndjson (the text ones also .gz or .zst compressed). An
    object URI (``s3://bucket/key``) is read through a local copy, and this is that copy's path (``JobSpec.objects``
    keeps the URI)."""
    input_format: Literal["table", "openai_batch"] = "table"
    """``openai_batch``: the input is an OpenAI Batch input file (``custom_id``, ``method``, ``url``, ``body`` per
    line); each line's ``body`` is the request and ``custom_id`` the row id. Said, not guessed: "body" is also a
    common column name in ordinary tables."""
    output: Path
    """The output file; its format follows the extension (``OUTPUT_FORMATS``). The manifest and (by default) the
    ledger sit beside it. For an object URI this is the local file written, then uploaded."""
    id_column: str | None = None
    """Column whose values name rows in the output, errors and logs; row numbers are used when unset. Every
    value must be present and unique: an empty or repeated id stops the run before sending (``reader.check_ids``)."""
    ledger: Path | None = None
    """SQLite ledger of paid answers; default ``<output>.ledger.sqlite``."""
    run_output: str | None = None
    """Also write only this run's new answers to a file: a template with {date} and {run_id}."""
    dedupe: bool = True
    """Send identical requests once. Turn off to sample several answers at temperature > 0 without a seed."""
    encoding: str = "utf-8"
    """Text encoding of a CSV or JSONL input, e.g. "latin-1", "cp1252", "utf-8-sig"."""
    delimiter: str | None = None
    """Field separator of a CSV input, one character (``"\t"``, ``";"``, ``"|"``). Unset: a tab for .tsv, else a comma,
    and a header that reads as one column holding another separator is an error naming this setting."""
    batch_output: Path | None = None
    """Also write an OpenAI Batch-style output file (.jsonl): one line per row, as OpenAI's Batch API returns."""
    chunk_rows: int = Field(default=2_000, ge=100, le=1_000_000)
    """Rows read from the input at a time: bounds memory on huge inputs. Larger chunks hold more rows in memory
    without reading faster."""

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 1 or value in '"\r\n'):
            raise ValueError('one character other than a quote or a line break, e.g. "\\t", ";" or "|"')
        return value

    @model_validator(mode="before")
    @classmethod
    def _batch_ids(cls, data: Any) -> Any:
        """A batch file's rows are named by their ``custom_id``, as OpenAI's output names them."""
        if isinstance(data, dict) and data.get("input_format") == "openai_batch" and data.get("id_column") is None:
            return {**data, "id_column": "custom_id"}
        return data


class ModelSection(StrictModel):
    name: str = DEFAULT_MODEL
    """Model id sent as ``model``."""

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError('the model name is empty: give the server\'s model id, e.g. name = "gpt-4o-mini"')
        return name

    max_tokens: int = Field(default=1024, ge=1)
    """Upper bound on generated tokens (reasoning included); also the worst case for budgets."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature, sent as is (unset: the server's default)."""
    top_p: float | None = Field(default=None, ge=0.01, le=1)
    """Nucleus sampling, sent as is (unset: the server's default)."""
    seed: int | None = Field(default=None, ge=1)
    """Sampling seed, sent as is: with temperature, makes answers repeatable on servers that honour it."""
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    """Sent as is (unset: the server's default)."""
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    """Sent as is (unset: the server's default)."""
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    """How long a reasoning model thinks, sent as is (unset: the server's default)."""
    context_tokens: int | None = Field(default=None, ge=1)
    """The model's context window. A row whose estimated prompt plus max_tokens exceeds it is recorded
    ``too_long`` and never sent. Default per preset (262,144 for aimlapi and local, 128,000 for openai);
    unset for your own servers (vllm, llamacpp): set it to the server's context size to get the guard."""
    tools: Path | list[dict[str, Any]] | dict[str, Any] | None = None
    """Functions the model may call: a JSON file (a list of tools in the API's shape) or inline tables
    (``[[model.tools]]`` with ``type = "function"`` and ``function = {name, description, parameters, strict}``)."""
    tool_choice: str | dict[str, Any] | None = None
    """``"auto"``, ``"none"``, ``"required"`` or a function's name: forcing one makes its arguments the
    answer's document, validated against its parameters and spread into typed columns."""
    parallel_tool_calls: bool | None = None
    """Let the model call several functions in one answer (sent as is; unset: the server's default)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Other request fields the API takes (``prediction``, ``stream_options``, newer ones), sent as written.
    Unchecked beyond being JSON and not a field seedbatch sets itself; covered by the request hash."""

    @field_validator("extra")
    @classmethod
    def _check_extra(cls, extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if key in OWN_FIELDS:
                raise ValueError(
                    f"{key!r} is a request field seedbatch sets itself; use {OWN_FIELDS[key]} instead of model.extra"
                )
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key!r} cannot be sent as JSON ({exc}); write dates and times as strings") from None
        return extra


class FewShot(StrictModel):
    role: Literal["user", "assistant", "system"]
    """Who says it."""
    content: str
    """What is said, as written (no placeholders)."""


class PromptSection(StrictModel):
    system: str | None = None
    """System message; may use {column} placeholders like the user template."""
    user: str | None = None
    """User message template; {column} is replaced by the row's value ({{ and }} are literal braces)."""
    messages_column: str | None = None
    """Column holding each row's whole message list (instead of ``user``): a Parquet list<struct<role, content>>
    or JSON text in a CSV/JSONL column. ``system`` is merged into the row's leading system message (see README)."""
    few_shot: list[FewShot] = Field(default_factory=list)
    """Fixed messages placed between the system message and the row's user message."""
    send_empty: bool = False
    """Send rows whose placeholders are all null or empty. Off: such rows are ``skipped``, not sent, not paid."""


class MediaSection(StrictModel):
    image_columns: list[str] = Field(default_factory=list)
    """Columns holding an image per row: http(s) URL, local path, raw bytes, or null."""
    video_columns: list[str] = Field(default_factory=list)
    """Columns holding a video per row, same forms as images."""
    position: Literal["before", "after", "inline"] = "after"
    """Where media goes: before or after the user text, or "inline" at each {column} placeholder in prompt.user."""
    detail: Literal["low", "high", "auto"] | None = None
    """Image detail level sent with every image part."""
    max_file_mb: float = Field(default=20.0, gt=0)
    """Local files larger than this are a per-row error, found before sending."""
    strict_inputs: bool = False
    """Check every media cell before sending; any missing/unsupported/too-large file stops the run (exit 2)."""


class OutputSection(StrictModel):
    format: Literal["text", "json_object", "json_schema"] = "text"
    """What the model must answer: free text, any JSON object, or JSON matching ``schema``."""
    schema_: Path | dict[str, Any] | None = Field(default=None, alias="schema")
    """JSON Schema: a path to a .json file or an inline table. Required for json_schema."""
    name: str = Field(default="answer", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """``json_schema.name`` sent to the API."""
    strict: bool = True
    """``json_schema.strict``; when true the schema is checked for what strict mode needs."""
    column_prefix: str = ""
    """Prefix for the typed columns made from the schema's top-level properties."""
    invalid_retries: int = Field(default=2, ge=0, le=10)
    """Extra tries when an answer is not valid JSON or breaks the schema."""
    reask_with_error: bool = True
    """On an invalid answer, re-ask with the answer and its validation error appended. Off: the re-ask is the
    same request with a sampling step (temperature +0.3, or the next seed), never the identical request a
    deterministic server would answer the same way."""
    truncated_retries: int = Field(default=0, ge=0, le=5)
    """Retry a truncated answer this many times, doubling max_tokens each time (capped by max_tokens_cap)."""
    max_tokens_cap: int = Field(default=16_384, ge=1)
    """The most ``truncated_retries`` may raise max_tokens to."""
    row_token_budget: int | None = Field(default=None, ge=1)
    """Stop re-asking a row once its attempts used this many tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LimitsSection(StrictModel):
    rpm: float | None = Field(default=None, gt=0)
    """Requests per minute; paced smoothly from the first second."""
    tpm: float | None = Field(default=None, gt=0)
    """Tokens per minute (prompt estimate + max_tokens, corrected by reported usage)."""
    concurrency: int = Field(default=4096, ge=1, le=20_000)
    """Ceiling on requests in flight. The operating point follows Little's law (rate × observed latency),
    so a 20 s reasoning model at 6,000 RPM runs ~3,000 in flight and a 300 ms one ~50; lower it only to
    protect a server that cannot take more connections."""
    max_attempts: int = Field(default=6, ge=1, le=50)
    """HTTP tries per request for timeouts, dropped connections and 5xx (a 429 does not use one up)."""
    rate_limit_wait_s: float = Field(default=600.0, gt=0)
    """How long one request may keep waiting on 429s (rate limits) before it is recorded as an error."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Ceiling on one request's timeout; the timeout in force follows observed latency (at least 10 s)."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to open a connection: a server that does not accept one in this time is retried."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """Stop issuing requests before spent + in-flight worst case would exceed this."""
    backoff_max_s: float = Field(default=60.0, gt=0)
    """Longest wait between tries when the server gives no Retry-After."""
    outage_wait_s: float = Field(default=600.0, ge=0)
    """How long the run waits out a provider that fails nearly every request (the circuit is open: one probe
    at 1 s, 2 s, … up to 60 s apart, rows kept pending) before it stops with exit 6. 0: stop at once."""
    shared_limiter: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    """Name of an RPM/TPM bucket shared by every job on this machine naming it (one key, one limit)."""
    shared_limiter_file: Path | None = None
    """SQLite file holding shared buckets; default ``~/.cache/seedbatch/limits.sqlite``."""


class EndpointSection(StrictModel):
    preset: Literal["aimlapi", "openai", "vllm", "llamacpp", "local"] = "aimlapi"
    """Named server: sets base_url, api_key_env and structured_output unless given here."""
    base_url: str | None = None
    """The server's OpenAI-compatible base URL (``…/v1``); unset: the preset's."""
    api_key_env: str | None = None
    """Environment variable holding the API key (the key itself is never in the job)."""

    @field_validator("base_url")
    @classmethod
    def _scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.lower().startswith(("http://", "https://")):
            raise ValueError(
                f"{url!r} has no http:// or https:// scheme: write it as 'http://{url}' (a server on this machine "
                f"usually speaks plain HTTP) or 'https://{url}'"
            )
        return url

    api_key_file: Path | None = None
    """File holding the API key; used when set, else the variable."""
    structured_output: Literal["json_schema", "json_object_schema", "instructions", "tool"] | None = None
    """How a schema is sent: OpenAI ``json_schema``, llama.cpp ``json_object`` + schema, in the prompt, or as
    ``tool``: the one function the model must call (``output.name``), for servers whose json_schema is weak."""
    stream: bool = False
    """Receive answers as server-sent events (``stream: true`` with ``stream_options.include_usage``): a request
    whose stream goes quiet for ``stall_s`` is abandoned and retried however long the answer has been running,
    so a slow reasoning model is never cut off while it is still writing. The answer, its reasoning and usage
    are put back together from the chunks; the ledger and output are the same as without streaming."""
    stall_s: float = Field(default=30.0, gt=0)
    """With ``stream``: seconds without a chunk (the first one included) after which the request is retried;
    shorter once answers have been seen (the deadline learned from them, 3 × their p99, at least 10 s)."""
    local_latency_ms: float = Field(default=0.0, ge=0)
    """With preset 'local': simulated model latency of the built-in server."""
    local_error_rates: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    """With preset 'local': the share of answers the built-in server gets wrong on purpose, per answer field
    (``{ sentiment = 0.2 }``; ``text`` for a text job), for rows whose prompt carries the right answer as a
    ``[[truth:FIELD=VALUE]]`` marker: what ``seedbatch eval`` should then measure. Answers already in the
    ledger are kept; ``--fresh`` draws again."""


class PricingSection(StrictModel):
    input_per_million: float = Field(ge=0)
    """USD per million prompt tokens, used when the server reports no cost."""
    output_per_million: float = Field(ge=0)
    """USD per million completion tokens (reasoning included)."""


class ExecutorSection(StrictModel):
    kind: Literal["local", "ray"] = "local"
    """Where requests are sent from: this process, or tasks on a Ray cluster (``pip install 'seedbatch[ray]'``)."""
    address: str | None = None
    """Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); unset: $RAY_ADDRESS, else a local Ray."""
    workers: int = Field(default=2, ge=1, le=10_000)
    """Shards: the selected requests are split into this many by request hash, one Ray task each."""
