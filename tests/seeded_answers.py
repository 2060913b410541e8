"""A local API whose answers a test scripts per sample, so votes disagree where the test says.

The row's text is ``votes: a,b,!`` (or any comma list): the request with seed s (no seed: 0) answers
the ``label`` at position s of the list, ``!`` being a broken JSON answer (``invalid_output`` with
``invalid_retries = 0``). A user message starting with ``strong:`` (the escalation's prompt) answers
``strong``. A schema with a ``sure`` field gets ``sure = null`` in the first stage, ``true`` escalated.
Every request body the server received is counted by its hash.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections import Counter
from typing import Any

import orjson

from pipeline.localapi import LocalAPI
from pipeline.localapi.answers import Answer, Answerer
from pipeline.localapi.validation import Parsed, count_tokens

_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("seed", default=None)

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}


class ScriptedAnswerer(Answerer):
    def answer(self, parsed: Parsed) -> Answer:
        text = parsed.last_user.strip()
        # A schema with a ``sure`` field: the first stage is never sure, the escalation always.
        sure = "sure" in (parsed.schema or {}).get("properties", {})
        if text.startswith("strong:"):
            content = orjson.dumps({"label": "strong", **({"sure": True} if sure else {})}).decode()
        elif text.startswith("votes:"):
            labels = [s.strip() for s in text.removeprefix("votes:").split(",")]
            label = labels[(_SEED.get() or 0) % len(labels)]
            doc = {"label": label, **({"sure": None} if sure else {})}
            content = "{broken" if label == "!" else orjson.dumps(doc).decode()
        else:
            return super().answer(parsed)
        return Answer(content, None, content_tokens=count_tokens(content))


def script(api: LocalAPI) -> Counter[str]:
    """Make ``api`` answer as the module says; returns the counter of bodies received (by sha256)."""
    handler = api._server.handler
    handler.answerer = ScriptedAnswerer()
    original = handler.chat
    received: Counter[str] = Counter()

    async def chat(headers: Any, raw: bytes) -> Any:
        received[hashlib.sha256(raw).hexdigest()] += 1
        token = _SEED.set(orjson.loads(raw).get("seed"))
        try:
            return await original(headers, raw)
        finally:
            _SEED.reset(token)

    handler.chat = chat  # type: ignore[method-assign,assignment]
    return received
