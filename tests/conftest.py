"""Fixtures: the project's own local API on loopback (builders live in ``tests/helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.localapi import LocalAPI, ServerConfig


@pytest.fixture
def api() -> Iterator[LocalAPI]:
    server = LocalAPI(ServerConfig())
    server.start()
    try:
        yield server
    finally:
        server.stop()
