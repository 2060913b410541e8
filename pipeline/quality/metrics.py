"""Metrics of answers against right answers: pure functions over plain Python lists.

A missing answer is ``None``. It counts as wrong, never dropped: a run that answers half its rows
perfectly scores 0.5, not 1.0, and in the confusion matrix its rows sit in the ``(no answer)`` column.

Classes are the values seen in the right answers or in the answers (a class the model invented is a
class with no support; a class it never used has precision 0). Macro-F1 is the unweighted mean of the
per-class F1 over those classes, as scikit-learn's ``f1_score(average="macro")`` computes it when given
the same labels; a ratio whose denominator is 0 is 0.
"""

from __future__ import annotations

import statistics
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

#: The confusion matrix's column for rows without a usable answer.
NO_ANSWER = "(no answer)"
_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»…—–·"


def normalise(text: str) -> str:
    """The form two strings are compared in by the normalised match.

    Unicode NFKC (full-width and compatibility characters become their plain forms), case folded,
    every run of whitespace made one space, then whitespace and ASCII or typographic punctuation
    stripped from both ends: ``"  Positive! "`` and ``"positive"`` match; inner punctuation stays.
    """
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return folded.strip(_EDGE_PUNCTUATION + " ")


@dataclass(frozen=True, slots=True)
class ClassScore:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(slots=True)
class Classification:
    """Accuracy, per-class scores and the confusion matrix of one field."""

    n: int
    correct: int
    n_without_answer: int
    labels: list[str]
    classes: dict[str, ClassScore]
    macro_f1: float
    matrix: list[list[int]]
    """Rows: right answer (``labels``); columns: answer (``labels`` then ``NO_ANSWER``)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def classify(truth: Sequence[str], answers: Sequence[str | None]) -> Classification:
    """Score ``answers`` against ``truth`` (same length, same order; ``None``: no usable answer)."""
    if len(truth) != len(answers):
        raise ValueError(f"{len(truth)} right answers but {len(answers)} answers")
    labels = sorted(set(truth) | {a for a in answers if a is not None})
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for t, a in zip(truth, answers, strict=True):
        matrix[index[t]][len(labels) if a is None else index[a]] += 1
    classes: dict[str, ClassScore] = {}
    for i, label in enumerate(labels):
        hit = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision, recall = _ratio(hit, predicted), _ratio(hit, support)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        classes[label] = ClassScore(precision, recall, f1, support)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    macro = sum(c.f1 for c in classes.values()) / len(classes) if classes else 0.0
    missing = sum(a is None for a in answers)
    return Classification(len(truth), correct, missing, labels, classes, macro, matrix)


@dataclass(slots=True)
class StringMatch:
    n: int
    exact: int
    normalised: int
    n_without_answer: int

    @property
    def exact_match(self) -> float:
        return _ratio(self.exact, self.n)

    @property
    def normalised_match(self) -> float:
        return _ratio(self.normalised, self.n)


def match_strings(truth: Sequence[str], answers: Sequence[str | None]) -> StringMatch:
    """Exact and normalised (``normalise``) match rates; a missing answer matches nothing."""
    exact = sum(a is not None and a == t for t, a in zip(truth, answers, strict=True))
    loose = sum(a is not None and normalise(a) == normalise(t) for t, a in zip(truth, answers, strict=True))
    return StringMatch(len(truth), exact, loose, sum(a is None for a in answers))


@dataclass(slots=True)
class NumberError:
    n: int
    exact: int
    n_without_answer: int
    mean_absolute_error: float | None
    """Over the answered rows only: a missing number has no error to average (it counts in ``exact``)."""
    median_absolute_error: float | None


def number_errors(truth: Sequence[float], answers: Sequence[float | None]) -> NumberError:
    errors = [abs(a - t) for t, a in zip(truth, answers, strict=True) if a is not None]
    exact = sum(e == 0 for e in errors)
    mean = statistics.fmean(errors) if errors else None
    median = statistics.median(errors) if errors else None
    return NumberError(len(truth), exact, len(truth) - len(errors), mean, median)


def cost_per_correct(cost_usd: float, correct: int) -> float | None:
    """USD per right answer; None when nothing was right (the cost bought no right answer)."""
    return cost_usd / correct if correct else None
