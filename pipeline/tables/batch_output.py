"""The output Parquet → an OpenAI Batch-style output file (``job.batch_output``), so tools that read
Batch results read seedbatch's unchanged.

One line per row, in input order, shaped as OpenAI's Batch output file (the ``BatchRequestOutput`` object
of its API reference)::

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…",
     "body": {chat.completion}}, "error": null}

A row the server answered (``ok``, ``invalid_output``, ``refused``, ``truncated``) has ``response`` with
status 200 and the answer as a ``chat.completion`` body (what ``openai.types.chat.ChatCompletion``
validates: ``created``, ``message.refusal`` and ``message.tool_calls`` included); a row the server refused
with an HTTP status (``error_kind`` ``http_400`` …) has that status and ``{"error": <the server's error
object, unchanged>}`` as its body, as OpenAI writes it; a row that got no answer (timeout, bad messages,
``skipped``, ``too_long``, ``pending``) has ``response: null`` and ``error: {"code", "message"}``.
``request_id`` is the server's ``x-request-id`` header. It is written from the Parquet file just written
(a batch at a time, temp file then rename), with the ledger's ``DETAIL_COLUMNS`` of each row's answer
(``details``), so the two always agree.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.answers.record import BATCH_COLUMNS
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow.parquet as pq
else:  # only openai_batch jobs write Batch files (see lazy)
    pq = lazy("pyarrow.parquet")

#: Statuses of rows the server answered with a 200.
ANSWERED = frozenset({"ok", "invalid_output", "refused", "truncated"})
#: ``created``, ``refusal``, ``request_id``, ``server_error`` of an answer (``answers.record.DETAIL_COLUMNS``).
Details = tuple[int | None, str | None, str | None, str | None]
#: Request hashes → the details of those answered (``Ledger.details``).
DetailLookup = Callable[[Sequence[str]], dict[str, Details]]
_NO_DETAILS: Details = (None, None, None, None)


def batch_line(custom_id: str, row: dict[str, Any], details: Details = _NO_DETAILS) -> dict[str, Any]:
    """One output row as one Batch output line."""
    seed = f"{custom_id}\x00{row.get('request_hash') or ''}".encode()
    line_id = "batch_req_" + hashlib.blake2b(seed, digest_size=12).hexdigest()
    status, kind = row["status"], row.get("error_kind") or ""
    request_id, server_error = details[2], details[3]
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if status in ANSWERED:
        response = {"status_code": 200, "request_id": request_id, "body": completion(row, details)}
    elif kind.startswith("http_") and kind[5:].isdigit():
        if server_error is not None:
            said = orjson.loads(server_error)
        else:  # a ledger entry without the server's error object (an older seedbatch's): its message, unprefixed
            text = str(row.get("error") or "").removeprefix(f"HTTP {kind[5:]}: ")
            said = {"message": text, "type": kind, "param": None, "code": None}
        response = {"status_code": int(kind[5:]), "request_id": request_id, "body": {"error": said}}
    else:
        message = row.get("error")
        if status == "pending":
            message = "not answered: the run stopped before this row was sent; run the job again"
        error = {"code": kind or status, "message": message}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": error}


def completion(row: dict[str, Any], details: Details = _NO_DETAILS) -> dict[str, Any]:
    """The ``chat.completion`` body of an answered row. Usage is summed over the row's attempts (re-asks)."""
    message: dict[str, Any] = {"role": "assistant", "content": row.get("content"), "refusal": details[1]}
    if row.get("reasoning_content") is not None:
        message["reasoning_content"] = row["reasoning_content"]
    if row.get("tool_calls"):
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in row["tool_calls"]
        ]
    usage: dict[str, Any] = {k: row.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if row.get("reasoning_tokens") is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": row["reasoning_tokens"]}
    if row.get("cached_tokens") is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": row["cached_tokens"]}
    return {
        "id": row.get("response_id"),
        "object": "chat.completion",
        "created": details[0],
        "model": row.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": row.get("finish_reason"), "logprobs": None}],
        "usage": usage,
    }


def _batches(output: Path, id_column: str | None) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """(id, row) pairs, 2,000 rows at a time: one ledger lookup per batch."""
    source = pq.ParquetFile(output, pre_buffer=False)  # pre-buffering caches every row group read
    names = [*BATCH_COLUMNS, *([id_column] if id_column and id_column not in BATCH_COLUMNS else [])]
    for batch in source.iter_batches(batch_size=2_000, columns=names):
        yield [((row.get(id_column) if id_column else None), row) for row in batch.to_pylist()]


def write_batch_output(
    path: Path,
    output: Path,
    id_column: str | None,
    row_numbers: Sequence[int] | None = None,
    details: DetailLookup | None = None,
) -> int:
    """Write ``path`` from the output Parquet; returns the lines written.

    ``custom_id`` is the row's ``id_column`` value (an OpenAI Batch input's own ``custom_id``), else its
    row number in the input (``row_numbers`` when a ``--sample`` picked the rows). ``details`` looks up
    what the output has no column for (``created``, ``refusal``, ``x-request-id``, a server's error object).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for rows in _batches(output, id_column):
                hashes = [row["request_hash"] for _, row in rows if row.get("request_hash")]
                found = details(hashes) if details is not None and hashes else {}
                for key, row in rows:
                    number = row_numbers[n] if row_numbers is not None else n
                    said = found.get(row.get("request_hash") or "", _NO_DETAILS)
                    f.write(orjson.dumps(batch_line(str(number if key is None else key), row, said)) + b"\n")
                    n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
