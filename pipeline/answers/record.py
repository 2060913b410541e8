"""One answer, defined once: each field's name, output type, SQLite type and ``Outcome`` attribute.

``ANSWER_FIELDS`` is the only list of what an answer holds. The ledger's table and its SQL, the mapping
between a ledger row and an ``Outcome`` (by name), the output's answer columns with their dtypes and the
columns an OpenAI Batch output line reads are all derived from it, so adding a field is one line here.
The table's order is the output's column order (what users see after their input's columns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import orjson
import polars as pl

from pipeline.records import Outcome, ToolCall, Usage


def calls_text(calls: tuple[ToolCall, ...] | None) -> str | None:
    """Function calls as the ledger keeps them: JSON ``[{id, name, arguments}]`` (the output column's fields)."""
    if calls is None:
        return None
    return orjson.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]).decode()


def calls_of(text: str | None) -> tuple[ToolCall, ...] | None:
    """``calls_text`` read back."""
    if text is None:
        return None
    return tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in orjson.loads(text))


def _count(value: int | None) -> int:
    """A count column added to an older ledger is empty for its old answers: none counted."""
    return value or 0


@dataclass(frozen=True, slots=True)
class AnswerField:
    """One field of an answer, wherever it is kept."""

    name: str
    """The column's name in the ledger, the output and the README (one name per concept)."""
    dtype: pl.DataType
    """Its type in the output; a nested type is kept in the ledger as JSON text (``stored_dtype``)."""
    sql: str
    """Its SQLite type in the ledger's ``answers`` table."""
    attribute: str
    """Where it sits in an ``Outcome`` (``usage.<name>`` for the token and cost counts)."""
    output: bool = True
    """An output column; False: kept in the ledger for the Batch output lines only (``DETAIL_COLUMNS``)."""
    batch: bool = False
    """An OpenAI Batch output line is built from it (``batch_output``)."""
    paid: bool = False
    """What the request cost: zero on a row that reused an identical earlier row's answer, so the output's
    cost columns sum to what was paid."""
    to_sql: Callable[[Any], Any] | None = None
    from_sql: Callable[[Any], Any] | None = None

    @property
    def stored_dtype(self) -> pl.DataType:
        """The type of the value as the ledger hands it over: nested values are JSON text there."""
        return pl.String() if self.dtype.is_nested() else self.dtype

    @property
    def zero(self) -> int | float | None:
        """The value a ``paid`` field has on a row that paid nothing."""
        if not self.paid:
            return None
        return 0.0 if self.dtype == pl.Float64 else 0


#: The ``tool_calls`` column: the answer's function calls as sent, arguments as the model's JSON text.
TOOL_CALLS_DTYPE = pl.List(pl.Struct({"id": pl.String(), "name": pl.String(), "arguments": pl.String()}))

_S, _I, _F = pl.String(), pl.Int64(), pl.Float64()

ANSWER_FIELDS: tuple[AnswerField, ...] = (
    AnswerField("content", _S, "TEXT", "content", batch=True),
    AnswerField("reasoning_content", _S, "TEXT", "reasoning_content", batch=True),
    AnswerField("tool_calls", TOOL_CALLS_DTYPE, "TEXT", "tool_calls", batch=True, to_sql=calls_text, from_sql=calls_of),
    AnswerField("finish_reason", _S, "TEXT", "finish_reason", batch=True),
    AnswerField("model", _S, "TEXT", "model", batch=True),
    AnswerField("response_id", _S, "TEXT", "response_id", batch=True),
    AnswerField("prompt_tokens", _I, "INTEGER", "usage.prompt_tokens", batch=True, paid=True),
    AnswerField("completion_tokens", _I, "INTEGER", "usage.completion_tokens", batch=True, paid=True),
    AnswerField("total_tokens", _I, "INTEGER", "usage.total_tokens", batch=True, paid=True),
    AnswerField("reasoning_tokens", _I, "INTEGER", "usage.reasoning_tokens", batch=True, paid=True),
    AnswerField("cached_tokens", _I, "INTEGER", "usage.cached_tokens", batch=True, paid=True),
    AnswerField("credits_used", _F, "REAL", "usage.credits_used", paid=True),
    AnswerField("usd_spent", _F, "REAL", "usage.usd_spent", paid=True),
    AnswerField("status", _S, "TEXT", "status", batch=True),
    AnswerField("error", _S, "TEXT", "error", batch=True),
    AnswerField("error_kind", _S, "TEXT", "error_kind", batch=True),
    AnswerField("attempts", _I, "INTEGER", "attempts", paid=True, from_sql=_count),
    AnswerField("unconfirmed_attempts", _I, "INTEGER", "unconfirmed_attempts", paid=True, from_sql=_count),
    AnswerField("latency_ms", _F, "REAL", "latency_ms"),
    # The answer's mean token probability from the server's log-probabilities (``validator.confidence_of``).
    AnswerField("confidence", _F, "REAL", "confidence"),
    AnswerField("request_hash", _S, "TEXT", "request_hash", batch=True),
    # What the server said beyond the output's columns, kept so a Batch output line can carry it as sent:
    # the answer's ``created`` and ``message.refusal``, the response's ``x-request-id``, an HTTP error's
    # ``error`` object (JSON text).
    AnswerField("created", _I, "INTEGER", "created", output=False),
    AnswerField("refusal", _S, "TEXT", "refusal", output=False),
    AnswerField("request_id", _S, "TEXT", "request_id", output=False),
    AnswerField("server_error", _S, "TEXT", "server_error", output=False),
)

#: The key: the ledger keeps it in its own column, not among the answer's values.
KEY = "request_hash"
#: The output's answer columns with their types, in output order (``request_hash`` last).
OUTPUT_COLUMNS: dict[str, pl.DataType] = {f.name: f.dtype for f in ANSWER_FIELDS if f.output}
#: The fields the ledger keeps per answer besides the key: the output's, then the details.
STORED_FIELDS = tuple(f for f in ANSWER_FIELDS if f.name != KEY)
#: The output's answer columns the ledger hands to the writer, in output order (the key comes separately).
ANSWER_COLUMNS = tuple(f.name for f in STORED_FIELDS if f.output)
#: The ledger's columns that are not output columns: only ``job.batch_output`` reads them.
DETAIL_COLUMNS = tuple(f.name for f in STORED_FIELDS if not f.output)
#: The output columns a Batch output line is built from.
BATCH_COLUMNS = tuple(f.name for f in ANSWER_FIELDS if f.batch)

_BY_NAME = {f.name: f for f in ANSWER_FIELDS}
#: Every stored attribute in one C-level call: ``Ledger.add`` runs once per answer, on the event loop.
_STORED_GETTER = attrgetter(*(f.attribute for f in STORED_FIELDS))
_ENCODED = tuple((i, f.to_sql) for i, f in enumerate(STORED_FIELDS) if f.to_sql is not None)


def stored_values(outcome: Outcome) -> list[Any]:
    """An outcome's ``STORED_FIELDS`` values, as the ledger keeps them."""
    values = list(_STORED_GETTER(outcome))
    for i, encode in _ENCODED:
        values[i] = encode(values[i])
    return values


def outcome_of(values: Mapping[str, Any]) -> Outcome:
    """An ``Outcome`` from ledger values by column name; a field absent from ``values`` keeps its default."""
    top: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    for name, stored in values.items():
        field = _BY_NAME[name]
        group, _, attribute = field.attribute.rpartition(".")
        (usage if group == "usage" else top)[attribute] = stored if field.from_sql is None else field.from_sql(stored)
    return Outcome(**top, usage=Usage(**usage))


def reused(values: Sequence[Any]) -> tuple[Any, ...]:
    """``ANSWER_COLUMNS`` values of an answer as a row that reused it shows them: its ``paid`` fields zero."""
    return tuple(value if zero is None else zero for zero, value in zip(_ZEROS, values, strict=True))


_ZEROS = tuple(_BY_NAME[name].zero for name in ANSWER_COLUMNS)
