"""JSON Schema for structured answers: check the schema a job gives, and validate answers against it.

Pure functions, no I/O: the caller loads the schema file and passes its name as ``source`` so every
``SpecError`` can point at the file and the JSON path inside it. jsonschema loads only when a job
validates answers (``compile_validator``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from pipeline.errors import SpecError

__all__ = ["check_schema", "compile_validator", "format_path", "one_line", "resolve_ref", "type_names"]

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")
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


def one_line(text: str) -> str:
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
        raise SpecError(one_line(f"{source}: {where}: not a valid JSON Schema: {error.message}"))
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
                raise SpecError(one_line(f"{source}: {format_path((*path, '$ref'))}: {exc}")) from None
        if strict:
            problem = _strict_problem(node)
            if problem:
                raise SpecError(one_line(f"{source}: {format_path(path)}: {problem}"))


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
        return one_line(f"at {format_path(error.absolute_path)}: {error.message}")

    return check
