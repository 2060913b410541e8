"""Image and video cells → content parts. A cell is an http(s) URL, a local path, raw bytes, or null.

Files are read when their row's request is built and the bytes live only in that request's body, so
an image job's memory is bounded by the requests in flight, not by the number of rows. Problems with
one file (missing, unsupported, too large) are per-row errors found before sending.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SpecError
from pipeline.records import Row
from pipeline.spec import MediaSection

IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
VIDEO_TYPES = {"mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm", "avi": "video/x-msvideo"}


def sniff(head: bytes) -> str | None:
    """Format from the file's first bytes: extensions lie, magic numbers rarely do."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] == b"ftyp":
        return "mov" if head[8:10] == b"qt" else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    return None


def data_uri(data: bytes, kind: str) -> str:
    """``data:<mime>;base64,...`` for bytes of a supported format; ValueError otherwise."""
    fmt = sniff(data[:16])
    table = IMAGE_TYPES if kind == "image" else VIDEO_TYPES
    if fmt not in table:
        allowed = ", ".join(t.upper() for t in table)
        raise ValueError(f"unsupported {kind} format ({fmt or 'unknown'}); supported: {allowed}")
    return f"data:{table[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


class MediaBuilder:
    """Builds the media parts of one row; errors become the row's ``media_error``."""

    def __init__(self, section: MediaSection) -> None:
        self.section = section
        self.columns = [(c, "image") for c in section.image_columns] + [(c, "video") for c in section.video_columns]
        self.max_bytes = int(section.max_file_mb * 1024 * 1024)
        self.null_cells = 0

    def check_columns(self, columns: tuple[str, ...] | list[str], where: str) -> None:
        missing = [c for c, _ in self.columns if c not in columns]
        if missing:
            raise SpecError(f"{where}: media column(s) {', '.join(map(repr, missing))} not in the input")

    def _load(self, cell: Any, kind: str) -> str:
        if isinstance(cell, bytes | bytearray | memoryview):
            data = bytes(cell)
            if len(data) > self.max_bytes:
                raise ValueError(f"{kind} bytes are {len(data) / 1e6:.1f} MB, over media.max_file_mb")
            return data_uri(data, kind)
        text = str(cell).strip()
        if text.startswith(("http://", "https://", "data:")):
            return text
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{kind} file not found: {text}")
        size = path.stat().st_size
        if size > self.max_bytes:
            raise ValueError(
                f"{kind} file {text} is {size / 1e6:.1f} MB, over media.max_file_mb = {self.section.max_file_mb}"
            )
        try:
            return data_uri(path.read_bytes(), kind)
        except ValueError as exc:
            raise ValueError(f"{text}: {exc}") from None

    def parts(self, row: Row) -> tuple[list[dict[str, Any]], str | None]:
        parts: list[dict[str, Any]] = []
        for column, kind in self.columns:
            cell = row.values.get(column)
            if cell is None or cell == "":
                self.null_cells += 1
                continue
            try:
                url = self._load(cell, kind)
            except ValueError as exc:
                message = f"row {row.key!r}: column {column!r}: {exc}"
                if self.section.strict_inputs:
                    raise InputError(f"{message} (media.strict_inputs is on)") from None
                return [], message
            if kind == "image":
                image: dict[str, Any] = {"url": url}
                if self.section.detail:
                    image["detail"] = self.section.detail
                parts.append({"type": "image_url", "image_url": image})
            else:
                parts.append({"type": "video_url", "video_url": {"url": url}})
        return parts, None
