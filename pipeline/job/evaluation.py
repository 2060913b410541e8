"""The job's ``[evaluation]`` section: where the right answers are and which output field each one scores.

Kept free of polars and file reads: the job file imports it. What can only be checked against files
(the column exists, the gold file reads) is ``gold.check``'s, run before anything is sent.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EvaluationSpec(BaseModel):
    """``[evaluation]``: a gold column of the input, or a gold file joined on ``job.id_column``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gold_column: str | None = None
    """A text job: the column holding the right answer, in the input (or in ``gold_file`` when given)."""
    gold_file: Path | None = None
    """A Parquet, CSV or JSONL file of right answers with the ``job.id_column`` column, joined on it; relative
    to the job file. Unset: the right answers are columns of the input."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Schema jobs: output field → gold column, e.g. ``{ sentiment = "label", stars = "stars_true" }``."""
    max_classes: int = Field(default=30, ge=2, le=1000)
    """A string field whose right answers take at most this many values is scored as classes (precision,
    recall, confusion matrix); above it, only exact and normalised match."""

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if self.gold_column is None and not self.fields:
            raise ValueError(
                'name the right answers: gold_column = "<column>" (a text job) or fields = { <field> = "<column>" }'
            )
        if self.gold_column is not None and self.fields:
            raise ValueError("gold_column scores a text answer, fields a schema's fields: give one of them")
        if self.gold_file is not None and self.gold_file.suffix.lower() not in GOLD_SUFFIXES:
            raise ValueError(f"gold_file {str(self.gold_file)!r}: end the name in .parquet, .csv or .jsonl")
        return self


GOLD_SUFFIXES = (".parquet", ".pq", ".csv", ".jsonl", ".ndjson")
