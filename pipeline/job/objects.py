"""Where a job's objects (``s3://bucket/key``, ``gs://…``) live on this machine: one local copy each.

The job (``spec``) names an object and points its input or output at the local copy; moving bytes in and
out is ``tables.storage``'s job. Pure: no I/O, no pyarrow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import SpecError

#: A scheme of two letters or more, then ``://``.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_object_uri(value: str) -> bool:
    """``s3://bucket/key`` and the like (two letters or more before ``://``, so ``C:/x`` stays a path)."""
    return bool(_URI.match(value))


def objects_home() -> Path:
    """Where local copies of objects live, with the ledger and manifest of an object output beside them.

    A data folder (``$XDG_DATA_HOME/seedbatch``, else ``~/.local/share/seedbatch``), not a cache: the
    ledger there holds answers that were paid for, and cache cleaners delete caches.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "seedbatch"


def local_copy_path(uri: str) -> Path:
    """``s3://bucket/a/b.csv`` → ``<objects_home>/s3/bucket/a/b.csv``: one local place per object, the same
    from any folder, so a rerun finds the ledger of the run before it. The query (pyarrow options) is not
    part of the name; ``..`` cannot climb out."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise SpecError(f"{uri}: not a valid object URI (the part after :// is bucket/key)") from None
    if port is not None:
        host = f"{host}_{port}"
    segments = [s for s in parts.path.split("/") if s not in ("", ".", "..")]
    return objects_home().joinpath(parts.scheme.lower(), host or "_", *segments)
