"""JSON Schemas a grammar-constrained server can enforce, and how many tokens an answer needs. Pure.

A server that turns the schema into a grammar (llama.cpp's ``json_object`` + ``schema``) keeps answers
well-formed, but only enforces the keywords its converter knows: ``enum``/``const``, ``maxLength``/
``minLength`` on strings, ``minItems``/``maxItems``, ``pattern``, a few ``format`` values, ``$ref``,
``anyOf``/``oneOf``. It ignores ``minimum``/``maximum`` (a bounded integer may come back as any integer) and
lets an open string run until ``max_tokens`` (a small model may fill it with one run of digits). It also reads a type
list (``["integer", "null"]``) as bare types and drops every other keyword of that node.

``enforceable`` rewrites a schema into a *tighter* one such servers do enforce:

===========================================  ================================================
original                                      enforceable
===========================================  ================================================
integer with bounds, at most 64 values        the same plus ``enum`` of the allowed integers
integer with a wider range (0..1000)          unchanged: no grammar keyword can say it; the
                                              caller's validation against the original catches it
open string (no enum/const/pattern/           the same plus ``maxLength`` (the budget share)
maxLength, no fixed-size ``format``)
open array (no maxItems/prefixItems)          the same plus ``maxItems`` (the budget share)
``type: [T, "null"]``                         ``anyOf: [{T and its keywords}, {"type": "null"}]``
``$ref``                                      the target inlined (each use gets its own bounds);
                                              a recursive ``$ref`` is kept, with the ``$defs``
===========================================  ================================================

Every document valid under ``enforceable(s)`` is valid under ``s``: keywords are only added, never
removed or relaxed (``not``, ``if``, ``contains`` and overlapping ``oneOf`` branches are copied as they
are, since tightening inside them could loosen the whole). The caller still validates against ``s``.

Sizes are in characters of the answer as ``json.dumps`` writes it (``", "`` and ``": "``), tokens as
characters / ``CHARS_PER_TOKEN``. Numbers without bounds count at the width of the longest int64 or
float64 literal; fixed-size formats (date, time, date-time, uuid) at their width. An object counts its
declared properties; extra keys make it unbounded only where the schema allows them explicitly
(``additionalProperties`` true or a schema, ``patternProperties``, or no ``properties`` at all),
because grammar converters emit declared keys only. Escapes count as one character.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Private helpers reused rather than copied: local-pointer $ref resolution and type-list reading.
from pipeline.job.schema_types import resolve_ref, type_names

__all__ = ["CHARS_PER_TOKEN", "document_size_tokens", "enforceable", "fit_warnings"]

#: Same estimate as ``prompts.CHARS_PER_TOKEN`` (not imported: prompts is the caller of this module).
CHARS_PER_TOKEN = 4.0
#: Tokens per character of string content when sizing bounds: the runaway a bound must stop is a run of
#: digits, which tokenizers split into one or two digits per token, not four characters of prose per token.
STRING_TOKENS_PER_CHAR = 1.0
#: Integer ranges with at most this many values become an ``enum``.
MAX_ENUM_INTEGERS = 64
#: Bounds given to open strings and arrays: never below the minimum, never above the cap.
STRING_MIN_CHARS, STRING_CAP_CHARS = 16, 200
ARRAY_MIN_ITEMS, ARRAY_CAP_ITEMS = 1, 8
#: Widths of numbers without bounds: ``-9223372036854775808`` and ``-2.2250738585072014e-308``.
INTEGER_CHARS, NUMBER_CHARS = 20, 24
#: Formats llama.cpp's converter turns into fixed-shape rules, by their longest value's width.
FIXED_FORMATS = {"date": 10, "time": 18, "date-time": 29, "uuid": 36}
_UUID_FORMAT = re.compile(r"^uuid[1-5]?$")

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
_DEF_KEYS = ("$defs", "definitions")
_BY_TYPE = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "array": frozenset(
        {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains"}
    ),
    "object": frozenset(
        {
            "properties",
            "required",
            "additionalProperties",
            "patternProperties",
            "propertyNames",
            "minProperties",
            "maxProperties",
            "dependentRequired",
            "dependentSchemas",
        }
    ),
}
_ALL_TYPED = frozenset().union(*_BY_TYPE.values())


# ---------------------------------------------------------------- shared reading


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _has_type(value: Any, kind: str) -> bool:
    actual = _json_type(value)
    return actual == kind or (kind == "number" and actual == "integer")


def _deref(node: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """A ``$ref`` node as one schema: its target, plus any sibling keywords (2020-12 applies both)."""
    target = resolve_ref(node["$ref"], root)
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    if not isinstance(target, Mapping):
        return target if not siblings else {"allOf": [target, siblings]}
    clash = [k for k in siblings if k in target and k not in _ANNOTATIONS and target[k] != siblings[k]]
    if clash:
        return {"allOf": [dict(target), siblings]}
    return {**target, **siblings}


def _int_range(node: Mapping[str, Any]) -> tuple[int, int] | None:
    """The closed integer range ``minimum``/``maximum`` (exclusive ones too, draft 4's booleans too) allow."""

    def num(key: str) -> float | None:
        value = node.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    lo, hi, ex_lo, ex_hi = num("minimum"), num("maximum"), num("exclusiveMinimum"), num("exclusiveMaximum")
    low = math.ceil(lo) if lo is not None else None
    high = math.floor(hi) if hi is not None else None
    if node.get("exclusiveMinimum") is True and lo is not None:
        low = math.floor(lo) + 1
    elif ex_lo is not None:
        low = math.floor(ex_lo) + 1 if low is None else max(low, math.floor(ex_lo) + 1)
    if node.get("exclusiveMaximum") is True and hi is not None:
        high = math.ceil(hi) - 1
    elif ex_hi is not None:
        high = math.ceil(ex_hi) - 1 if high is None else min(high, math.ceil(ex_hi) - 1)
    if low is None or high is None:
        return None
    return low, high


def _multiple_of(value: int, step: Any) -> bool:
    if not isinstance(step, int | float) or isinstance(step, bool) or step <= 0:
        return True
    quotient = value / step
    return abs(quotient - round(quotient)) < 1e-9


def _fixed_format(node: Mapping[str, Any]) -> int | None:
    fmt = node.get("format")
    if not isinstance(fmt, str):
        return None
    return FIXED_FORMATS["uuid"] if _UUID_FORMAT.match(fmt) else FIXED_FORMATS.get(fmt)


def _is_open_string(node: Mapping[str, Any]) -> bool:
    return not ({"enum", "const", "pattern", "maxLength"} & set(node)) and _fixed_format(node) is None


def _is_open_array(node: Mapping[str, Any]) -> bool:
    return not ({"enum", "const", "maxItems", "prefixItems"} & set(node))


def _is_tight_one_of(key: str, branches: list[Any]) -> bool:
    """``oneOf`` branches of pairwise different single types: tightening one cannot make another match."""
    if key != "oneOf":
        return False
    kinds: list[str] = []
    for branch in branches:
        names = type_names(branch) if isinstance(branch, Mapping) else []
        if len(names) != 1 or "$ref" in branch:
            return False
        kinds.append("number" if names[0] == "integer" else names[0])
    return len(set(kinds)) == len(kinds)


# ---------------------------------------------------------------- enforceable


@dataclass
class _Tightener:
    root: Mapping[str, Any]
    string_chars: int
    array_items: int
    keep_defs: bool
    kept_refs: bool = False

    def node(self, node: Any, seen: frozenset[str]) -> Any:
        if not isinstance(node, Mapping):
            return copy.deepcopy(node)  # true/false schemas
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in seen:
                self.kept_refs = True  # recursive: no finite inline form; the $defs stay in the output
                return copy.deepcopy(dict(node))
            return self.node(_deref(node, self.root), seen | {ref})
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, Mapping):
                out[key] = {name: self.node(sub, seen) for name, sub in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
                out[key] = self.node(value, seen)
            elif isinstance(value, list) and (key in ("prefixItems", "anyOf", "allOf") or _is_tight_one_of(key, value)):
                out[key] = [self.node(sub, seen) for sub in value]
            elif key in _DEF_KEYS and not self.keep_defs:
                continue
            else:
                out[key] = copy.deepcopy(value)  # not, if/then/else, contains, ...: tightening there could loosen
        kinds = list(dict.fromkeys(type_names(out)))
        if len(kinds) > 1:
            return self.split(out, kinds)
        if isinstance(out.get("type"), list) and kinds:
            out["type"] = kinds[0]
        return self.leaf(out)

    def split(self, node: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
        """``type: [A, B]`` as ``anyOf`` of one branch per type, each with the keywords that apply to it."""
        wrapper = {k: v for k, v in node.items() if k in _ANNOTATIONS}
        branches: list[dict[str, Any]] = []
        for kind in kinds:
            own = _BY_TYPE.get("number" if kind == "integer" else kind, frozenset())
            branch: dict[str, Any] = {"type": kind}
            for key, value in node.items():
                if key == "type" or key in _ANNOTATIONS or (key in _ALL_TYPED and key not in own):
                    continue
                branch[key] = copy.deepcopy(value)
            if isinstance(branch.get("enum"), list):
                branch["enum"] = [v for v in branch["enum"] if _has_type(v, kind)]
                if not branch["enum"]:
                    continue
            if "const" in branch and not _has_type(branch["const"], kind):
                continue
            branches.append(self.leaf(branch))
        wrapper["anyOf"] = branches
        return wrapper

    def leaf(self, node: dict[str, Any]) -> dict[str, Any]:
        kind = node.get("type")
        if kind == "integer" and "enum" not in node and "const" not in node:
            bounds = _int_range(node)
            if bounds is not None and 0 < bounds[1] - bounds[0] + 1 <= MAX_ENUM_INTEGERS:
                step = node.get("multipleOf")
                node["enum"] = [v for v in range(bounds[0], bounds[1] + 1) if _multiple_of(v, step)]
        elif kind == "string" and _is_open_string(node):
            least = node.get("minLength")
            node["maxLength"] = max(self.string_chars, least if isinstance(least, int) else 0)
        elif kind == "array" and _is_open_array(node):
            least = node.get("minItems")
            node["maxItems"] = max(self.array_items, least if isinstance(least, int) else 0)
        return node


def _tighten(schema: Mapping[str, Any], string_chars: int, array_items: int) -> dict[str, Any]:
    tightener = _Tightener(schema, string_chars, array_items, keep_defs=False)
    out = tightener.node(schema, frozenset())
    if tightener.kept_refs:
        tightener = _Tightener(schema, string_chars, array_items, keep_defs=True)
        out = tightener.node(schema, frozenset())
    if not isinstance(out, dict):
        raise ValueError("the schema must be a JSON object")
    return out


def enforceable(
    schema: Mapping[str, Any],
    *,
    max_tokens: int,
    string_max_chars: int | None = None,
    array_max_items: int | None = None,
) -> dict[str, Any]:
    """A new, tighter schema a grammar-constrained server enforces (see the module docstring); never mutates ``schema``.

    Open strings get ``maxLength = string_max_chars`` and open arrays ``maxItems = array_max_items``; a
    bound left ``None`` is chosen so the largest valid document fits in ``max_tokens``: both grow
    together from (16 chars, 1 item) to (200 chars, 8 items) and the largest pair that fits is kept.
    When even the minimums do not fit, the minimums are used and ``fit_warnings`` on the result says so.
    The fit holds where the whole document is bounded (``document_size_tokens(result)[1]`` is not None);
    unbounded parts (free-form objects, patterns, recursion) are left as they are and not counted.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    budget = max_tokens * CHARS_PER_TOKEN

    def build(share: float) -> dict[str, Any]:
        chars = string_max_chars if string_max_chars is not None else _scale(STRING_MIN_CHARS, STRING_CAP_CHARS, share)
        items = array_max_items if array_max_items is not None else _scale(ARRAY_MIN_ITEMS, ARRAY_CAP_ITEMS, share)
        return _tighten(schema, chars, items)

    def fits(share: float) -> bool:
        doc = build(share)
        # String content is budgeted at a token per character: the runaway a bound must stop is a digit
        # run ("1000000…"), one token per digit or two, not four characters of prose per token.
        return _Sizer(doc, string_weight=STRING_TOKENS_PER_CHAR * CHARS_PER_TOKEN).size(doc, frozenset()).most <= budget

    if fits(1.0):
        return build(1.0)
    low, high = 0.0, 1.0  # fits(low) may be false: then the minimums are the answer
    for _ in range(24):
        mid = (low + high) / 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return build(low)


def _scale(least: int, cap: int, share: float) -> int:
    return max(least, math.floor(least + (cap - least) * share))


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True, slots=True)
class _Size:
    least: int
    """Characters of the smallest valid document."""
    most: int
    """Characters of the largest one, counting unbounded parts at their smallest."""
    bounded: bool


_ANY = _Size(1, 1, False)


def _union(sizes: list[_Size]) -> _Size:
    if not sizes:
        return _Size(0, 0, True)
    return _Size(min(s.least for s in sizes), max(s.most for s in sizes), all(s.bounded for s in sizes))


def _literals(values: list[Any]) -> _Size:
    widths = [len(json.dumps(v)) for v in values]
    return _Size(min(widths), max(widths), True) if widths else _Size(0, 0, True)


def _sequence(count: int, each: int) -> int:
    """``[a, b, c]``: brackets, items, ``", "`` between."""
    return 2 + count * each + 2 * max(count - 1, 0)


@dataclass
class _Sizer:
    root: Mapping[str, Any]
    string_weight: float = 1.0
    """How many characters of budget one character of string content takes (see ``enforceable``)."""

    def size(self, node: Any, seen: frozenset[str]) -> _Size:
        if node is False:
            return _Size(0, 0, True)
        if not isinstance(node, Mapping):
            return _ANY
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in seen:
                return _ANY
            return self.size(_deref(node, self.root), seen | {ref})
        if isinstance(node.get("allOf"), list):
            rest = {k: v for k, v in node.items() if k != "allOf"}
            parts = [self.size(b, seen) for b in node["allOf"]]
            if set(rest) - _ANNOTATIONS:
                parts.append(self.size(rest, seen))
            bounded = [p.most for p in parts if p.bounded]
            most = min(bounded) if bounded else max(p.most for p in parts)
            return _Size(max(p.least for p in parts), most, bool(bounded))
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                return _union([self.size(b, seen) for b in node[key]])
        kinds = type_names(node)
        if not kinds:
            if isinstance(node.get("enum"), list):
                return _literals(node["enum"])
            if "const" in node:
                return _literals([node["const"]])
            if "properties" in node:
                kinds = ["object"]
            elif "items" in node or "prefixItems" in node:
                kinds = ["array"]
            else:
                return _ANY
        return _union([self.typed(node, kind, seen) for kind in dict.fromkeys(kinds)])

    def typed(self, node: Mapping[str, Any], kind: str, seen: frozenset[str]) -> _Size:
        if isinstance(node.get("enum"), list):
            return _literals([v for v in node["enum"] if _has_type(v, kind)])
        if "const" in node:
            return _literals([node["const"]] if _has_type(node["const"], kind) else [])
        if kind == "null":
            return _Size(4, 4, True)
        if kind == "boolean":
            return _Size(4, 5, True)
        if kind == "integer":
            bounds = _int_range(node)
            if bounds is None:
                return _Size(1, INTEGER_CHARS, True)
            low, high = bounds
            widths = (len(str(low)), len(str(high)))
            least = 1 if low <= 0 <= high else len(str(low)) if low > 0 else len(str(high))
            return _Size(least, max(widths), True)
        if kind == "number":
            return _Size(1, NUMBER_CHARS, True)
        if kind == "string":
            return self.string(node)
        if kind == "array":
            return self.array(node, seen)
        if kind == "object":
            return self.object(node, seen)
        return _ANY

    def string(self, node: Mapping[str, Any]) -> _Size:
        fixed = _fixed_format(node)
        if fixed is not None and "pattern" not in node:
            return _Size(fixed + 2, fixed + 2, True)
        least = node.get("minLength")
        low = 2 + (least if isinstance(least, int) else 0)
        most = node.get("maxLength")
        if isinstance(most, int):
            return _Size(low, max(low, 2 + math.ceil(most * self.string_weight)), True)
        return _Size(low, low, False)

    def array(self, node: Mapping[str, Any], seen: frozenset[str]) -> _Size:
        min_items = node.get("minItems")
        n_min = min_items if isinstance(min_items, int) else 0
        max_items = node.get("maxItems")
        n_max = max_items if isinstance(max_items, int) else None
        prefix = node.get("prefixItems")
        items = node.get("items", True)
        if isinstance(prefix, list):
            sizes = [self.size(p, seen) for p in prefix]
            first = sizes[:n_min]
            least = _sequence(len(first), 0) + sum(s.least for s in first)
            most = _sequence(len(sizes), 0) + sum(s.most for s in sizes)
            closed = items is False or (n_max is not None and n_max <= len(sizes))
            return _Size(least, most, closed and all(s.bounded for s in sizes))
        each = self.size(items, seen)
        if n_max is None:
            return _Size(_sequence(n_min, each.least), _sequence(n_min, each.most), False)
        return _Size(_sequence(n_min, each.least), _sequence(n_max, each.most), each.bounded or n_max == 0)

    def object(self, node: Mapping[str, Any], seen: frozenset[str]) -> _Size:
        props = node.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = node.get("required")
        needed = set(required) if isinstance(required, list) else set()
        extra = node.get("additionalProperties")
        open_keys = extra is True or isinstance(extra, Mapping) or "patternProperties" in node
        bounded = not open_keys and (bool(props) or extra is False)
        least, most, n_least = 2, 2, 0
        for name, sub in props.items():
            key = len(json.dumps(name)) + 2
            size = self.size(sub, seen)
            bounded = bounded and size.bounded
            most += key + size.most + (2 if most > 2 else 0)
            if name in needed:
                least += key + size.least + (2 if n_least else 0)
                n_least += 1
        return _Size(least, most, bounded)


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def document_size_tokens(schema: Mapping[str, Any]) -> tuple[int, int | None]:
    """Estimated tokens of the smallest valid document, and of the largest (``None`` when unbounded)."""
    size = _Sizer(schema).size(schema, frozenset())
    return _tokens(size.least), (_tokens(size.most) if size.bounded else None)


def fit_warnings(schema: Mapping[str, Any], max_tokens: int, *, source: str = "the schema") -> list[str]:
    """One-line warnings when answers under ``schema`` cannot fit in ``max_tokens`` (empty when they do).

    Pass the schema that is actually sent (``enforceable(...)``'s result for grammar servers).
    """
    least, most = document_size_tokens(schema)
    if least > max_tokens:
        return [
            f"the smallest valid answer of schema {source} needs ~{least} tokens; max_tokens is {max_tokens}: "
            f"every answer would be truncated; raise model.max_tokens"
        ]
    if most is not None and most > max_tokens:
        return [
            f"the largest bounded answer of schema {source} needs ~{most} tokens > max_tokens {max_tokens}: "
            f"long answers will be truncated; lower maxLength/maxItems or raise model.max_tokens"
        ]
    return []
