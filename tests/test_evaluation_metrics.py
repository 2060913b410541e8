"""The evaluation's metrics against scikit-learn's on random labelings: missing answers, unseen classes."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    median_absolute_error,
    precision_recall_fscore_support,
)

from pipeline.quality.metrics import NO_ANSWER, classify, match_strings, normalise, number_errors

CLASSES = ["positive", "negative", "neutral", "mixed"]


def labeling(seed: int, n: int, missing: float, invented: float) -> tuple[list[str], list[str | None]]:
    """Right answers from three classes; answers right about half the time, sometimes missing, sometimes
    a class the right answers never use ("mixed") or one no list names."""
    rng = random.Random(seed)
    truth = [rng.choice(CLASSES[:3]) for _ in range(n)]
    answers: list[str | None] = []
    for t in truth:
        roll = rng.random()
        if roll < missing:
            answers.append(None)
        elif roll < missing + invented:
            answers.append(rng.choice(["mixed", f"other-{rng.randrange(3)}"]))
        else:
            answers.append(t if rng.random() < 0.5 else rng.choice(CLASSES[:3]))
    return truth, answers


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("missing", "invented"), [(0.0, 0.0), (0.2, 0.0), (0.1, 0.15), (0.9, 0.05)])
def test_classification_matches_scikit_learn(seed: int, missing: float, invented: float) -> None:
    truth, answers = labeling(seed, 20 + 37 * seed, missing, invented)
    ours = classify(truth, answers)

    # scikit-learn has no "no answer": it becomes a label outside the scored labels, so its rows are
    # false negatives of their right class and belong to no class's precision.
    predicted = [NO_ANSWER if a is None else a for a in answers]
    labels = sorted(set(truth) | {a for a in answers if a is not None})
    assert ours.labels == labels
    assert ours.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert ours.macro_f1 == pytest.approx(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        score = ours.classes[label]
        assert (score.precision, score.recall, score.f1) == pytest.approx((precision[i], recall[i], f1[i]))
        assert score.support == support[i]
    full = confusion_matrix(truth, predicted, labels=[*labels, NO_ANSWER])
    assert ours.matrix == full[: len(labels)].tolist()
    assert ours.n_without_answer == sum(a is None for a in answers)


def test_every_answer_missing_scores_zero_not_nothing() -> None:
    ours = classify(["a", "b", "b"], [None, None, None])
    assert ours.accuracy == 0.0
    assert ours.macro_f1 == 0.0
    assert ours.matrix == [[0, 0, 1], [0, 0, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_number_errors_match_scikit_learn(seed: int) -> None:
    rng = random.Random(seed)
    truth = [float(rng.randint(1, 5)) for _ in range(50)]
    answers: list[float | None] = [None if rng.random() < 0.2 else t + rng.choice([0, 0, 1, -2, 0.5]) for t in truth]
    ours = number_errors(truth, answers)
    answered = [(t, a) for t, a in zip(truth, answers, strict=True) if a is not None]
    expected_truth, expected_answers = [t for t, _ in answered], [a for _, a in answered]
    assert ours.mean_absolute_error == pytest.approx(mean_absolute_error(expected_truth, expected_answers))
    assert ours.median_absolute_error == pytest.approx(median_absolute_error(expected_truth, expected_answers))
    assert ours.n_without_answer == len(truth) - len(answered)
    assert ours.exact == sum(t == a for t, a in answered)


def test_normalised_match_says_what_it_forgives() -> None:
    assert normalise("  Positive! ") == "positive"
    assert normalise("ＰＯＳＩＴＩＶＥ") == "positive"  # full-width letters (NFKC)
    assert normalise("“Très  bien”.") == "très bien"
    assert normalise("don't") == "don't"  # inner punctuation stays
    match = match_strings(["Positive", "neutral", "negative"], ["positive.", "neutral", None])
    assert (match.exact, match.normalised, match.n_without_answer) == (1, 2, 1)
    assert match.exact_match == pytest.approx(1 / 3)
    assert match.normalised_match == pytest.approx(2 / 3)
