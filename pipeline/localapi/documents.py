"""Documents that match a JSON Schema, built deterministically, and the ways a model breaks them.

Structured-output runs are tested end to end against the local API, so its answers have to validate
against whatever schema a job sends (nested objects, enums, nullable unions, ``$defs`` refs, bounded
numbers, sized arrays, formats) and be a pure function of the request, so a retry or a resumed run sees
the same document. ``off_schema`` is the other half: a well-formed document that fails the schema the
way models really fail (a required key missing, an enum value invented), for the fault injector.

``$ref`` resolution is ``pipeline.job.schema_types.resolve_ref``, the one the job's schema check uses, so a
reference the check accepts is one the server follows. ``schema_types`` imports polars at module level
(it maps schemas to dtypes); importing it lazily, on the first ``$ref`` the server meets, keeps
``import pipeline.localapi`` free of it. ``seedbatch serve`` and in-process servers have it loaded
already, so the deferred import costs nothing in practice.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import orjson

_WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper")
_MAX_DEPTH = 6  # below this, generated documents stop optional nesting so recursive $refs terminate
_HARD_DEPTH = 40
_SCHEMA_CACHE_MAX = 4096


class DocGen:
    """Builds one document valid against a JSON Schema subset, deterministically from a seed.

    Covers what structured-output schemas use in practice (objects, enums, nullable unions, $defs refs,
    bounded numbers, sized arrays, dates); keywords it cannot satisfy in general (``pattern``) are ignored.
    """

    def __init__(self, root: dict[str, Any], seed: int, media: str = "") -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.media = media  # appended to the first free-text string so media rows stay identifiable

    def ref(self, ref: str) -> Any:
        """The target of a local ``$ref``; ``{}`` (anything) for one that points nowhere, as models do."""
        from pipeline.job.schema_types import resolve_ref  # see the module docstring: polars stays unimported

        try:
            return resolve_ref(ref, self.root)
        except ValueError:
            return {}

    def gen(self, s: Any, depth: int = 0, name: str = "value") -> Any:
        """A value for schema ``s``; ``name`` (the property) seeds free text so fields read differently."""
        if depth > _HARD_DEPTH or s is False:
            return None
        if not isinstance(s, dict):  # ``true``: anything goes
            return name
        if "$ref" in s:
            merged = {**self.ref(s["$ref"]), **{k: v for k, v in s.items() if k != "$ref"}}
            return self.gen(merged, depth, name)
        if "const" in s:
            return s["const"]
        if s.get("enum"):
            options = [v for v in s["enum"] if v is not None] or s["enum"]
            return options[self.rng.randrange(len(options))]
        if "allOf" in s:
            merged = {k: v for k, v in s.items() if k != "allOf"}
            for branch in s["allOf"]:
                sub = self.ref(branch["$ref"]) if isinstance(branch, dict) and "$ref" in branch else branch
                if isinstance(sub, dict):
                    for key, value in sub.items():
                        if key == "properties":
                            merged["properties"] = {**merged.get("properties", {}), **value}
                        elif key == "required":
                            merged["required"] = [*merged.get("required", []), *value]
                        else:
                            merged.setdefault(key, value)
            return self.gen(merged, depth, name)
        for key in ("anyOf", "oneOf"):
            if s.get(key):
                branches = s[key]
                nulls = [b for b in branches if isinstance(b, dict) and b.get("type") == "null"]
                real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
                chosen = nulls[0] if (depth >= _MAX_DEPTH and nulls) or not real else real[0]
                rest = {k: v for k, v in s.items() if k != key}
                return self.gen({**rest, **chosen} if isinstance(chosen, dict) else chosen, depth, name)
        kind = s.get("type")
        if isinstance(kind, list):
            real_types = [t for t in kind if t != "null"]
            kind = "null" if not real_types or (depth >= _MAX_DEPTH and "null" in kind) else real_types[0]
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else "string"
        if kind == "object":
            return self.obj(s, depth)
        if kind == "array":
            return self.arr(s, depth, name)
        if kind in ("integer", "number"):
            return self.num(s, kind == "integer")
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self.text(s, name)

    def obj(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        """Every property while shallow, only the required ones deeper down, so recursion ends."""
        props: dict[str, Any] = s.get("properties") or {}
        required = [r for r in s.get("required") or [] if isinstance(r, str)]
        names = list(props) if depth < _MAX_DEPTH else [p for p in props if p in required]
        out = {p: self.gen(props[p], depth + 1, p) for p in names}
        extra = s.get("additionalProperties")
        for r in required:
            if r not in out:
                out[r] = self.gen(extra if isinstance(extra, dict) else {}, depth + 1, r)
        return out

    def arr(self, s: dict[str, Any], depth: int, name: str) -> list[Any]:
        """Two items (or ``minItems``), within ``maxItems``; ``uniqueItems`` retried a few times."""
        lo = int(s.get("minItems") or 0)
        hi = s.get("maxItems")
        count = lo if depth >= _MAX_DEPTH else max(lo, 2)
        if hi is not None:
            count = min(count, int(hi))
        prefix = s.get("prefixItems") or []
        items = s.get("items", {})
        out: list[Any] = []
        seen: set[bytes] = set()
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            value = self.gen(sub, depth + 1, name)
            if s.get("uniqueItems"):
                for _ in range(8):
                    key = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
                    if key not in seen:
                        break
                    value = self.gen(sub, depth + 1, f"{name} {i}")
                seen.add(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
            out.append(value)
        return out

    def num(self, s: dict[str, Any], integer: bool) -> int | float:
        """A number inside the (exclusive) bounds and on ``multipleOf`` when one exists."""
        lo: float = s.get("minimum", -math.inf)
        hi: float = s.get("maximum", math.inf)
        xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
        if isinstance(xlo, int | float) and not isinstance(xlo, bool):
            lo = max(lo, math.nextafter(xlo, math.inf) if not integer else math.floor(xlo) + 1)
        if isinstance(xhi, int | float) and not isinstance(xhi, bool):
            hi = min(hi, math.nextafter(xhi, -math.inf) if not integer else math.ceil(xhi) - 1)
        if math.isinf(lo) and math.isinf(hi):
            lo, hi = 0, 100
        elif math.isinf(lo):
            lo = hi - 100
        elif math.isinf(hi):
            hi = lo + 100
        step = s.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first, last = math.ceil(lo / step), math.floor(hi / step)
            for k in itertools.chain([first + self.rng.randrange(max(last - first + 1, 1))], range(first, last + 1)):
                value = int(k * step) if integer else k * step
                if value / step == int(value / step) and lo <= value <= hi:
                    return value
            return int(first * step) if integer else first * step
        if integer:
            ilo, ihi = math.ceil(lo), math.floor(hi)
            return self.rng.randint(ilo, ihi) if ilo <= ihi else ilo
        value = round(lo + (hi - lo) * (0.25 + self.rng.random() / 2), 2)
        return value if lo <= value <= hi else (lo + hi) / 2

    def text(self, s: dict[str, Any], name: str) -> str:
        """A string in the requested ``format``, padded or cut to ``minLength``/``maxLength``."""
        r = self.rng.randrange(1 << 30)
        fmt = s.get("format")
        if fmt == "date":
            value = f"20{20 + r % 6}-{1 + r % 12:02d}-{1 + r % 28:02d}"
        elif fmt == "date-time":
            value = f"20{20 + r % 6}-{1 + r % 12:02d}-{1 + r % 28:02d}T{r % 24:02d}:{r % 60:02d}:00Z"
        elif fmt == "time":
            value = f"{r % 24:02d}:{r % 60:02d}:00Z"
        elif fmt == "email":
            value = f"{_WORDS[r % len(_WORDS)]}@example.com"
        elif fmt in ("uri", "url", "uri-reference", "iri"):
            value = f"https://example.com/{_WORDS[r % len(_WORDS)]}"
        elif fmt == "uuid":
            value = f"{r:08x}-0000-4000-8000-{r * 7919 % (1 << 48):012x}"
        elif fmt == "ipv4":
            value = f"192.0.2.{r % 254 + 1}"
        elif fmt == "hostname":
            value = f"{_WORDS[r % len(_WORDS)]}.example.com"
        else:
            value = f"{name} {_WORDS[r % len(_WORDS)]}"
            if self.media:
                value, self.media = f"{value} {self.media}", ""
        lo, hi = s.get("minLength"), s.get("maxLength")
        if isinstance(lo, int) and len(value) < lo:
            value += "x" * (lo - len(value))
        if isinstance(hi, int) and len(value) > hi:
            value = value[:hi]
        return value


def _root_object(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema's top-level object after following a few ``$ref`` hops (a root that is only a ref)."""
    node: Any = schema
    for _ in range(8):
        if isinstance(node, dict) and "$ref" in node:
            node = DocGen(schema, 0).ref(node["$ref"])
    return node if isinstance(node, dict) else {}


def off_schema(doc: Any, schema: dict[str, Any] | None) -> Any:
    """A well-formed document that breaks the schema the way models do: a key missing, an enum off."""
    root = _root_object(schema) if schema is not None else {}
    if isinstance(doc, dict) and (schema is None or root.get("type", "object") == "object"):
        for key in root.get("required") or []:
            if key in doc:
                return {k: v for k, v in doc.items() if k != key}
        for key, prop in (root.get("properties") or {}).items():
            if isinstance(prop, dict) and "enum" in prop and key in doc:
                return {**doc, key: "not-a-listed-value"}
        return [doc]
    return {"unexpected": True}


class SchemaDocuments:
    """Serialized documents per (schema, seed), cached: most jobs send one schema for every row.

    The cache is cleared when full rather than evicted entry by entry; a job sends one or a few
    schemas, so a full cache means a test sweeping many and recomputing is cheap.
    """

    def __init__(self) -> None:
        self._docs: dict[tuple[bytes, int], str] = {}

    def get(self, schema: dict[str, Any], seed: int, media: str = "") -> str:
        """The document for ``seed``; media rows are built fresh so their echo tokens stay in the text."""
        if media:
            return orjson.dumps(DocGen(schema, seed, media).gen(schema)).decode()
        key = (orjson.dumps(schema), seed)
        doc = self._docs.get(key)
        if doc is None:
            if len(self._docs) >= _SCHEMA_CACHE_MAX:
                self._docs.clear()
            doc = self._docs[key] = orjson.dumps(DocGen(schema, seed).gen(schema)).decode()
        return doc
