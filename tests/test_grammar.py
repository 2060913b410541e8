"""grammar: tighter schemas a grammar server enforces, and the token sizes of answers."""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema.validators import Draft202012Validator

from pipeline.job.schema_types import check_schema, resolve_ref
from pipeline.requests import prompts
from pipeline.requests.grammar import (
    ARRAY_CAP_ITEMS,
    ARRAY_MIN_ITEMS,
    CHARS_PER_TOKEN,
    STRING_CAP_CHARS,
    STRING_MIN_CHARS,
    document_size_tokens,
    enforceable,
    fit_warnings,
)

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = json.loads((ROOT / "jobs/schemas/ticket_triage.json").read_text(encoding="utf-8"))
INVOICE = json.loads((ROOT / "jobs/schemas/invoice.json").read_text(encoding="utf-8"))
REVIEW = json.loads((ROOT / "jobs/schemas/review_label.json").read_text(encoding="utf-8"))

#: Fixed bounds so the table's expected schemas are exact.
L, N = 40, 3

NESTED_REF: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "note": {"type": "string"},
        "action": {
            "type": "object",
            "properties": {"kind": {"enum": ["a", "b"]}, "note": {"$ref": "#/$defs/note"}},
            "required": ["kind", "note"],
            "additionalProperties": False,
        },
    },
    "properties": {
        "first": {"$ref": "#/$defs/action"},
        "rest": {"type": "array", "items": {"$ref": "#/$defs/action"}},
        "level": {"$ref": "#/$defs/level", "description": "sibling annotation"},
    },
    "required": ["first", "rest", "level"],
    "additionalProperties": False,
}
NESTED_REF["$defs"]["level"] = {"type": ["integer", "null"], "minimum": 1, "maximum": 3}

RECURSIVE: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["label", "children"],
            "additionalProperties": False,
        }
    },
    "properties": {"tree": {"$ref": "#/$defs/node"}},
    "required": ["tree"],
    "additionalProperties": False,
}

UNIONS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "a": {"type": ["string", "null"], "minLength": 2},
        "b": {"anyOf": [{"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}, {"type": "null"}]},
        "c": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "boolean"}}]},
        "d": {"type": ["number", "string"], "enum": [1.5, "x", "yy"]},
        "e": {"type": "array", "items": {"type": "string", "format": "date"}, "minItems": 1},
    },
    "required": ["a", "b", "c", "d", "e"],
    "additionalProperties": False,
}

EXAMPLES = {"triage": TRIAGE, "invoice": INVOICE, "review": REVIEW, "nested_ref": NESTED_REF, "unions": UNIONS}


def wrap(sub: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"x": sub}, "required": ["x"], "additionalProperties": False}


def tight_x(sub: Any) -> Any:
    return enforceable(wrap(sub), max_tokens=1000, string_max_chars=L, array_max_items=N)["properties"]["x"]


# ------------------------------------------------------------------------------ the rewrite table

TABLE: list[tuple[str, Any, Any]] = [
    # integers: small ranges become enums, the bounds stay
    (
        "int 1..5",
        {"type": "integer", "minimum": 1, "maximum": 5},
        {"type": "integer", "minimum": 1, "maximum": 5, "enum": [1, 2, 3, 4, 5]},
    ),
    (
        "int 0..1000 stays a range (too many values; validation catches it)",
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "integer", "minimum": 0, "maximum": 1000},
    ),
    (
        "int 1..64 is the largest enum",
        {"type": "integer", "minimum": 1, "maximum": 64},
        {"type": "integer", "minimum": 1, "maximum": 64, "enum": list(range(1, 65))},
    ),
    (
        "int 1..65 stays a range",
        {"type": "integer", "minimum": 1, "maximum": 65},
        {"type": "integer", "minimum": 1, "maximum": 65},
    ),
    (
        "exclusive bounds",
        {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4},
        {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4, "enum": [1, 2, 3]},
    ),
    (
        "exclusive and inclusive: the tighter wins",
        {"type": "integer", "minimum": -3, "exclusiveMinimum": -1, "maximum": 1},
        {"type": "integer", "minimum": -3, "exclusiveMinimum": -1, "maximum": 1, "enum": [0, 1]},
    ),
    (
        "fractional bounds",
        {"type": "integer", "minimum": 0.5, "maximum": 3.5},
        {"type": "integer", "minimum": 0.5, "maximum": 3.5, "enum": [1, 2, 3]},
    ),
    (
        "multipleOf",
        {"type": "integer", "minimum": 0, "maximum": 20, "multipleOf": 5},
        {"type": "integer", "minimum": 0, "maximum": 20, "multipleOf": 5, "enum": [0, 5, 10, 15, 20]},
    ),
    (
        "draft 4 boolean exclusiveMinimum",
        {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3},
        {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3, "enum": [1, 2, 3]},
    ),
    ("one bound only stays", {"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 0}),
    (
        "integer with an enum untouched",
        {"type": "integer", "minimum": 0, "maximum": 9, "enum": [2, 4]},
        {"type": "integer", "minimum": 0, "maximum": 9, "enum": [2, 4]},
    ),
    (
        "number ranges cannot be listed",
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "number", "minimum": 0, "maximum": 1},
    ),
    # strings
    ("open string", {"type": "string"}, {"type": "string", "maxLength": L}),
    (
        "minLength above the share wins",
        {"type": "string", "minLength": 50},
        {"type": "string", "minLength": 50, "maxLength": 50},
    ),
    ("enum string untouched", {"type": "string", "enum": ["a", "b"]}, {"type": "string", "enum": ["a", "b"]}),
    ("const untouched", {"const": "a"}, {"const": "a"}),
    ("explicit maxLength kept", {"type": "string", "maxLength": 500}, {"type": "string", "maxLength": 500}),
    ("pattern untouched", {"type": "string", "pattern": "^[a-z]+$"}, {"type": "string", "pattern": "^[a-z]+$"}),
    ("fixed-size format untouched", {"type": "string", "format": "date"}, {"type": "string", "format": "date"}),
    (
        "free format still open",
        {"type": "string", "format": "email"},
        {"type": "string", "format": "email", "maxLength": L},
    ),
    ("single-type list", {"type": ["string"]}, {"type": "string", "maxLength": L}),
    # arrays
    (
        "array of objects",
        {"type": "array", "items": wrap({"type": "string"})},
        {"type": "array", "items": wrap({"type": "string", "maxLength": L}), "maxItems": N},
    ),
    (
        "minItems above the share wins",
        {"type": "array", "items": {"type": "boolean"}, "minItems": 5},
        {"type": "array", "items": {"type": "boolean"}, "minItems": 5, "maxItems": 5},
    ),
    (
        "explicit maxItems kept, items still bounded",
        {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        {"type": "array", "items": {"type": "string", "maxLength": L}, "maxItems": 20},
    ),
    (
        "tuples untouched but their strings bounded",
        {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
        {"type": "array", "prefixItems": [{"type": "string", "maxLength": L}], "items": False},
    ),
    # nullable unions
    (
        "nullable string",
        {"type": ["string", "null"], "description": "d"},
        {"description": "d", "anyOf": [{"type": "string", "maxLength": L}, {"type": "null"}]},
    ),
    (
        "nullable bounded integer",
        {"type": ["integer", "null"], "minimum": 1, "maximum": 3},
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3, "enum": [1, 2, 3]}, {"type": "null"}]},
    ),
    (
        "nullable enum splits its values",
        {"type": ["string", "null"], "enum": ["a", None]},
        {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null", "enum": [None]}]},
    ),
    (
        "enum without null drops the null branch",
        {"type": ["string", "null"], "enum": ["a"]},
        {"anyOf": [{"type": "string", "enum": ["a"]}]},
    ),
    (
        "anyOf with null",
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"anyOf": [{"type": "string", "maxLength": L}, {"type": "null"}]},
    ),
    (
        "oneOf of different types is tightened",
        {"oneOf": [{"type": "string"}, {"type": "null"}]},
        {"oneOf": [{"type": "string", "maxLength": L}, {"type": "null"}]},
    ),
    (
        "overlapping oneOf untouched (tightening one branch could loosen)",
        {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 5}]},
        {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 5}]},
    ),
    (
        "not untouched",
        {"type": "string", "not": {"type": "string", "maxLength": 3}},
        {"type": "string", "not": {"type": "string", "maxLength": 3}, "maxLength": L},
    ),
    ("free-form object untouched", {"type": "object"}, {"type": "object"}),
]


@pytest.mark.parametrize(("given_schema", "expected"), [(g, e) for _, g, e in TABLE], ids=[n for n, _, _ in TABLE])
def test_enforceable_rewrites(given_schema: Any, expected: Any) -> None:
    assert tight_x(given_schema) == expected


def test_nested_refs_are_inlined_with_their_own_bounds() -> None:
    out = enforceable(NESTED_REF, max_tokens=1000, string_max_chars=L, array_max_items=N)
    assert "$defs" not in out
    action = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}, "note": {"type": "string", "maxLength": L}},
        "required": ["kind", "note"],
        "additionalProperties": False,
    }
    assert out["properties"]["first"] == action
    assert out["properties"]["rest"] == {"type": "array", "items": action, "maxItems": N}
    assert out["properties"]["level"] == {
        "description": "sibling annotation",
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": 3, "enum": [1, 2, 3]}, {"type": "null"}],
    }


def test_recursive_ref_is_kept_with_its_defs() -> None:
    out = enforceable(RECURSIVE, max_tokens=200)
    tree = out["properties"]["tree"]
    assert tree["properties"]["label"]["maxLength"] >= STRING_MIN_CHARS
    assert tree["properties"]["children"]["items"] == {"$ref": "#/$defs/node"}
    assert out["$defs"] == RECURSIVE["$defs"]
    resolve_ref("#/$defs/node", out)  # still resolves in the output
    Draft202012Validator.check_schema(out)
    assert document_size_tokens(out)[1] is None  # recursion is unbounded


@pytest.mark.parametrize("name", [*EXAMPLES, "recursive"])
def test_original_schema_is_not_mutated(name: str) -> None:
    schema = EXAMPLES.get(name, RECURSIVE)
    before = copy.deepcopy(schema)
    out = enforceable(schema, max_tokens=150)
    assert schema == before

    def clear(node: Any) -> None:  # the output shares nothing with the input
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
        for child in children:
            clear(child)
        if isinstance(node, dict | list):
            node.clear()

    clear(out)
    assert schema == before


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("max_tokens", [1, 64, 200, 1000])
def test_enforceable_schemas_are_valid_json_schemas(name: str, max_tokens: int) -> None:
    out = enforceable(EXAMPLES[name], max_tokens=max_tokens)
    Draft202012Validator.check_schema(out)
    check_schema(out, strict=name in {"triage", "invoice", "review"}, source=name)


# ------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("name", ["triage", "invoice", "review", "nested_ref", "unions"])
@pytest.mark.parametrize("max_tokens", [40, 60, 100, 200, 400, 1000, 4000])
def test_largest_document_fits_max_tokens(name: str, max_tokens: int) -> None:
    schema = EXAMPLES[name]
    least, _ = document_size_tokens(schema)
    out = enforceable(schema, max_tokens=max_tokens)
    least_out, most_out = document_size_tokens(out)
    assert least_out == least  # the smallest answer is never pushed up
    assert most_out is not None
    floor = enforceable(
        schema, max_tokens=max_tokens, string_max_chars=STRING_MIN_CHARS, array_max_items=ARRAY_MIN_ITEMS
    )
    floor_most = document_size_tokens(floor)[1]
    assert floor_most is not None
    if floor_most <= max_tokens:
        assert most_out <= max_tokens
        assert fit_warnings(out, max_tokens) == []
    else:  # not even the minimums fit (invoice at 40/60 tokens: four numbers at 24 chars each)
        assert out == floor
        assert len(fit_warnings(out, max_tokens)) == 1


def bounds_of(schema: dict[str, Any]) -> tuple[set[int], set[int]]:
    """Every maxLength and maxItems enforceable wrote (explicit ones in the examples excluded by value)."""
    lengths: set[int] = set()
    items: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "maxLength" in node:
                lengths.add(node["maxLength"])
            if node.get("type") == "array" and "maxItems" in node:
                items.add(node["maxItems"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return lengths, items


def test_bounds_grow_with_the_budget_and_stop_at_the_caps() -> None:
    seen = []
    for max_tokens in (1, 50, 100, 200, 400, 800, 100_000):
        lengths, items = bounds_of(enforceable(TRIAGE, max_tokens=max_tokens))
        assert len(lengths) == 1 and len(items) == 1  # one share for every open string, one for every array
        seen.append((lengths.pop(), items.pop()))
    assert seen[0] == (STRING_MIN_CHARS, ARRAY_MIN_ITEMS)
    assert seen[-1] == (STRING_CAP_CHARS, ARRAY_CAP_ITEMS)
    assert seen == sorted(seen)


def test_minimums_when_nothing_fits_and_the_warning_says_so() -> None:
    out = enforceable(TRIAGE, max_tokens=10)
    assert bounds_of(out) == ({STRING_MIN_CHARS}, {ARRAY_MIN_ITEMS})
    assert len(fit_warnings(out, 10)) == 1


def test_explicit_bounds_are_used_as_given() -> None:
    out = enforceable(TRIAGE, max_tokens=50, string_max_chars=300, array_max_items=20)
    assert bounds_of(out) == ({300}, {20})
    only_strings = enforceable(TRIAGE, max_tokens=200, string_max_chars=10)
    lengths, items = bounds_of(only_strings)
    assert lengths == {10} and items.pop() > 3  # the budget the strings left goes to the array


def test_max_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        enforceable(TRIAGE, max_tokens=0)


def test_chars_per_token_matches_prompts() -> None:
    assert CHARS_PER_TOKEN == prompts.CHARS_PER_TOKEN


SIZES: list[tuple[str, Any, tuple[int, int | None]]] = [
    # '{"x": "abcd"}' is 13 chars -> 4 tokens
    ("const", {"const": "abcd"}, (4, 4)),
    # '{"x": null}' 11 chars, '{"x": false}' 12
    ("boolean", {"type": "boolean"}, (3, 3)),
    ("enum", {"enum": ["a", "a" * 40]}, (3, 13)),
    # '{"x": 0}' 8 chars, '{"x": -100}' 11
    ("int range", {"type": "integer", "minimum": -100, "maximum": 7}, (2, 3)),
    ("int without bounds", {"type": "integer"}, (2, 7)),  # 20 chars at most
    ("string with maxLength", {"type": "string", "maxLength": 100}, (3, 28)),
    ("open string", {"type": "string"}, (3, None)),
    ("open array", {"type": "array", "items": {"type": "boolean"}}, (3, None)),
    # '{"x": [false, ...]}': 7 + 2 + 10 * 5 + 9 * 2 = 77 chars
    ("array of 0..10 booleans", {"type": "array", "items": {"type": "boolean"}, "maxItems": 10}, (3, 20)),
    ("date", {"type": "string", "format": "date"}, (5, 5)),
    ("nullable string", {"type": ["string", "null"], "maxLength": 40}, (3, 13)),
    ("free-form object", {"type": "object"}, (3, None)),
    (
        "extra keys allowed",
        {"type": "object", "properties": {"a": {"type": "null"}}, "additionalProperties": True},
        (3, None),
    ),
]


@pytest.mark.parametrize(("sub", "expected"), [(s, e) for _, s, e in SIZES], ids=[n for n, _, _ in SIZES])
def test_document_size_tokens(sub: Any, expected: tuple[int, int | None]) -> None:
    assert document_size_tokens(wrap(sub)) == expected


def test_optional_properties_count_only_in_the_largest() -> None:
    schema = {"type": "object", "properties": {"a": {"const": "x" * 36}}, "additionalProperties": False}
    assert document_size_tokens(schema) == (1, 12)  # '{}', then '{"a": "xx...x"}' (45 chars)


# ------------------------------------------------------------------------------ fit_warnings


def test_fit_warnings_fire_when_the_required_fields_cannot_fit() -> None:
    schema = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string", "enum": ["a rather long label"]} for i in range(4)},
        "required": [f"field_{i}" for i in range(4)],
        "additionalProperties": False,
    }
    (warning,) = fit_warnings(schema, 10, source="jobs/schemas/x.json")
    assert warning.startswith("the smallest valid answer of schema jobs/schemas/x.json needs ~")
    assert "max_tokens is 10" in warning


def test_fit_warnings_fire_when_explicit_bounds_exceed_max_tokens() -> None:
    schema = wrap({"type": "string", "maxLength": 2000})
    (warning,) = fit_warnings(schema, 200)
    assert "largest bounded answer" in warning and "~503 tokens > max_tokens 200" in warning


def test_no_fit_warnings_for_the_triage_schema() -> None:
    assert fit_warnings(TRIAGE, 200) == []
    assert fit_warnings(enforceable(TRIAGE, max_tokens=200), 200) == []


# ------------------------------------------------------------------------------ properties

# ASCII without '"' and '\\': one character per JSON character, as the size estimate assumes.
_ALPHABET = st.sampled_from([c for c in string.printable if c not in '"\\\n\r\t\x0b\x0c'])
_TEXT = st.text(alphabet=_ALPHABET, max_size=30)


def documents(node: Any, root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Documents shaped by ``node``: mostly valid, filtered with the real validator by the caller."""
    if node is True or not isinstance(node, dict):
        return st.none() | st.booleans() | st.integers(-5, 5) | _TEXT
    if "$ref" in node:
        return documents(resolve_ref(node["$ref"], root), root)
    for key in ("anyOf", "oneOf"):
        if key in node:
            return st.one_of([documents(b, root) for b in node[key]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kinds = node.get("type")
    if isinstance(kinds, list):
        return st.one_of([documents({**node, "type": k}, root) for k in kinds])
    if kinds is None:
        kinds = "object" if "properties" in node else "array" if "items" in node else None
    if kinds == "null":
        return st.none()
    if kinds == "boolean":
        return st.booleans()
    if kinds == "integer":
        return st.integers(-(10**12), 10**12) | st.integers(-3, 70)
    if kinds == "number":
        return st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-5, 5)
    if kinds == "string":
        if node.get("format") == "date":
            return st.dates().map(lambda d: d.isoformat())
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True)
        low = node.get("minLength", 0)
        return st.text(alphabet=_ALPHABET, min_size=low, max_size=node.get("maxLength", low + 300))
    if kinds == "array":
        if "prefixItems" in node:
            return st.tuples(*[documents(p, root) for p in node["prefixItems"]]).map(list)
        low = node.get("minItems", 0)
        return st.lists(documents(node.get("items", True), root), min_size=low, max_size=node.get("maxItems", low + 12))
    if kinds == "object":
        props = node.get("properties", {})
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: documents(v, root) for k, v in props.items() if k in required},
            optional={k: documents(v, root) for k, v in props.items() if k not in required},
        )
    return st.none()


@functools.cache
def tight_example(name: str, max_tokens: int) -> dict[str, Any]:
    return enforceable(EXAMPLES[name], max_tokens=max_tokens)


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("max_tokens", [30, 200, 1000])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_valid_under_enforceable_is_valid_under_original(name: str, max_tokens: int, data: st.DataObject) -> None:
    original = EXAMPLES[name]
    tight = tight_example(name, max_tokens)
    # Drawn from both shapes: the tight one hits its bounds, the original one probes past them.
    doc = data.draw(documents(tight, tight) | documents(original, original))
    if Draft202012Validator(tight).is_valid(doc):
        Draft202012Validator(original).validate(doc)


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("max_tokens", [100, 200, 700])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_sizes_bound_real_documents(name: str, max_tokens: int, data: st.DataObject) -> None:
    tight = tight_example(name, max_tokens)
    doc = data.draw(documents(tight, tight))
    assume(Draft202012Validator(tight).is_valid(doc))
    tokens = math.ceil(len(json.dumps(doc)) / CHARS_PER_TOKEN)
    least, most = document_size_tokens(tight)
    assert most is not None
    assert least <= tokens <= most <= max_tokens


# ------------------------------------------------------------------------------ the example job files


def test_ticket_triage_schema_is_strict_and_has_the_described_shape() -> None:
    check_schema(TRIAGE, strict=True, source="jobs/schemas/ticket_triage.json")
    props = TRIAGE["properties"]
    assert props["category"]["enum"] and props["urgency"] == {**props["urgency"], "minimum": 1, "maximum": 5}
    assert props["customer"]["properties"]["name"]["type"] == ["string", "null"]
    assert props["actions"]["items"]["properties"]["kind"]["enum"]
    assert props["needs_human"]["type"] == "boolean"
    assert {"type": "null"} in props["duplicate_of"]["anyOf"]


def test_tickets_csv_has_30_rows() -> None:
    with (ROOT / "data/tickets.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    assert list(rows[0]) == ["ticket_id", "subject", "body"]
    assert len({r["ticket_id"] for r in rows}) == 30 and all(r["body"] for r in rows)
