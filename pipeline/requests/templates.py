"""Prompt templates: ``{column}`` placeholders, ``{{``/``}}`` literal braces, nothing else special.

Parsed once per job into pieces (literal text and ``(column,)``), then compiled into one positional
``str.format`` string per message, so rendering a row is one C-level call per message.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from pipeline.errors import SpecError

__all__ = ["Pieces", "closest", "compile_pieces", "parse_template", "split_template", "template_fields"]

#: A parsed template: literal text, and ``(column,)`` for each placeholder, in order.
Pieces = list[str | tuple[str]]


def parse_template(template: str, where: str) -> Pieces:
    """Literal text and placeholders. ``{name}`` names the column ``name`` exactly as the input spells it,
    spaces and punctuation included (``{review text}``, ``{a-b}``, ``{x.y}``); ``{{`` and ``}}`` are literal
    braces. Nothing else is special, so a placeholder is never a format spec or an attribute lookup."""
    pieces: Pieces = []
    text: list[str] = []
    i, n = 0, len(template)
    while i < n:
        brace = min((k for k in (template.find("{", i), template.find("}", i)) if k >= 0), default=n)
        if brace > i:
            text.append(template[i:brace])
            i = brace
            continue
        if template.startswith(("{{", "}}"), i):
            text.append(template[i])
            i += 2
            continue
        if template[i] == "}":
            raise SpecError(
                f"{where}: bad template (a single '}}' at character {i + 1}); write {{{{ and }}}} for literal braces"
            )
        close = template.find("}", i + 1)
        inner = template.find("{", i + 1)
        if close < 0:
            raise SpecError(
                f"{where}: bad template (the '{{' at character {i + 1} is never closed); "
                "write {{ and }} for literal braces"
            )
        if 0 <= inner < close:
            raise SpecError(
                f"{where}: bad template (a '{{' inside the placeholder at character {i + 1}); to write literal "
                "braces (e.g. JSON) in a template, double them: {{ and }}"
            )
        name = template[i + 1 : close]
        if not name:
            raise SpecError(f"{where}: empty placeholder '{{}}' at character {i + 1}; name a column like {{text}}")
        if text:
            pieces.append("".join(text))
            text = []
        pieces.append((name,))
        i = close + 1
    if text:
        pieces.append("".join(text))
    return pieces


def template_fields(template: str, where: str) -> list[str]:
    """Column names a template uses, in order of first use."""
    return list(dict.fromkeys(p[0] for p in parse_template(template, where) if isinstance(p, tuple)))


def compile_pieces(pieces: Sequence[str | tuple[str]], slots: dict[str, int]) -> str:
    """A ``str.format`` string with positional fields: ``{0}`` is the value of ``slots``' first column.

    Positional fields make every column name usable (a name is never parsed by ``format``) and keep
    rendering one C-level ``format`` call per message.
    """
    return "".join(
        f"{{{slots[p[0]]}}}" if isinstance(p, tuple) else p.replace("{", "{{").replace("}", "}}") for p in pieces
    )


def split_template(pieces: Pieces, media_columns: Sequence[str]) -> list[Pieces | tuple[str]]:
    """The user template cut at media placeholders: text pieces and ``(column,)`` media slots, in order.

    With ``media.position = "inline"`` a media column named in the template (``{photo}``) marks where its
    image goes, so one message can interleave several images with text.
    """
    out: list[Pieces | tuple[str]] = []
    text: Pieces = []
    for p in pieces:
        if isinstance(p, tuple) and p[0] in media_columns:
            if text:
                out.append(text)
            out.append(p)
            text = []
        else:
            text.append(p)
    if text:
        out.append(text)
    return out


def closest(name: str, columns: Sequence[str]) -> list[str]:
    """Up to three columns spelled most like ``name`` (case aside), best first."""
    by_lower: dict[str, str] = {}
    for c in columns:
        by_lower.setdefault(c.lower(), c)
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
