"""Modules imported on first use, for what a small job never touches.

pyarrow (with numpy) costs about as much memory and start-up time as polars again, and a job
that reads a small Parquet file and writes a small output does it all in polars. Modules that need
pyarrow only on their large-file or rerun paths name it through ``lazy("pyarrow.parquet")``: the code
reads ``pq.ParquetFile(...)`` as with a plain import, and the import happens on the first attribute looked up.

Not ``importlib.util.LazyLoader``: finding the spec of ``pyarrow.parquet`` already imports ``pyarrow``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name`` and imports it when an attribute is first read."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.module(), attr)

    def module(self) -> ModuleType:
        # import_module is a sys.modules lookup once the module is loaded.
        return importlib.import_module(self._name)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    """``name``, imported on first attribute use (typed Any: modules declare the real type for mypy)."""
    return LazyModule(name)
