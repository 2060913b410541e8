"""The evaluation document as terminal tables (rich): a summary per field, per-class scores, confusion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


#: Summary columns: heading, the field's key, how it is shown. A column no field has is left out.
_SUMMARY: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("n", "n", str),
    ("no answer", "n_without_answer", str),
    ("accuracy", "accuracy", _pct),
    ("macro-F1", "macro_f1", _pct),
    ("normalised", "normalised_match", _pct),
    ("MAE", "mean_absolute_error", _num),
    ("cost", "cost_usd", _usd),
    ("per correct", "cost_per_correct_usd", _usd),
)


def summary_table(scores: dict[str, Any], title: str) -> Table:
    """One line per field: what a reader looks at first."""
    table = Table(title=title, title_justify="left")
    table.add_column("field")
    shown = [c for c in _SUMMARY if any(c[1] in s for s in scores["fields"].values())]
    for heading, _, _ in shown:
        table.add_column(heading, justify="right")
    for field, s in scores["fields"].items():
        table.add_row(field, *(show(s.get(key)) for _, key, show in shown))
    return table


def class_table(field: str, s: dict[str, Any]) -> Table:
    table = Table(title=f"{field}: per class", title_justify="left")
    for name in ("class", "precision", "recall", "F1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for label, c in s["classes"].items():
        table.add_row(label, _pct(c["precision"]), _pct(c["recall"]), _pct(c["f1"]), str(c["support"]))
    return table


def confusion_table(field: str, s: dict[str, Any]) -> Table:
    confusion = s["confusion"]
    table = Table(title=f"{field}: confusion (rows: right answer, columns: answer)", title_justify="left")
    table.add_column("")
    for column in confusion["columns"]:
        table.add_column(column, justify="right")
    for i, (label, row) in enumerate(zip(confusion["rows"], confusion["matrix"], strict=True)):
        table.add_row(label, *(f"[bold]{n}[/bold]" if j == i else str(n) for j, n in enumerate(row)))
    return table


def render(document: dict[str, Any]) -> Group:
    """Everything ``seedbatch eval`` prints: the summary, then each field's classes and confusion, then stages."""
    parts: list[Any] = [summary_table(document, f"evaluation of {document['output']} ({document['rows']} rows)")]
    for field, s in document["fields"].items():
        if "classes" in s:
            parts += [class_table(field, s), confusion_table(field, s)]
    for stage, scores in (document.get("stages") or {}).items():
        parts.append(summary_table(scores, f"stage {stage} ({scores['rows']} rows)"))
    return Group(*parts)


def print_document(document: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(render(document))
