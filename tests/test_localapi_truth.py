"""The local API's right answers (``[[truth:…]]`` markers) and its per-field error rate."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from pipeline.errors import SpecError
from pipeline.localapi.answers import Answer
from pipeline.localapi.truth import apply, parse_error_rates, truths, wrong
from pipeline.localapi.validation import parse

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "spam": {"type": "boolean"},
        "summary": {"type": "string"},
    },
    "required": ["sentiment", "stars", "spam", "summary"],
    "additionalProperties": False,
}


def answered(user: str, rates: dict[str, float], seed: int = 1) -> dict[str, object]:
    body = {
        "model": "seed-2-0-lite-local",
        "seed": seed,
        "messages": [{"role": "user", "content": user}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
    }
    raw = orjson.dumps(body)
    parsed = parse(orjson.loads(raw))
    document = {"sentiment": "neutral", "stars": 3, "spam": False, "summary": "alpha"}
    answer = Answer(orjson.dumps(document).decode(), None)
    apply(answer, parsed, hashlib.sha256(raw).digest(), rates)
    result: dict[str, object] = orjson.loads(answer.content or "")
    return result


MARKED = "Review\n[[truth:sentiment=positive]] [[truth:stars=5]] [[truth:spam=true]] [[truth:summary=Works well]]"


def test_markers_set_the_right_answer_in_the_property_type() -> None:
    assert truths(MARKED) == {"sentiment": "positive", "stars": "5", "spam": "true", "summary": "Works well"}
    assert answered(MARKED, {}) == {"sentiment": "positive", "stars": 5, "spam": True, "summary": "Works well"}


def test_a_wrong_value_keeps_its_type_and_is_never_the_right_one() -> None:
    assert wrong("positive", SCHEMA["properties"]["sentiment"], b"x") in ("negative", "neutral")
    assert wrong(5, SCHEMA["properties"]["stars"], b"x") == 4  # one below at the maximum
    assert wrong(2, SCHEMA["properties"]["stars"], b"x") == 3
    assert wrong(True, SCHEMA["properties"]["spam"], b"x") is False
    assert wrong("Works well", SCHEMA["properties"]["summary"], b"x") == "not Works well"
    every = answered(MARKED, dict.fromkeys(("sentiment", "stars", "spam", "summary"), 1.0))
    assert every["sentiment"] != "positive" and every["stars"] == 4 and every["spam"] is False


def test_the_wrong_draw_follows_the_whole_body() -> None:
    rows = [f"Review {i}\n[[truth:sentiment=positive]]" for i in range(400)]
    first = [answered(r, {"sentiment": 0.3})["sentiment"] != "positive" for r in rows]
    again = [answered(r, {"sentiment": 0.3})["sentiment"] != "positive" for r in rows]
    other_seed = [answered(r, {"sentiment": 0.3}, seed=2)["sentiment"] != "positive" for r in rows]
    assert first == again  # the same request is answered the same way
    assert first != other_seed  # another seed draws again
    assert 0.3 - 0.1 < sum(first) / len(rows) < 0.3 + 0.1


@pytest.mark.parametrize("item", ["sentiment", "sentiment=", "=0.2", "sentiment=1.2", "sentiment=x"])
def test_a_malformed_error_rate_is_one_clear_error(item: str) -> None:
    with pytest.raises(SpecError, match="FIELD=RATE"):
        parse_error_rates([item])
    assert parse_error_rates(["sentiment=0.2", "text=0"]) == {"sentiment": 0.2, "text": 0.0}
