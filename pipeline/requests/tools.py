"""Function calling: the job's functions, checked at load like a schema, and what they add to a request.

A job sends functions (``model.tools``: a JSON file beside the job, or inline TOML in the API's shape)
and may force one (``model.tool_choice = "name"``). Every function's ``parameters`` is a JSON Schema, and
a broken one would fail every row, so each is checked before the first request exactly as
``output.schema`` is, and a ``tool_choice`` naming a function the job does not send is a load error.

When one function is forced, its arguments are the answer's document: they are validated against its
``parameters`` and spread into typed columns the way a ``json_schema`` answer is. The same path serves
``endpoint.structured_output = "tool"``: a json_schema job sent to a server whose json_schema support is
weak gets its ``output.schema`` as the one function the model must call (named ``output.name``).

Pure: the caller reads the file and passes its name as ``source`` for the error messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.answers.validator import CallRules
from pipeline.errors import SpecError
from pipeline.job import schema_types

#: ``tool_choice`` words the API takes; any other string is the name of the function to force.
CHOICE_WORDS = ("none", "auto", "required")
#: The API's limit on functions per request.
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
#: The description of the function the ``tool`` dialect sends in place of ``response_format``.
ANSWER_DESCRIPTION = "Record the answer. Call this function exactly once with the complete answer."


@dataclass(frozen=True)
class Tools:
    """A job's functions as sent, and which one (if any) its answers must call."""

    definitions: tuple[dict[str, Any], ...]
    """``tools`` in the request body, in the API's shape (``{"type": "function", "function": {...}}``)."""
    choice: str | dict[str, Any] | None
    """``tool_choice`` in the request body (None: not sent, the server's default)."""
    parallel: bool | None
    """``parallel_tool_calls`` in the request body (None: not sent)."""
    forced: str | None
    """The function the answer must call; its arguments are the answer's document."""
    required: bool
    source: str

    @property
    def names(self) -> list[str]:
        return [str(t["function"]["name"]) for t in self.definitions]

    def function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.definitions if t["function"]["name"] == name)

    def request_fields(self) -> dict[str, Any]:
        """What every request body gets: covered by the request hash like any other field."""
        fields: dict[str, Any] = {"tools": list(self.definitions)}
        if self.choice is not None:
            fields["tool_choice"] = self.choice
        if self.parallel is not None:
            fields["parallel_tool_calls"] = self.parallel
        return fields

    def rules(self) -> CallRules:
        """How answers are judged; the forced function's arguments are checked by the job's schema check."""
        if self.forced is not None:
            return CallRules(forced=self.forced)
        checks = {name: schema_types.compile_validator(self.function(name)["parameters"]) for name in self.names}
        return CallRules(checks=checks, required=self.required)


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


def check_definitions(raw: Any, source: str) -> tuple[dict[str, Any], ...]:
    """The functions in the API's shape; one ``SpecError`` line naming the entry when one is unusable."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise _fail(source, 'no functions; give at least one {type = "function", function = {name, parameters}}')
    if len(items) > MAX_TOOLS:
        raise _fail(source, f"{len(items)} functions; the API takes at most {MAX_TOOLS}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(items):
        where = f"{source}: $[{i}]" if isinstance(raw, list) else f"{source}: $"
        if not isinstance(tool, dict):
            raise _fail(where, f"a tool must be an object, got {type(tool).__name__}")
        unknown = sorted(set(tool) - _TOOL_KEYS)
        if unknown:
            raise _fail(where, f"unknown key {unknown[0]!r} (a tool has only type and function)")
        if tool.get("type") != "function":
            got = tool.get("type")
            raise _fail(f"{where}.type", f'must be "function" (the only kind of tool the API takes), got {got!r}')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _fail(f"{where}.function", "required: an object with name and parameters")
        unknown = sorted(set(fn) - _FUNCTION_KEYS)
        if unknown:
            known = "name, description, parameters, strict"
            raise _fail(where, f"function has unknown key {unknown[0]!r} (it takes {known})")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _fail(f"{where}.function.name", f"{name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        if name in seen:
            raise _fail(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise _fail(f"{where}.function.description", "must be a string")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _fail(f"{where}.function.strict", "must be true or false")
        if "parameters" not in fn:
            raise _fail(f"{where}.function", f"function {name!r} has no parameters (a JSON Schema object)")
        schema_types.check_schema(
            fn["parameters"], strict=bool(strict), source=f"{source}: function {name} parameters", columns=False
        )
        out.append({"type": "function", "function": dict(fn)})
    return tuple(out)


def resolve_choice(choice: str | dict[str, Any] | None, names: list[str], source: str) -> tuple[Any, str | None]:
    """(``tool_choice`` as sent, the forced function) from the job's word, function name or API object."""
    if choice is None:
        return None, None
    if isinstance(choice, str) and choice in CHOICE_WORDS:
        return choice, None
    name: Any = choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or set(choice) != {"type", "function"}:
            raise _fail(
                f"{source}: model.tool_choice",
                'must be "none", "auto", "required", a function name, or {type = "function", function = {name = …}}',
            )
        name = fn.get("name")
    if name not in names:
        raise _fail(
            f"{source}: model.tool_choice",
            f"{name!r} is not a function in model.tools ({', '.join(names)}); name one of them, "
            'or use "auto", "required" or "none"',
        )
    return {"type": "function", "function": {"name": name}}, str(name)


def job_tools(raw: Any, choice: str | dict[str, Any] | None, parallel: bool | None, *, source: str, job: str) -> Tools:
    """The job's own functions (``model.tools``), checked, with its ``tool_choice`` resolved."""
    definitions = check_definitions(raw, source)
    sent, forced = resolve_choice(choice, [str(t["function"]["name"]) for t in definitions], job)
    return Tools(definitions, sent, parallel, forced, choice == "required", source)


def answer_tool(name: str, schema: dict[str, Any], strict: bool, source: str) -> Tools:
    """``endpoint.structured_output = "tool"``: the job's schema as the one function the model must call."""
    function = {"name": name, "description": ANSWER_DESCRIPTION, "parameters": schema, "strict": strict}
    return Tools(
        ({"type": "function", "function": function},),
        {"type": "function", "function": {"name": name}},
        None,
        name,
        False,
        source,
    )
