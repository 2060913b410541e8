"""JSON Schema for structured answers: turn top-level properties into typed columns.

Checking a schema and validating answers against it are ``schema_checks``' (re-exported here, the one
place callers import schema functions from). Pure functions, no I/O.

Dtype rules (``polars_dtype``), applied at every level of nesting:

============================================  ===========================================
schema                                         polars dtype
============================================  ===========================================
``string``                                     ``String``
``string`` with an all-string ``enum``         ``Enum(values)`` (order kept, duplicates dropped)
``const`` string                               ``String``
``integer``                                    ``Int64``
``number`` (or ``integer`` + ``number``)       ``Float64``
``boolean``                                    ``Boolean``
``array`` with ``items``                       ``List(dtype of items)``
``object`` with non-empty ``properties``       ``Struct(fields in property order)``
``[T, "null"]``, ``anyOf``/``oneOf`` [T, null]  dtype of T (every polars column is nullable)
``$ref`` ``#/$defs/x``, ``#/definitions/x``    dtype of the target
anything else                                  ``String`` holding ``json.dumps`` of the value
============================================  ===========================================

"Anything else" is a free-form object (no properties), an array without ``items`` (its elements are
JSON text), tuples (``prefixItems``), unions of different shapes, ``allOf`` of several schemas, a schema
without ``type``, and recursive ``$ref`` cycles. Such a cell always holds JSON text, even for a plain
string value (``"abc"`` becomes ``'"abc"'``), so every cell of a JSON column parses with ``json.loads``
and no reader has to guess which cells are encoded. A JSON ``null`` stays a null cell.

Keys an object carries beyond its declared ``properties`` are not kept in its Struct, exactly as
undeclared top-level keys get no column; the raw answer is where they survive. ``format`` is an
annotation only (the 2020-12 default): it is not checked and does not change the dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl
from polars.datatypes import DataTypeClass

from pipeline.errors import SpecError
from pipeline.job.schema_checks import check_schema, compile_validator, format_path, one_line, resolve_ref, type_names
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow as pa
else:  # only nested schema fields go through pyarrow (see lazy)
    pa = lazy("pyarrow")

__all__ = [
    "check_column_clash",
    "check_schema",
    "column_dtypes",
    "compile_validator",
    "format_path",
    "polars_dtype",
    "resolve_ref",
    "type_names",
    "typed_columns",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------- dtype plans


@dataclass(frozen=True, slots=True)
class _Scalar:
    """A leaf whose Python value goes into the column as is, after a type check."""

    dtype: pl.DataType


@dataclass(frozen=True, slots=True)
class _Json:
    """A value polars cannot type from the schema: stored as its JSON text in a String column."""


@dataclass(frozen=True, slots=True)
class _List:
    inner: _Plan


@dataclass(frozen=True, slots=True)
class _Struct:
    fields: tuple[tuple[str, _Plan], ...]


_Plan = _Scalar | _Json | _List | _Struct

_STRING, _INT, _FLOAT, _BOOL = _Scalar(pl.String()), _Scalar(pl.Int64()), _Scalar(pl.Float64()), _Scalar(pl.Boolean())
_JSON = _Json()
_BY_TYPE: dict[str, _Plan] = {"string": _STRING, "integer": _INT, "number": _FLOAT, "boolean": _BOOL}


def _is_null_schema(node: Any) -> bool:
    return isinstance(node, Mapping) and type_names(node) == ["null"] and not {"anyOf", "oneOf", "$ref"} & set(node)


def _merge(plans: list[_Plan]) -> _Plan:
    """One column dtype for alternatives: only when they agree (or are integer/number, which floats hold)."""
    if not plans:
        return _JSON
    if all(p == plans[0] for p in plans):
        return plans[0]
    if all(p in (_INT, _FLOAT) for p in plans):
        return _FLOAT
    return _JSON


def _enum_plan(values: list[Any]) -> _Plan | None:
    strings = [v for v in values if v is not None]
    if not strings or not all(isinstance(v, str) for v in strings):
        return None
    return _Scalar(pl.Enum(list(dict.fromkeys(strings))))


def _plan(node: Any, root: Mapping[str, Any], seen: frozenset[str]) -> _Plan:
    if not isinstance(node, Mapping):
        return _JSON  # true/false schemas accept anything or nothing
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref in seen:
            return _JSON  # recursive structure: no finite polars dtype
        return _plan(resolve_ref(ref, root), root, seen | {ref})
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list):
            return _merge([_plan(b, root, seen) for b in branches if not _is_null_schema(b)])
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        return _plan(all_of[0], root, seen) if len(all_of) == 1 else _JSON
    types = [t for t in type_names(node) if t != "null"]
    if "const" in node and not types:
        return _STRING if isinstance(node["const"], str) else _JSON
    if len(types) != 1:
        return _merge([_BY_TYPE[t] for t in types]) if set(types) == {"integer", "number"} else _JSON
    kind = types[0]
    if kind == "string":
        enum = node.get("enum")
        return (_enum_plan(enum) or _STRING) if isinstance(enum, list) else _STRING
    if kind in _BY_TYPE:
        return _BY_TYPE[kind]
    if kind == "array":
        items = node.get("items")
        if "prefixItems" in node:
            return _JSON
        return _List(_plan(items, root, seen) if items is not None else _JSON)
    if kind == "object":
        props = node.get("properties")
        if isinstance(props, Mapping) and props:
            return _Struct(tuple((str(name), _plan(sub, root, seen)) for name, sub in props.items()))
    return _JSON


def _dtype(plan: _Plan) -> pl.DataType:
    if isinstance(plan, _Scalar):
        return plan.dtype
    if isinstance(plan, _Json):
        return pl.String()
    if isinstance(plan, _List):
        return pl.List(_dtype(plan.inner))
    return pl.Struct({name: _dtype(sub) for name, sub in plan.fields})


def polars_dtype(subschema: dict[str, Any], root: dict[str, Any]) -> pl.DataType:
    """The polars dtype for values of ``subschema`` (see the module docstring for the rules)."""
    return _dtype(_plan(subschema, root, frozenset()))


def _top_plans(schema: Mapping[str, Any]) -> dict[str, _Plan]:
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        raise ValueError("schema has no top-level properties")
    return {str(name): _plan(sub, schema, frozenset()) for name, sub in props.items()}


def column_dtypes(schema: dict[str, Any], prefix: str = "") -> dict[str, pl.DataType]:
    """Top-level property -> dtype, column names prefixed, in schema property order."""
    return {f"{prefix}{name}": _dtype(plan) for name, plan in _top_plans(schema).items()}


def check_column_clash(schema: dict[str, Any], prefix: str, taken: Iterable[str], source: str) -> None:
    """``SpecError`` when a typed column would overwrite an input column or one seedbatch writes itself."""
    taken_set = set(taken)
    props = schema.get("properties")
    for name in props if isinstance(props, Mapping) else ():
        column = f"{prefix}{name}"
        if column in taken_set:
            raise SpecError(
                f"{source}: {format_path(('properties', str(name)))}: typed column {column!r} clashes with "
                'an existing column; set output.column_prefix (e.g. "ans_") to keep both'
            )


# ---------------------------------------------------------------- typed_columns


class _Misfit(Exception):
    """A value that does not fit its dtype; the path is collected on the way out, so the happy path pays nothing."""

    def __init__(self, value: Any, want: str) -> None:
        super().__init__(want)
        self.value, self.want = value, want
        self.path: list[str | int] = []  # innermost first

    def describe(self) -> str:
        shown = one_line(repr(self.value))[:80]
        return f"at {format_path(reversed(self.path))}: {shown} does not fit {self.want}"


_Convert = Callable[[Any], Any]


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=False, ensure_ascii=False)


def _to_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Misfit(value, "String")


def _to_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _Misfit(value, "Boolean")


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Misfit(value, "Float64")
    return float(value)


def _to_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Misfit(value, "Int64")
    if isinstance(value, float):
        # JSON Schema counts 1.0 as an integer, so a validated answer may carry one; it fits exactly.
        if not value.is_integer():
            raise _Misfit(value, "Int64")
        value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _Misfit(value, "Int64 (out of range)")
    return int(value)


def _to_enum(categories: list[str]) -> _Convert:
    allowed = frozenset(categories)

    def convert(value: Any) -> str | None:
        if value is None or (isinstance(value, str) and value in allowed):
            return value
        raise _Misfit(value, f"Enum{categories}")

    return convert


def _to_list(inner: _Convert) -> _Convert:
    def convert(value: Any) -> list[Any] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise _Misfit(value, "a List column")
        out: list[Any] = []
        try:
            for item in value:
                out.append(inner(item))
        except _Misfit as exc:
            exc.path.append(len(out))
            raise
        return out

    return convert


def _to_struct(fields: list[tuple[str, _Convert]]) -> _Convert:
    def convert(value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise _Misfit(value, "a Struct column")
        out: dict[str, Any] = {}
        name = ""
        try:
            for name, sub in fields:
                out[name] = sub(value.get(name))
        except _Misfit as exc:
            exc.path.append(name)
            raise
        return out

    return convert


def _converter(plan: _Plan) -> _Convert:
    """Type-check every value here, so polars never gets the chance to coerce it; built once per batch."""
    if isinstance(plan, _Json):
        return _json_text
    if isinstance(plan, _List):
        return _to_list(_converter(plan.inner))
    if isinstance(plan, _Struct):
        return _to_struct([(name, _converter(sub)) for name, sub in plan.fields])
    dtype = plan.dtype
    if isinstance(dtype, pl.Enum):
        return _to_enum(dtype.categories.to_list())
    scalars: dict[pl.DataType, _Convert] = {
        pl.String(): _to_str,
        pl.Boolean(): _to_bool,
        pl.Float64(): _to_float,
        pl.Int64(): _to_int,
    }
    return scalars[dtype]


def _plain(dtype: pl.DataType | DataTypeClass) -> pl.DataType:
    """``dtype`` with every Enum spelled String: arrow builds those from Python strs, polars then casts."""
    dt: pl.DataType = dtype() if isinstance(dtype, DataTypeClass) else dtype
    if isinstance(dt, pl.Enum):
        return pl.String()
    if isinstance(dt, pl.List):
        return pl.List(_plain(dt.inner))
    if isinstance(dt, pl.Struct):
        return pl.Struct({f.name: _plain(f.dtype) for f in dt.fields})
    return dt


def _series(name: str, values: list[Any], dtype: pl.DataType) -> pl.Series:
    """A Series of exactly ``dtype`` from values ``_converter`` already checked.

    Nested values go through ``pa.array`` because polars builds List/Struct from Python one row at a
    time (an order of magnitude slower on lists of structs); arrow is just as strict about types, and the
    String -> Enum cast is strict, so nothing is coerced on either path.
    """
    if not isinstance(dtype, pl.List | pl.Struct):
        return pl.Series(name, values, dtype=dtype, strict=True)
    plain = _plain(dtype)
    arrow_type = pl.Series(name, [], dtype=plain).to_arrow().type
    series = pl.Series(name, pa.array(values, type=arrow_type))
    return series if plain == dtype else series.cast(dtype, strict=True)


def typed_columns(docs: Sequence[dict[str, Any] | None], schema: dict[str, Any], prefix: str = "") -> list[pl.Series]:
    """One typed Series per top-level property, rows aligned with ``docs`` (``None`` -> null everywhere).

    Raises ``ValueError`` naming the row and path when a value does not fit its dtype: the caller only
    passes validated documents, so that means a schema/dtype mismatch worth hearing about, not data
    to fix up quietly.
    """
    plans = _top_plans(schema)
    converters: list[tuple[str, _Convert, list[Any]]] = [(name, _converter(plan), []) for name, plan in plans.items()]
    columns: dict[str, list[Any]] = {name: values for name, _, values in converters}
    for row, doc in enumerate(docs):
        if doc is None:
            for values in columns.values():
                values.append(None)
            continue
        if not isinstance(doc, Mapping):
            raise ValueError(f"row {row}: document is {type(doc).__name__}, not an object")
        name = ""
        try:
            for name, convert, values in converters:
                values.append(convert(doc.get(name)))
        except _Misfit as exc:
            exc.path.append(name)
            raise ValueError(f"row {row}: {exc.describe()}") from None
    return [_series(f"{prefix}{name}", columns[name], _dtype(plan)) for name, plan in plans.items()]
