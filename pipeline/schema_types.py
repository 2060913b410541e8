"""JSON Schema for structured answers: check it, validate answers, turn top-level properties into typed columns.

Pure functions, no I/O: the caller loads the schema file and passes its name as ``source`` so every
``SpecError`` can point at the file and the JSON path inside it.

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
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import polars as pl
from polars.datatypes import DataTypeClass

from pipeline.errors import SpecError
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
    "typed_columns",
]

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_MESSAGE = 400
_BRANCH_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_DEF_KEYS = ("$defs", "definitions")


def format_path(parts: Iterable[str | int]) -> str:
    """``$.a.b[0]``: the one spelling users see both for schema problems and for answer problems."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENT.match(part):
            out.append(f".{part}")
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return "".join(out)


def _one_line(text: str) -> str:
    """Messages end up in a ledger cell and a terminal line; a repr of a long answer must not flood either."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_MESSAGE else flat[: _MAX_MESSAGE - 3] + "..."


def type_names(node: Mapping[str, Any]) -> list[str]:
    t = node.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    return []


# ---------------------------------------------------------------- $ref


def resolve_ref(ref: str, root: Mapping[str, Any]) -> Any:
    """Only local JSON pointers: the schema travels to the API inline, so nothing else could resolve there."""
    if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
        raise ValueError(f"$ref {ref!r} is not a local reference like '#/$defs/Name'")
    node: Any = root
    for raw in ref[2:].split("/") if len(ref) > 1 else []:
        key = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise ValueError(f"$ref {ref!r} points at nothing in this schema")
    return node


# ---------------------------------------------------------------- check_schema


def _subschemas(node: Mapping[str, Any], path: tuple[str | int, ...]) -> Iterator[tuple[Any, tuple[str | int, ...]]]:
    """The places where a schema nests schemas that can describe objects of the answer."""
    props = node.get("properties")
    if isinstance(props, Mapping):
        for name, sub in props.items():
            yield sub, (*path, "properties", name)
    for key in ("items", "additionalProperties", "not"):
        sub = node.get(key)
        if isinstance(sub, Mapping):
            yield sub, (*path, key)
    for key in _BRANCH_KEYS:
        branches = node.get(key)
        if isinstance(branches, list):
            for i, sub in enumerate(branches):
                yield sub, (*path, key, i)
    for key in _DEF_KEYS:
        defs = node.get(key)
        if isinstance(defs, Mapping):
            for name, sub in defs.items():
                yield sub, (*path, key, name)


def _walk(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Mapping[str, Any], tuple[str | int, ...]]]:
    if isinstance(node, Mapping):
        yield node, path
        for sub, sub_path in _subschemas(node, path):
            yield from _walk(sub, sub_path)


def _strict_problem(node: Mapping[str, Any]) -> str | None:
    if "object" not in type_names(node) and "properties" not in node:
        return None
    if node.get("additionalProperties") is not False:
        return "strict mode needs additionalProperties: false on every object"
    props = node.get("properties")
    names = list(props) if isinstance(props, Mapping) else []
    required = node.get("required")
    listed = set(required) if isinstance(required, list) else set()
    missing = [n for n in names if n not in listed]
    if missing:
        shown = ", ".join(repr(n) for n in missing)
        return f"strict mode needs every property in required (missing {shown}); make optional ones nullable instead"
    return None


def check_schema(schema: object, *, strict: bool, source: str, columns: bool = True) -> None:
    """Raise ``SpecError`` (one line: source, JSON path, problem) when the schema is unusable.

    Checked before any request is sent, because a bad schema would otherwise fail every row, and
    the API's own complaint would not say which file or which nested property is wrong. ``columns=False``
    (a function's parameters that no column is made from) drops the need for a top-level object with
    properties: a function may take no arguments.
    """
    if not isinstance(schema, dict):
        raise SpecError(f"{source}: $: a schema must be a JSON object, got {type(schema).__name__}")
    from jsonschema.exceptions import best_match  # jsonschema loads for schema jobs only
    from jsonschema.validators import Draft202012Validator, validator_for

    cls = validator_for(schema, default=Draft202012Validator)
    meta_cls = validator_for(cls.META_SCHEMA, default=cls)
    error = best_match(meta_cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = format_path(error.absolute_path)
        raise SpecError(_one_line(f"{source}: {where}: not a valid JSON Schema: {error.message}"))
    if columns and schema.get("type") != "object":
        raise SpecError(
            f'{source}: $.type: the top level must be "type": "object" (its properties become the output columns)'
        )
    props = schema.get("properties")
    if columns and (not isinstance(props, dict) or not props):
        raise SpecError(f"{source}: $.properties: the top level needs properties (one output column each)")
    for node, path in _walk(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolve_ref(ref, schema)
            except ValueError as exc:
                raise SpecError(_one_line(f"{source}: {format_path((*path, '$ref'))}: {exc}")) from None
        if strict:
            problem = _strict_problem(node)
            if problem:
                raise SpecError(_one_line(f"{source}: {format_path(path)}: {problem}"))


# ---------------------------------------------------------------- compile_validator


def compile_validator(schema: dict[str, Any]) -> Callable[[object], str | None]:
    """A checker ``doc -> None | "at $.path: problem"`` built once per job.

    The validator instance (and the $ref registry it builds) is made here, not per answer, because
    it runs on every row. ``best_match`` picks the error a person would fix first.
    """
    from jsonschema.exceptions import ValidationError, best_match
    from jsonschema.validators import Draft202012Validator, validator_for

    validator = validator_for(schema, default=Draft202012Validator)(schema)

    def check(doc: object) -> str | None:
        error: ValidationError | None = best_match(validator.iter_errors(doc))
        if error is None:
            return None
        return _one_line(f"at {format_path(error.absolute_path)}: {error.message}")

    return check


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
        shown = _one_line(repr(self.value))[:80]
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
    time (about 15x slower on lists of structs); arrow is just as strict about types, and the
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
