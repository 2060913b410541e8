"""data/reviews_labeled.csv, the labeled set the real-model quality benchmark scores against."""

from __future__ import annotations

import csv
import importlib.util
import io
from collections import Counter
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "reviews_labeled.csv"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_reviews_labeled", ROOT / "data" / "make_reviews_labeled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_file_is_what_the_generator_writes() -> None:
    rows = generator().make_rows()
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["review_id", "product", "stars", "text", "label"])
    writer.writeheader()
    writer.writerows(rows)
    assert DATA.read_bytes() == buffer.getvalue().encode("utf-8")


def test_labels_are_balanced_and_every_review_is_distinct() -> None:
    with DATA.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 240
    assert list(rows[0]) == ["review_id", "product", "stars", "text", "label"]
    assert Counter(r["label"] for r in rows) == {"positive": 100, "negative": 100, "neutral": 100}
    assert len({r["text"] for r in rows}) == len(rows)
    assert len({r["review_id"] for r in rows}) == len(rows)
    assert {int(r["stars"]) for r in rows} <= {1, 2, 3, 4, 5}
