"""Schema types: meta-schema and strict-mode checks, answer validation, dtypes, typed columns, Parquet round trip."""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import SpecError
from pipeline.job.schema_types import (
    check_column_clash,
    check_schema,
    column_dtypes,
    compile_validator,
    polars_dtype,
    typed_columns,
)

SRC = "jobs/schemas/invoice.json"
LABEL = pl.Enum(["pos", "neg", "neutral"])


def obj(props: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """An object schema; strict ones follow the OpenAI rules (closed, every property required)."""
    out: dict[str, Any] = {"type": "object", "properties": props}
    if strict:
        out |= {"additionalProperties": False, "required": list(props)}
    return out


INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "total": {"type": "number"},
        "paid": {"type": ["boolean", "null"]},
        "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "object"},
    },
    "required": ["vendor", "currency", "total", "paid", "lines", "tags", "extra"],
    "additionalProperties": False,
    "$defs": {
        "line": {
            "type": "object",
            "properties": {
                "sku": {"type": "string"},
                "qty": {"type": "integer"},
                "price": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            },
            "required": ["sku", "qty", "price"],
            "additionalProperties": False,
        }
    },
}
INVOICE_STRICT: dict[str, Any] = {
    **INVOICE,
    "properties": {k: v for k, v in INVOICE["properties"].items() if k != "extra"},
    "required": [k for k in INVOICE["required"] if k != "extra"],
}
LINE = pl.Struct({"sku": pl.String, "qty": pl.Int64, "price": pl.Float64})
INVOICE_DTYPES = {
    "vendor": pl.String(),
    "currency": pl.Enum(["EUR", "USD", "GBP"]),
    "total": pl.Float64(),
    "paid": pl.Boolean(),
    "lines": pl.List(LINE),
    "tags": pl.List(pl.String),
    "extra": pl.String(),
}


# ---------------------------------------------------------------- dtypes

ROOT_DEFS: dict[str, Any] = {
    "$defs": {
        "pt": obj({"x": {"type": "number"}, "y": {"type": "number"}}),
        "node": obj({"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}),
    },
    "definitions": {"label": {"type": "string", "enum": ["pos", "neg", "neutral"]}},
}

DTYPE_CASES: list[tuple[str, dict[str, Any], pl.DataType]] = [
    ("string", {"type": "string"}, pl.String()),
    ("string+format", {"type": "string", "format": "date"}, pl.String()),
    ("enum", {"type": "string", "enum": ["pos", "neg", "neutral"]}, LABEL),
    ("enum dup", {"type": "string", "enum": ["a", "b", "a"]}, pl.Enum(["a", "b"])),
    ("enum untyped", {"enum": ["pos", "neg", "neutral"]}, pl.String()),
    ("enum nullable", {"type": ["string", "null"], "enum": ["pos", "neg", "neutral", None]}, LABEL),
    ("enum mixed values", {"type": "string", "enum": ["a", 1]}, pl.String()),
    ("const", {"const": "fixed"}, pl.String()),
    ("integer", {"type": "integer"}, pl.Int64()),
    ("number", {"type": "number"}, pl.Float64()),
    ("boolean", {"type": "boolean"}, pl.Boolean()),
    ("int|number", {"type": ["integer", "number"]}, pl.Float64()),
    ("array of str", {"type": "array", "items": {"type": "string"}}, pl.List(pl.String)),
    ("array no items", {"type": "array"}, pl.List(pl.String)),
    (
        "array of arrays",
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        pl.List(pl.List(pl.Int64)),
    ),
    ("tuple", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}, pl.String()),
    (
        "array of objects",
        {"type": "array", "items": obj({"sku": {"type": "string"}, "qty": {"type": "integer"}})},
        pl.List(pl.Struct({"sku": pl.String, "qty": pl.Int64})),
    ),
    (
        "nested arrays of objects",
        {
            "type": "array",
            "items": obj(
                {"tags": {"type": "array", "items": obj({"k": {"type": "string", "enum": ["pos", "neg", "neutral"]}})}}
            ),
        },
        pl.List(pl.Struct({"tags": pl.List(pl.Struct({"k": LABEL}))})),
    ),
    (
        "struct keeps property order",
        obj({"z": {"type": "integer"}, "a": {"type": "boolean"}, "m": {"type": "string"}}),
        pl.Struct({"z": pl.Int64, "a": pl.Boolean, "m": pl.String}),
    ),
    ("nullable type list", {"type": ["integer", "null"]}, pl.Int64()),
    ("nullable null first", {"type": ["null", "number"]}, pl.Float64()),
    ("nullable anyOf", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, pl.Int64()),
    ("nullable oneOf", {"oneOf": [{"type": "null"}, {"type": "string", "enum": ["pos", "neg", "neutral"]}]}, LABEL),
    (
        "nullable anyOf object",
        {"anyOf": [obj({"a": {"type": "integer"}}), {"type": "null"}]},
        pl.Struct({"a": pl.Int64}),
    ),
    ("nullable array", {"type": ["array", "null"], "items": {"type": "boolean"}}, pl.List(pl.Boolean)),
    ("anyOf int|number", {"anyOf": [{"type": "integer"}, {"type": "number"}]}, pl.Float64()),
    ("anyOf same", {"anyOf": [{"type": "string", "format": "date"}, {"type": "string"}]}, pl.String()),
    (
        "allOf single",
        {"allOf": [{"$ref": "#/$defs/pt"}], "description": "where"},
        pl.Struct({"x": pl.Float64, "y": pl.Float64}),
    ),
    ("ref $defs", {"$ref": "#/$defs/pt"}, pl.Struct({"x": pl.Float64, "y": pl.Float64})),
    ("ref definitions", {"$ref": "#/definitions/label"}, LABEL),
    (
        "ref in items",
        {"type": "array", "items": {"$ref": "#/$defs/pt"}},
        pl.List(pl.Struct({"x": pl.Float64, "y": pl.Float64})),
    ),
    ("recursive ref", {"$ref": "#/$defs/node"}, pl.Struct({"kids": pl.List(pl.String)})),
    ("free-form object", {"type": "object"}, pl.String()),
    ("object empty props", {"type": "object", "properties": {}}, pl.String()),
    ("mixed union type", {"type": ["string", "integer"]}, pl.String()),
    ("mixed union anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}, pl.String()),
    ("mixed union objects", {"anyOf": [obj({"a": {"type": "integer"}}), obj({"b": {"type": "integer"}})]}, pl.String()),
    ("allOf several", {"allOf": [{"type": "string"}, {"minLength": 1}]}, pl.String()),
    ("no type", {"description": "anything"}, pl.String()),
    ("null only", {"type": "null"}, pl.String()),
]


@pytest.mark.parametrize(("fragment", "expected"), [(f, e) for _, f, e in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_polars_dtype(fragment: dict[str, Any], expected: pl.DataType) -> None:
    assert polars_dtype(fragment, ROOT_DEFS) == expected


def test_column_dtypes_in_property_order_with_prefix() -> None:
    got = column_dtypes(INVOICE, "ans_")
    assert list(got) == [f"ans_{k}" for k in INVOICE["properties"]]
    assert got == {f"ans_{k}": v for k, v in INVOICE_DTYPES.items()}
    assert column_dtypes(INVOICE) == INVOICE_DTYPES


def test_unresolvable_ref_is_not_guessed() -> None:
    with pytest.raises(ValueError, match="points at nothing"):
        polars_dtype({"$ref": "#/$defs/missing"}, {"$defs": {}})


# ---------------------------------------------------------------- check_schema

SCHEMA_ERRORS: list[tuple[str, object, bool, str]] = [
    ("not a dict", ["type", "object"], False, "$: a schema must be a JSON object, got list"),
    ("bad type value", obj({"x": {"type": "strin"}}), False, "$.properties.x.type: not a valid JSON Schema"),
    (
        "bad nested keyword",
        obj({"x": {"type": "array", "items": {"minItems": -1}}}),
        False,
        "$.properties.x.items.minItems:",
    ),
    ("required not a list", {"type": "object", "properties": {"a": {}}, "required": "a"}, False, "$.required:"),
    ("odd property name", obj({"unit price": {"type": 3}}), False, '$.properties["unit price"].type:'),
    (
        "top level array",
        {"type": "array", "items": {"type": "string"}},
        False,
        '$.type: the top level must be "type": "object"',
    ),
    ("top level no type", {"properties": {"a": {"type": "string"}}}, False, "$.type:"),
    ("top level no properties", {"type": "object"}, False, "$.properties: the top level needs properties"),
    (
        "dangling ref",
        obj({"a": {"$ref": "#/$defs/nope"}}),
        False,
        "$.properties.a.$ref: $ref '#/$defs/nope' points at nothing",
    ),
    ("remote ref", obj({"a": {"$ref": "https://example.com/s.json"}}), False, "$.properties.a.$ref: $ref 'https://"),
    (
        "strict top level open",
        obj({"a": {"type": "string"}}, strict=False),
        True,
        "$: strict mode needs additionalProperties: false",
    ),
    (
        "strict top level missing required",
        {"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a"], "additionalProperties": False},
        True,
        "$: strict mode needs every property in required (missing 'b')",
    ),
    (
        "strict items",
        obj({"items": {"type": "array", "items": obj({"sku": {"type": "string"}}, strict=False)}}),
        True,
        "$.properties.items.items: strict mode needs additionalProperties: false on every object",
    ),
    (
        "strict nested struct required",
        obj({"a": {**obj({"b": {"type": "integer"}, "c": {"type": "integer"}}), "required": ["b"]}}),
        True,
        "$.properties.a: strict mode needs every property in required (missing 'c')",
    ),
    (
        "strict anyOf branch",
        obj({"a": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"b": {}}, "required": ["b"]}]}}),
        True,
        "$.properties.a.anyOf[1]: strict mode needs additionalProperties: false",
    ),
    (
        "strict oneOf branch",
        obj({"a": {"oneOf": [obj({"b": {}}), {"type": ["object", "null"]}]}}),
        True,
        "$.properties.a.oneOf[1]: strict mode needs additionalProperties: false",
    ),
    (
        "strict $defs",
        {**obj({"a": {"$ref": "#/$defs/x"}}), "$defs": {"x": {"type": "object", "properties": {"y": {}}}}},
        True,
        "$.$defs.x: strict mode needs additionalProperties: false",
    ),
    (
        "strict free-form object",
        obj({"meta": {"type": "object"}}),
        True,
        "$.properties.meta: strict mode needs additionalProperties: false",
    ),
]


@pytest.mark.parametrize(
    ("schema", "strict", "needle"), [c[1:] for c in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS]
)
def test_check_schema_errors(schema: object, strict: bool, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        check_schema(schema, strict=strict, source=SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}: $"), message
    assert needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "schema",
    [
        INVOICE_STRICT,
        obj({"a": {"type": ["string", "null"]}, "b": {"anyOf": [obj({"c": {"type": "integer"}}), {"type": "null"}]}}),
        {**obj({"n": {"$ref": "#/$defs/node"}}), "$defs": ROOT_DEFS["$defs"]},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            **obj({"a": {"$ref": "#/definitions/x"}}),
            "definitions": {"x": {"type": "integer"}},
        },
    ],
    ids=["invoice", "nullable", "recursive", "draft7"],
)
def test_valid_strict_schemas_pass(schema: dict[str, Any]) -> None:
    check_schema(schema, strict=True, source=SRC)
    check_schema(schema, strict=False, source=SRC)


def test_non_strict_allows_open_objects() -> None:
    schema = obj({"a": {"type": "object", "properties": {"b": {}}}})
    check_schema(schema, strict=False, source=SRC)
    with pytest.raises(SpecError, match=r"\$\.properties\.a: strict"):
        check_schema(schema, strict=True, source=SRC)


def test_draft7_meta_schema_is_used() -> None:
    # Draft 7 has no "$defs" keyword semantics but does check "definitions" values are schemas.
    bad = {"$schema": "http://json-schema.org/draft-07/schema#", **obj({"a": {}}), "definitions": {"x": 3}}
    with pytest.raises(SpecError, match=r"\$\.definitions\.x: not a valid JSON Schema"):
        check_schema(bad, strict=False, source=SRC)


def test_column_clash() -> None:
    schema = obj({"label": {"type": "string"}, "score": {"type": "number"}})
    check_column_clash(schema, "", ["text", "id"], SRC)
    with pytest.raises(SpecError) as info:
        check_column_clash(schema, "", ["text", "score", "status"], SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}: $.properties.score: typed column 'score'")
    assert "output.column_prefix" in message
    assert "\n" not in message
    check_column_clash(schema, "ans_", ["text", "score", "label"], SRC)
    with pytest.raises(SpecError, match="'ans_label'"):
        check_column_clash(schema, "ans_", ["ans_label"], SRC)


# ---------------------------------------------------------------- compile_validator

VALIDATE_SCHEMA: dict[str, Any] = obj(
    {
        "label": {"type": "string", "enum": ["pos", "neg"]},
        "score": {"type": "number", "minimum": 0},
        "items": {"type": "array", "items": obj({"qty": {"type": "integer"}})},
        "unit price": {"type": ["number", "null"]},
    }
)
GOOD = {"label": "pos", "score": 0.5, "items": [{"qty": 1}], "unit price": None}

VALIDATION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("enum", {**GOOD, "label": "maybe"}, "at $.label: 'maybe' is not one of ['pos', 'neg']"),
    ("minimum", {**GOOD, "score": -1}, "at $.score: -1 is less than the minimum of 0"),
    ("nested type", {**GOOD, "items": [{"qty": 1}, {"qty": "2"}]}, "at $.items[1].qty: '2' is not of type 'integer'"),
    (
        "nested extra key",
        {**GOOD, "items": [{"qty": 1, "x": 0}]},
        "at $.items[0]: Additional properties are not allowed",
    ),
    ("missing", {k: v for k, v in GOOD.items() if k != "score"}, "at $: 'score' is a required property"),
    ("odd key", {**GOOD, "unit price": "3"}, "at $[\"unit price\"]: '3' is not of type"),
]


@pytest.mark.parametrize(("doc", "expected"), [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES])
def test_compile_validator_messages(doc: dict[str, Any], expected: str) -> None:
    check = compile_validator(VALIDATE_SCHEMA)
    problem = check(doc)
    assert problem is not None
    assert problem.startswith(expected), problem
    assert "\n" not in problem


def test_compile_validator_accepts_valid_and_resolves_refs() -> None:
    assert compile_validator(VALIDATE_SCHEMA)(GOOD) is None
    check = compile_validator(INVOICE)
    doc = {"vendor": "A", "currency": "EUR", "total": 3, "paid": None, "lines": [], "tags": [], "extra": {}}
    assert check(doc) is None
    assert check({**doc, "lines": [{"sku": "x", "qty": 1.5, "price": None}]}) == (
        "at $.lines[0].qty: 1.5 is not of type 'integer'"
    )


def test_compile_validator_long_values_stay_short() -> None:
    problem = compile_validator(VALIDATE_SCHEMA)({**GOOD, "label": "line\n" * 500})
    assert problem is not None
    assert "\n" not in problem
    assert len(problem) <= 400


# ---------------------------------------------------------------- typed_columns


def test_typed_columns_none_rows_and_nested() -> None:
    docs: list[dict[str, Any] | None] = [
        {
            "vendor": "Ärger GmbH",
            "currency": "EUR",
            "total": 12,
            "paid": True,
            "lines": [{"sku": "a", "qty": 2, "price": 5}, {"sku": "b", "qty": 1.0, "price": None}],
            "tags": ["x"],
            "extra": {"b": 1, "a": [1, "ü"]},
        },
        None,
        {"vendor": "B", "currency": "USD", "total": 1.5, "lines": [], "tags": [], "extra": {}, "undeclared": 1},
    ]
    cols = typed_columns(docs, INVOICE, "ans_")
    assert [s.name for s in cols] == [f"ans_{k}" for k in INVOICE["properties"]]
    assert {s.name: s.dtype for s in cols} == column_dtypes(INVOICE, "ans_")
    df = pl.DataFrame(cols)
    assert df.row(1) == (None,) * len(cols)
    assert df["ans_total"].to_list() == [12.0, None, 1.5]
    assert df["ans_paid"].to_list() == [True, None, None]  # missing optional property -> null
    assert df["ans_lines"].to_list() == [
        [{"sku": "a", "qty": 2, "price": 5.0}, {"sku": "b", "qty": 1, "price": None}],
        None,
        [],
    ]
    # free-form values are JSON text: key order as given, non-ASCII kept.
    assert df["ans_extra"].to_list() == ['{"b": 1, "a": [1, "ü"]}', None, "{}"]
    assert df["ans_currency"].cast(pl.String).to_list() == ["EUR", None, "USD"]


def test_typed_columns_json_cells_always_parse() -> None:
    schema = obj({"v": {"type": ["string", "integer", "null"]}, "any": {"type": "array"}})
    cols = typed_columns(
        [{"v": "abc", "any": ["x", {"k": None}]}, {"v": 3, "any": None}, {"v": None, "any": []}], schema
    )
    v, anys = cols
    assert v.dtype == pl.String and v.to_list() == ['"abc"', "3", None]
    assert anys.dtype == pl.List(pl.String) and anys.to_list() == [['"x"', '{"k": null}'], None, []]
    assert [json.loads(x) for x in v.drop_nulls()] == ["abc", 3]


def test_typed_columns_empty_batch_keeps_dtypes() -> None:
    cols = typed_columns([], INVOICE)
    assert [len(s) for s in cols] == [0] * len(cols)
    assert {s.name: s.dtype for s in cols} == INVOICE_DTYPES


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"n": 1.5}, "at $.n: 1.5 does not fit Int64"),
        ({"n": True}, "at $.n: True does not fit Int64"),
        ({"n": 2**63}, "out of range"),
        ({"e": "maybe"}, "at $.e: 'maybe' does not fit Enum['pos', 'neg']"),
        ({"s": 3}, "at $.s: 3 does not fit String"),
        ({"b": "yes"}, "at $.b: 'yes' does not fit Boolean"),
        ({"f": "1.5"}, "at $.f: '1.5' does not fit Float64"),
        ({"xs": [{"n": 1}, {"n": "2"}]}, "at $.xs[1].n: '2' does not fit Int64"),
        ({"xs": {"n": 1}}, "at $.xs: {'n': 1} does not fit a List column"),
        ({"xs": [3]}, "at $.xs[0]: 3 does not fit a Struct column"),
    ],
)
def test_typed_columns_never_coerce(doc: dict[str, Any], needle: str) -> None:
    schema = obj(
        {
            "n": {"type": "integer"},
            "e": {"type": "string", "enum": ["pos", "neg"]},
            "s": {"type": "string"},
            "b": {"type": "boolean"},
            "f": {"type": "number"},
            "xs": {"type": "array", "items": obj({"n": {"type": "integer"}})},
        }
    )
    with pytest.raises(ValueError, match=r"^row 1: ") as info:
        typed_columns([None, doc], schema)
    assert needle in str(info.value)


def test_typed_columns_rejects_non_object_document() -> None:
    with pytest.raises(ValueError, match="row 0: document is list"):
        typed_columns([[1]], INVOICE)  # type: ignore[list-item]


# ---------------------------------------------------------------- Parquet


def test_parquet_round_trip_keeps_enum_struct_list() -> None:
    docs: list[dict[str, Any] | None] = [
        {
            "vendor": "A",
            "currency": "GBP",
            "total": 2.0,
            "paid": False,
            "lines": [{"sku": "s", "qty": 3, "price": 1.25}],
            "tags": ["t"],
            "extra": {"z": 1},
        },
        None,
    ]
    schema = {
        **INVOICE,
        "properties": {
            **INVOICE["properties"],
            "deep": {
                "type": "array",
                "items": obj(
                    {
                        "label": {"$ref": "#/$defs/label"},
                        "labels": {"type": "array", "items": {"$ref": "#/$defs/label"}},
                    }
                ),
            },
        },
    }
    schema["$defs"] = {**INVOICE["$defs"], "label": {"type": "string", "enum": ["pos", "neg", "neutral"]}}
    docs[0]["deep"] = [{"label": "neg", "labels": ["pos", "neutral"]}]  # type: ignore[index]
    df = pl.DataFrame(typed_columns(docs, schema))
    assert df.schema["deep"] == pl.List(pl.Struct({"label": LABEL, "labels": pl.List(LABEL)}))
    buf = io.BytesIO()
    pq.write_table(df.to_arrow(), buf)
    buf.seek(0)
    back = pl.read_parquet(buf)
    assert back.schema == df.schema
    assert isinstance(back.schema["currency"], pl.Enum)
    assert back.schema["currency"] == pl.Enum(["EUR", "USD", "GBP"])  # category order survives, not just values
    assert back.equals(df)


# ---------------------------------------------------------------- property

_text = st.text(max_size=8)
_money = st.one_of(st.integers(-(10**6), 10**6), st.floats(-1e6, 1e6, allow_nan=False))
_line = st.fixed_dictionaries(
    {"sku": _text, "qty": st.integers(-(2**63), 2**63 - 1), "price": st.one_of(st.none(), _money)}
)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), _text)
_json = st.recursive(
    _json_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text, kids, max_size=3), max_leaves=6
)
_invoice = st.fixed_dictionaries(
    {
        "vendor": _text,
        "currency": st.sampled_from(["EUR", "USD", "GBP"]),
        "total": _money,
        "paid": st.one_of(st.none(), st.booleans()),
        "lines": st.lists(_line, max_size=4),
        "tags": st.lists(_text, max_size=3),
        "extra": st.dictionaries(_text, _json, max_size=3),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.none(), _invoice), max_size=6))
def test_valid_invoices_always_build_columns(docs: list[dict[str, Any] | None]) -> None:
    check = compile_validator(INVOICE)
    assert all(check(d) is None for d in docs if d is not None)
    cols = typed_columns(docs, INVOICE)
    assert {s.name: s.dtype for s in cols} == INVOICE_DTYPES
    assert all(len(s) == len(docs) for s in cols)
    for s in cols:
        for value, doc in zip(s.to_list(), docs, strict=True):
            if doc is None:
                assert value is None
    extra = cols[list(INVOICE["properties"]).index("extra")].to_list()
    assert [json.loads(x) if x is not None else None for x in extra] == [d and d["extra"] for d in docs]
