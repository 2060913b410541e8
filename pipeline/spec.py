"""The job file: strict, typed, every field documented, unknown keys rejected.

A job is a TOML file. Relative paths written in it are resolved against the job file's own folder, so
a cron entry that runs from ``/`` reads the same files as a run from the project root
(``jobs/x.toml`` says ``input = "../data/x.csv"``). Paths given as CLI flags are relative to the
current directory, as any command-line path is. ``~`` is the home folder in both, as in a shell: a quoted
flag or a TOML string never reaches the shell that would expand it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import SpecError
from pipeline.evaluation.settings import EvaluationSpec

DEFAULT_MODEL = "bytedance/dola-seed-2-0-lite"
#: The model name the built-in local API answers with; a ledger written before answers were keyed by
#: endpoint knows its local answers by it.
LOCAL_MODEL = "seed-2-0-lite-local"
#: The ledger's name for answers from the built-in local API (``preset = "local"`` with no base_url).
LOCAL_ENDPOINT = "local"

#: Named endpoints: base URL, the variable holding the key, the structured-output dialect.
PRESETS: dict[str, dict[str, Any]] = {
    "aimlapi": {
        "base_url": "https://api.aimlapi.com/v1",
        "api_key_env": "AIMLAPI_API_KEY",
        "structured_output": "json_schema",
        "context_tokens": 262_144,  # dola-seed-2-0-lite: ~256K (see ../shared/api)
    },
    "openai": {
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY",
        "structured_output": "json_schema",
        "context_tokens": 128_000,
    },
    "vllm": {
        "base_url": "http://127.0.0.1:8000/v1",
        "api_key_env": "VLLM_API_KEY",
        "structured_output": "json_schema",
        "key_required": False,
    },
    "llamacpp": {
        "base_url": "http://127.0.0.1:8080/v1",
        "api_key_env": "LLAMACPP_API_KEY",
        "structured_output": "json_object_schema",
        "key_required": False,
    },
    # The built-in local API, started in-process on a free loopback port: demo and dry runs.
    "local": {
        "base_url": None,
        "api_key_env": "SEEDBATCH_LOCAL_KEY",
        "structured_output": "json_schema",
        "key_required": False,
        "context_tokens": 262_144,  # imitates the AIML model
    },
}


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSection(_Strict):
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
    """Rows read from the input at a time; bounds memory on huge inputs (2,000: 271 MB peak RSS on the 100k-row
    benchmark where 10,000 gave 420 MB, at the same speed)."""

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


class ModelSection(_Strict):
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
    top_p: float | None = Field(default=None, ge=0.01, le=1)
    seed: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
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


class FewShot(_Strict):
    role: Literal["user", "assistant", "system"]
    content: str


class PromptSection(_Strict):
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


class MediaSection(_Strict):
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


class OutputSection(_Strict):
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
    row_token_budget: int | None = Field(default=None, ge=1)
    """Stop re-asking a row once its attempts used this many tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LimitsSection(_Strict):
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


class EndpointSection(_Strict):
    preset: Literal["aimlapi", "openai", "vllm", "llamacpp", "local"] = "aimlapi"
    """Named server: sets base_url, api_key_env and structured_output unless given here."""
    base_url: str | None = None
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


class PricingSection(_Strict):
    input_per_million: float = Field(ge=0)
    """USD per million prompt tokens, used when the server reports no cost."""
    output_per_million: float = Field(ge=0)
    """USD per million completion tokens (reasoning included)."""


class ExecutorSection(_Strict):
    kind: Literal["local", "ray"] = "local"
    """Where requests are sent from: this process, or tasks on a Ray cluster (``pip install 'seedbatch[ray]'``)."""
    address: str | None = None
    """Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); unset: $RAY_ADDRESS, else a local Ray."""
    workers: int = Field(default=2, ge=1, le=10_000)
    """Shards: the selected requests are split into this many by request hash, one Ray task each."""


class JobSpec(_Strict):
    job: JobSection
    model: ModelSection = Field(default_factory=ModelSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    media: MediaSection = Field(default_factory=MediaSection)
    output: OutputSection = Field(default_factory=OutputSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    endpoint: EndpointSection = Field(default_factory=EndpointSection)
    pricing: PricingSection | None = None
    """Price table override; a bundled table is used for known models."""
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    evaluation: EvaluationSpec | None = None
    """Right answers to score the output against (``pipeline.evaluation``); printed at the end of a run."""

    source: Path | None = Field(default=None, exclude=True)
    """The job file this spec came from (not a TOML key)."""
    source_sha256: str | None = Field(default=None, exclude=True)
    _objects: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> JobSpec:
        objects = dict((info.context or {}).get("objects", {}))
        self._objects = objects
        for key in ("output", "run_output"):
            value = getattr(self.job, key)
            if value is not None and output_format(str(value)) is None:
                shown = objects.get(key, str(value))
                raise ValueError(
                    f"job.{key} {shown!r}: unknown output format {Path(str(value)).suffix or '(none)'!r}; "
                    f"end the name in {', '.join(OUTPUT_SUFFIXES[:-1])} or {OUTPUT_SUFFIXES[-1]}"
                )
        if self.output.format == "json_schema" and self.output.schema_ is None:
            raise ValueError("output.format = 'json_schema' needs output.schema (a file path or a table)")
        if self.job.run_output is not None:
            try:
                self.job.run_output.format(date="2026-01-01", run_id="20260101T000000Z-abcdef")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"job.run_output {self.job.run_output!r}: only {{date}} and {{run_id}} may be used ({exc!r})"
                ) from None
        if self.prompt.user is not None and self.prompt.messages_column is not None:
            raise ValueError(
                "prompt.user and prompt.messages_column: a row's messages come from one of them; remove one"
            )
        if self.job.input_format == "openai_batch":
            if self.prompt.user is not None or self.prompt.messages_column is not None:
                raise ValueError(
                    "job.input_format = 'openai_batch' sends each line's body.messages; "
                    "remove prompt.user and prompt.messages_column"
                )
            if self.media.image_columns or self.media.video_columns:
                raise ValueError("job.input_format = 'openai_batch': images go inside body.messages; remove [media]")
        if self.prompt.messages_column is not None and (self.media.image_columns or self.media.video_columns):
            raise ValueError(
                "prompt.messages_column: images and video go inside the messages (image_url/video_url parts); "
                "remove media.image_columns/video_columns"
            )
        if self.job.batch_output is not None and self.job.batch_output.suffix.lower() != ".jsonl":
            raise ValueError(f"job.batch_output '{self.job.batch_output}' must end in .jsonl")
        if self.limits.shared_limiter is not None and self.limits.rpm is None and self.limits.tpm is None:
            raise ValueError("limits.shared_limiter shares limits.rpm/limits.tpm: set at least one of them")
        if self.endpoint.preset == "local" and self.endpoint.base_url and not is_loopback(self.endpoint.base_url):
            raise ValueError(
                "endpoint.preset = 'local' is the built-in server on this machine; its base_url may only be a "
                "loopback address (a `seedbatch serve`): remove endpoint.base_url or choose another preset"
            )
        m = self.model
        context = self.context_tokens
        if context is not None and m.max_tokens >= context:
            raise ValueError(
                f"model.max_tokens = {m.max_tokens} leaves no room for a prompt in the model's context of {context} "
                "tokens (model.context_tokens): lower model.max_tokens"
            )
        if m.tools is None and (m.tool_choice is not None or m.parallel_tool_calls is not None):
            key = "model.tool_choice" if m.tool_choice is not None else "model.parallel_tool_calls"
            raise ValueError(f"{key} needs model.tools (the functions the model may call)")
        if m.tools is not None and self.output.format != "text":
            raise ValueError(
                f"model.tools with output.format = {self.output.format!r}: an answer that calls a function has no "
                'JSON content; force the function with model.tool_choice = "<name>" (its arguments become the '
                "typed columns) and remove output.format"
            )
        if m.tools is not None and self.structured_output == "tool":
            raise ValueError(
                "endpoint.structured_output = 'tool' sends output.schema as the one function the model must call; "
                "remove model.tools, or force one of your functions with model.tool_choice instead"
            )
        if self.limits.shared_limiter is not None and self.executor.kind == "ray":
            raise ValueError(
                "limits.shared_limiter is for local runs; a Ray run already holds one limit for the whole cluster"
            )
        return self

    # Derived values, one place each.
    @property
    def objects(self) -> dict[str, str]:
        """``job.input``/``job.output``/``job.run_output`` given as object URIs, by key; their fields hold the
        local copies' paths."""
        return dict(self._objects)

    @property
    def output_location(self) -> str:
        """The output as the user named it: the object URI, or the local path."""
        return self._objects.get("output", str(self.job.output))

    @property
    def name(self) -> str:
        if self.job.name:
            return self.job.name
        return self.source.stem if self.source else "job"

    @property
    def ledger_path(self) -> Path:
        return self.job.ledger or self.job.output.with_name(self.job.output.name + ".ledger.sqlite")

    @property
    def manifest_path(self) -> Path:
        return self.job.output.with_name(self.job.output.name + ".manifest.json")

    @property
    def lock_path(self) -> Path:
        return self.ledger_path.with_name(self.ledger_path.name + ".lock")

    @property
    def shards_dir(self) -> Path:
        """Where a Ray run's shards keep their own ledgers until they are merged into the main one."""
        return self.ledger_path.with_name(self.ledger_path.name + ".shards")

    def preset_value(self, key: str) -> Any:
        explicit = getattr(self.endpoint, key, None)
        return explicit if explicit is not None else PRESETS[self.endpoint.preset].get(key)

    @property
    def base_url(self) -> str | None:
        return self.preset_value("base_url")  # type: ignore[no-any-return]

    @property
    def endpoint_key(self) -> str:
        """Where answers come from, as the ledger keys them: ``local`` or the normalized base URL.

        An answer is reused only for the endpoint that gave it, so a dry run on the local API never fills
        a real job's output, and two servers never share answers.
        """
        url = self.base_url
        return LOCAL_ENDPOINT if url is None else normalize_url(url)

    @property
    def context_tokens(self) -> int | None:
        explicit = self.model.context_tokens
        return explicit if explicit is not None else PRESETS[self.endpoint.preset].get("context_tokens")

    @property
    def api_key_env(self) -> str:
        return str(self.preset_value("api_key_env"))

    @property
    def structured_output(self) -> str:
        return str(self.preset_value("structured_output"))

    @property
    def key_required(self) -> bool:
        return bool(PRESETS[self.endpoint.preset].get("key_required", True))


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in {"localhost", "::1"} or host.startswith("127.")


def normalize_url(url: str) -> str:
    """``HTTPS://API.example.com:443/v1/`` → ``https://api.example.com/v1``: one key per server."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), parts.query, ""))


#: CLI flag name → (section, field). One table so flags and job keys keep one name.
OVERRIDES: dict[str, tuple[str, str]] = {
    "input": ("job", "input"),
    "output": ("job", "output"),
    "model": ("model", "name"),
    "rpm": ("limits", "rpm"),
    "tpm": ("limits", "tpm"),
    "concurrency": ("limits", "concurrency"),
    "base_url": ("endpoint", "base_url"),
    "max_cost": ("limits", "max_cost_usd"),
    "endpoint": ("endpoint", "preset"),
    "strict_inputs": ("media", "strict_inputs"),
    "executor": ("executor", "kind"),
    "ray_address": ("executor", "address"),
    "workers": ("executor", "workers"),
}


def _format_validation(err: ValidationError, path: Path | str) -> str:
    # A misspelled key is the likeliest cause of a missing one: say it first, not behind "(+1 more)".
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "schema_") or "(top level)"
    loc = loc.replace("schema_", "schema")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; every key is listed in README 'Jobs')"
    elif first["type"] == "missing":
        msg = "required key is missing"
    value = first.get("input")
    shown = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
    more = [".".join(str(p) for p in e["loc"]).replace("schema_", "schema") for e in errors[1:]]
    extra = f" (also: {', '.join(more[:3])}{', …' if len(more) > 3 else ''})" if more else ""
    return f"{path}: {loc}: {msg}{shown}{extra}"


#: Keys of a job file that hold file paths: resolved against the job file's folder.
PATH_KEYS = (
    ("job", "input"),
    ("job", "output"),
    ("job", "ledger"),
    ("job", "run_output"),
    ("job", "batch_output"),
    ("output", "schema"),
    ("model", "tools"),
    ("endpoint", "api_key_file"),
    ("limits", "shared_limiter_file"),
)


def expand_home(value: str) -> str:
    """``~/data.csv`` → ``/home/me/data.csv``, as a shell would; object URIs and other text unchanged."""
    return os.path.expanduser(value) if value.startswith("~") and not is_object_uri(value) else value


def _expand_paths(data: dict[str, Any]) -> None:
    """``~`` in a path setting means the home folder, whether written in the job file or given as a flag."""
    for section, key in PATH_KEYS:
        values = data.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = expand_home(values[key])


def _anchor_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Relative paths written in a job file mean "beside the job file", wherever the command runs.

    Object URIs are not paths: ``s3://bucket/key`` means the same object from any folder.
    """
    _expand_paths(data)
    for section, key in PATH_KEYS:
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        value = values.get(key)
        if isinstance(value, str) and value and not is_object_uri(value) and not Path(value).is_absolute():
            values[key] = os.path.normpath(base_dir / value)


#: Output formats by file extension: what ``job.output``, ``job.run_output`` and ``--output`` may end in.
OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")
#: Keys that may name an object (``s3://…``, ``gs://…``) instead of a local file.
OBJECT_KEYS = ("input", "output", "run_output")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def output_format(name: str) -> str | None:
    """``parquet``, ``csv`` or ``jsonl`` from a file name's extension; None for any other."""
    return OUTPUT_FORMATS.get(os.path.splitext(name)[1].lower())


def is_object_uri(value: str) -> bool:
    """``s3://bucket/key`` and the like (two letters or more before ``://``, so ``C:/x`` stays a path)."""
    return bool(_URI.match(value))


def objects_home() -> Path:
    """Where local copies of objects live, with the ledger and manifest of an object output beside them.

    A data folder (``$XDG_DATA_HOME/seedbatch``, else ``~/.local/share/seedbatch``), not a cache: the
    ledger there holds answers that were paid for, and cache cleaners delete caches.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "seedbatch"


def local_copy_path(uri: str) -> Path:
    """``s3://bucket/a/b.csv`` → ``<objects_home>/s3/bucket/a/b.csv``: one local place per object, the same
    from any folder, so a rerun finds the ledger of the run before it. The query (pyarrow options) is not
    part of the name; ``..`` cannot climb out."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise SpecError(f"{uri}: not a valid object URI (the part after :// is bucket/key)") from None
    if port is not None:
        host = f"{host}_{port}"
    segments = [s for s in parts.path.split("/") if s not in ("", ".", "..")]
    return objects_home().joinpath(parts.scheme.lower(), host or "_", *segments)


def _localize_objects(data: dict[str, Any]) -> dict[str, str]:
    """Replace object URIs in ``[job]`` by their local copies' paths; return the URIs by key."""
    job = data.get("job")
    if not isinstance(job, dict):
        return {}
    objects: dict[str, str] = {}
    for key in OBJECT_KEYS:
        value = job.get(key)
        if isinstance(value, str) and is_object_uri(value):
            objects[key] = value
            job[key] = str(local_copy_path(value))
    return objects


def spec_from_dict(
    data: dict[str, Any],
    source: Path | str = "<job>",
    overrides: dict[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
) -> JobSpec:
    """Validate a parsed job, applying CLI overrides first so they are checked like the file.

    With ``base_dir`` the file's relative paths are anchored there; overrides keep theirs (relative to
    the current directory). ``--endpoint local`` drops the file's base_url: a dry run must never reach
    the server the job names.
    """
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if base_dir is not None:
        _anchor_paths(data, base_dir)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides.get("endpoint") == "local" and "base_url" not in overrides and isinstance(data.get("endpoint"), dict):
        data["endpoint"].pop("base_url", None)
    for flag, value in overrides.items():
        section, key = OVERRIDES[flag]
        data.setdefault(section, {})[key] = value
    _expand_paths(data)
    objects = _localize_objects(data)
    try:
        spec = JobSpec.model_validate(data, context={"objects": objects})
    except ValidationError as err:
        raise SpecError(_format_validation(err, source)) from None
    if spec.job.input_format == "table" and spec.prompt.user is None and spec.prompt.messages_column is None:
        key = "prompt.user" if isinstance(data.get("prompt"), dict) else "prompt"
        raise SpecError(
            f"{source}: {key}: required key is missing (give prompt.user, or name a column of message lists "
            "with prompt.messages_column)"
        )
    return spec


def load_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job file; every problem is a one-line ``SpecError`` naming file and key."""
    p = Path(expand_home(os.fspath(path)))
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{p}: job file not found (give a path like jobs/demo.toml)") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read job file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: not valid TOML: {exc}") from None
    spec = spec_from_dict(data, p, overrides, base_dir=p.parent)
    digest = hashlib.sha256(raw + json.dumps(overrides or {}, sort_keys=True, default=str).encode()).hexdigest()
    return spec.model_copy(update={"source": p, "source_sha256": digest})
