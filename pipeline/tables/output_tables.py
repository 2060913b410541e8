"""Reading an output file back: the rows ``seedbatch show`` prints, and the totals ``plan`` and ``status`` use.

Outputs are written by ``writer``; these only read them, so a command that inspects a finished run never
loads the write path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from pipeline.errors import InputError
from pipeline.job.spec import OUTPUT_SUFFIXES, output_format
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
else:  # only the totals of a Parquet output need pyarrow (see lazy)
    pa, pc, pq = lazy("pyarrow"), lazy("pyarrow.compute"), lazy("pyarrow.parquet")


def read_output(path: Path, only_status: str | None, rows: int) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    """The first ``rows`` rows of an output file (with ``only_status``: of that status), and rows by status.

    What ``seedbatch show`` prints. A CSV output's list and struct columns come back as their JSON text.
    """
    fmt = output_format(path.name)
    if fmt is None:
        raise InputError(f"{path}: not an output file (show reads {_suffixes()})")
    try:
        if fmt == "parquet":
            lf = pl.scan_parquet(path)
        elif fmt == "csv":
            lf = pl.scan_csv(path, infer_schema_length=10_000)
        else:
            lf = pl.scan_ndjson(path, infer_schema_length=10_000)
        picked = lf.filter(pl.col("status") == only_status) if only_status else lf
        df = picked.head(rows).collect()
        counts = [] if df.height else list(lf.group_by("status").len().sort("status").collect().iter_rows())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{path}: cannot read {fmt} output ({str(exc).strip().splitlines()[0]})") from None
    return df, counts


def read_output_at(output: str, only_status: str | None, rows: int) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    """``read_output`` of an output named by a path or an object URI (fetched into a temporary folder that is
    gone when this returns)."""
    import tempfile

    from pipeline.job.spec import is_object_uri

    with tempfile.TemporaryDirectory(prefix="seedbatch-show-") as tmp:
        if is_object_uri(output):
            from pipeline.tables import storage

            path = storage.download(output, Path(tmp) / Path(output.split("?", 1)[0]).name, what="the OUTPUT argument")
        else:
            path = Path(output)
            if not path.exists():
                raise InputError(f"{output}: no such output file (run the job first)")
        return read_output(path, only_status, rows)


def output_totals(path: Path) -> tuple[dict[str, int], int, int, float]:
    """Rows by status and the prompt tokens, completion tokens and USD an output's rows carry.

    A row that reused an identical row's answer carries zero usage (``answers_for_rows``), so these sums
    are what was paid. Read in batches of four columns: bounded memory at any size.
    """
    counts: dict[str, int] = {}
    prompt = completion = 0
    usd = 0.0
    columns = ["status", "prompt_tokens", "completion_tokens", "usd_spent"]
    try:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=262_144, columns=columns):
            for item in pc.value_counts(batch.column(0)).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
            prompt += pc.sum(batch.column(1)).as_py() or 0
            completion += pc.sum(batch.column(2)).as_py() or 0
            usd += pc.sum(batch.column(3)).as_py() or 0.0
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read the output: {str(exc).splitlines()[0]}") from None
    return counts, prompt, completion, usd


def _suffixes() -> str:
    return f"{', '.join(OUTPUT_SUFFIXES[:-1])} or {OUTPUT_SUFFIXES[-1]}"
