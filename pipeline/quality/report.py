"""The evaluation as one self-contained HTML page: tables, confusion heat maps and per-class bars.

Charts are matplotlib figures rendered to SVG and written inline, fonts as paths, so the page opens
anywhere without a network or a font: it references no external URL. matplotlib is imported here only,
so ``seedbatch eval`` without ``--report`` (and every run) never loads it.
"""

from __future__ import annotations

import html
import io
import os
import re
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts svg { max-width: 100%; height: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _svg(figure: Any) -> str:
    """The figure as an inline ``<svg>`` element (the XML prolog and DOCTYPE dropped)."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    # No metadata block: it names matplotlib's site and the date, and the page should be the same every time.
    metadata = {"Creator": None, "Date": None, "Format": None, "Type": None}
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata=metadata)
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def heat_map(field: str, confusion: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    rows, columns, matrix = confusion["rows"], confusion["columns"], confusion["matrix"]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.6 * len(rows)))
    image = axes.imshow(matrix, cmap="Blues", aspect="auto")
    axes.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), labels=rows)
    axes.set_xlabel("answer")
    axes.set_ylabel("right answer")
    axes.set_title(f"{field}: confusion")
    peak = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            axes.text(j, i, str(n), ha="center", va="center", color="white" if n > peak / 2 else "black")
    figure.colorbar(image, ax=axes)
    return _svg(figure)


def class_bars(field: str, classes: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    labels = list(classes)
    width = 0.27
    figure, axes = plt.subplots(figsize=(1.5 + 1.1 * len(labels), 3.2))
    for k, metric in enumerate(("precision", "recall", "f1")):
        axes.bar(
            [i + (k - 1) * width for i in range(len(labels))], [classes[c][metric] for c in labels], width, label=metric
        )
    axes.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_title(f"{field}: per class")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # beside the bars, never over them
    return _svg(figure)


def _summary(scores: dict[str, Any]) -> str:
    head = (
        "<tr><th>field</th><th>n</th><th>no answer</th><th>accuracy</th><th>macro-F1</th><th>normalised match</th>"
        "<th>mean abs. error</th><th>cost</th><th>cost per correct</th></tr>"
    )
    rows = []
    for field, s in scores["fields"].items():
        mae = s.get("mean_absolute_error")
        rows.append(
            f"<tr><td>{html.escape(field)}</td><td>{s['n']}</td><td>{s['n_without_answer']}</td>"
            f"<td>{_pct(s['accuracy'])}</td><td>{_pct(s.get('macro_f1'))}</td><td>{_pct(s.get('normalised_match'))}</td>"
            f"<td>{'-' if mae is None else f'{mae:.4g}'}</td><td>{_usd(s['cost_usd'])}</td>"
            f"<td>{_usd(s['cost_per_correct_usd'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _classes(s: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_pct(c['precision'])}</td><td>{_pct(c['recall'])}</td>"
        f"<td>{_pct(c['f1'])}</td><td>{c['support']}</td></tr>"
        for label, c in s["classes"].items()
    )
    return f"<table>{head}{rows}</table>"


def render(document: dict[str, Any]) -> str:
    """The page's HTML text."""
    import matplotlib

    matplotlib.use("svg", force=True)  # no display, no GUI toolkit: the page is the only output
    matplotlib.rcParams["svg.fonttype"] = "path"  # text as shapes: the page needs no font
    matplotlib.rcParams["svg.hashsalt"] = "seedbatch"  # the same evaluation draws the same page
    title = f"Evaluation of {document['output']}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{document['rows']} rows; cost ${document['cost_usd']:.6f}; job "
        f"{html.escape(str(document.get('job_file')))}. Rows without a usable answer count as wrong "
        "(the “(no answer)” column).</p>",
        _summary(document),
    ]
    for field, s in document["fields"].items():
        if "classes" not in s:
            continue
        parts += [
            f"<h2>{html.escape(field)}</h2>",
            _classes(s),
            f"<div class='charts'>{heat_map(field, s['confusion'])}{class_bars(field, s['classes'])}</div>",
        ]
    for stage, scores in (document.get("stages") or {}).items():
        parts += [f"<h2>Stage {html.escape(stage)} ({scores['rows']} rows)</h2>", _summary(scores)]
    body = "\n".join(parts)
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
    # matplotlib names its SVG namespace and links (w3.org, xlink): identifiers, never fetched. Anything else
    # that looks like a link would be fetched by a browser, and a self-contained page has none.
    assert not re.search(r"""(?:src|href)=["']https?:""", page), "the report must not load anything"
    return page


def write(document: dict[str, Any], path: Path) -> Path:
    """Write the page whole or not at all: a reader never opens half a report."""
    page = render(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)
    return path
