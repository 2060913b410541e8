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
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from pipeline.errors import SpecError
from pipeline.job.evaluation import EvaluationSpec
from pipeline.job.objects import is_object_uri, local_copy_path
from pipeline.job.sections import (
    DEFAULT_MODEL,
    OWN_FIELDS,
    EndpointSection,
    ExecutorSection,
    FewShot,
    JobSection,
    LimitsSection,
    MediaSection,
    ModelSection,
    OutputSection,
    PricingSection,
    PromptSection,
    StrictModel,
)

#: The job, its loader and its sections (defined in ``sections``): callers import them all from here.
__all__ = [
    "DEFAULT_MODEL",
    "LOCAL_ENDPOINT",
    "LOCAL_MODEL",
    "OBJECT_KEYS",
    "OUTPUT_FORMATS",
    "OUTPUT_SUFFIXES",
    "OVERRIDES",
    "OWN_FIELDS",
    "PATH_KEYS",
    "PRESETS",
    "EndpointSection",
    "ExecutorSection",
    "FewShot",
    "JobSection",
    "JobSpec",
    "LimitsSection",
    "MediaSection",
    "ModelSection",
    "OutputSection",
    "PricingSection",
    "PromptSection",
    "expand_home",
    "is_loopback",
    "is_object_uri",
    "load_spec",
    "normalize_url",
    "output_format",
    "spec_from_dict",
]
from pipeline.job.stages import EscalationSection, VotesSection, asks_logprobs

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


class JobSpec(StrictModel):
    """A whole job: one field per ``[section]`` of the job file, checked together (``_check``)."""

    job: JobSection
    """``[job]``: the input, the output and the ledger."""
    model: ModelSection = Field(default_factory=ModelSection)
    """``[model]``: the model and the request's sampling fields."""
    prompt: PromptSection = Field(default_factory=PromptSection)
    """``[prompt]``: the messages, from templates or a column of message lists."""
    media: MediaSection = Field(default_factory=MediaSection)
    """``[media]``: image and video columns."""
    output: OutputSection = Field(default_factory=OutputSection)
    """``[output]``: what the model must answer (text, JSON, a schema) and how invalid answers are re-asked."""
    limits: LimitsSection = Field(default_factory=LimitsSection)
    """``[limits]``: rates, concurrency, retries, timeouts and the budget."""
    endpoint: EndpointSection = Field(default_factory=EndpointSection)
    """``[endpoint]``: the server, its key and its structured-output dialect."""
    pricing: PricingSection | None = None
    """Price table override; a bundled table is used for known models."""
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    evaluation: EvaluationSpec | None = None
    """Right answers to score the output against (``pipeline.quality.evaluate``); printed at the end of a run."""
    # Left out of dumps (``exclude``): a job without them digests the same as if these keys did not exist,
    # and a job with them is never skipped as up to date (``pipeline.quality.voting`` rebuilds its output
    # from its stages).
    votes: VotesSection | None = Field(default=None, exclude=True)
    """k samples per row and their majority (``pipeline.answers.votes``)."""
    escalation: EscalationSection | None = Field(default=None, exclude=True)
    """Doubtful rows sent again with stronger settings (``pipeline.answers.votes``, ``pipeline.quality.voting``)."""

    source: Path | None = Field(default=None, exclude=True)
    """The job file this spec came from (not a TOML key)."""
    source_sha256: str | None = Field(default=None, exclude=True)
    """sha256 of the job file's bytes and the CLI overrides: the manifest's record of what ran."""
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
        esc = self.escalation
        if esc is not None and esc.when_confidence_below is not None and not asks_logprobs(self.model.extra):
            raise ValueError(
                "escalation.when_confidence_below needs [model.extra] logprobs = true: confidence comes from "
                "the token log-probabilities the server returns only when asked"
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


def output_format(name: str) -> str | None:
    """``parquet``, ``csv`` or ``jsonl`` from a file name's extension; None for any other."""
    return OUTPUT_FORMATS.get(os.path.splitext(name)[1].lower())


#: Keys that may name an object (``s3://…``, ``gs://…``) instead of a local file.
OBJECT_KEYS = ("input", "output", "run_output")


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
