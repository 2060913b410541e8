"""Image and video cells → content parts. A cell is an http(s) URL, a local path, raw bytes, or null.

Files are read when their row's request is built and the bytes live only in that request's body, so
an image job's memory is bounded by the requests in flight, not by the number of rows. The body holds
the file's bytes (base64), never its path, so the request hash follows the content: an edited file is
sent again, a renamed or moved one is not.

Problems with one file (missing, unsupported, too large) become that row's ``media_error``: the row is
recorded as an error and its request is never sent. ``scan`` finds the same problems from file sizes
and first bytes only, so ``media.strict_inputs`` can stop the whole run before the first request.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import InputError, SpecError
from pipeline.job.spec import MediaSection
from pipeline.records import Row

Kind = Literal["image", "video"]

#: Formats the endpoint accepts. Images: the API reference's list (JPG/JPEG, PNG, GIF, WEBP). Videos:
#: the reference names no formats, so these are the containers vision models commonly decode.
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
VIDEO_TYPES = {"mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm", "avi": "video/x-msvideo"}
TYPES: dict[str, dict[str, str]] = {"image": IMAGE_TYPES, "video": VIDEO_TYPES}

#: Bytes ``sniff`` needs; all the pre-scan reads of a file.
HEAD_BYTES = 16
#: Rows per chunk when a job has media: request bodies carry the files, so chunks stay small.
CHUNK_ROWS = 64
#: Problems quoted in a strict-inputs error; the rest are counted.
SHOWN_PROBLEMS = 5

#: Media parts of one row in column order; ``None`` for a null cell (omitted from the message, counted).
Cells = dict[str, dict[str, Any] | None]


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


def mime_type(head: bytes, kind: Kind) -> str:
    """MIME type of a supported format from its first bytes; ValueError names what is supported."""
    fmt = sniff(head[:HEAD_BYTES])
    table = TYPES[kind]
    if fmt not in table:
        allowed = ", ".join(t.upper() for t in table)
        raise ValueError(f"unsupported {kind} format ({fmt or 'unknown'}); supported: {allowed}")
    return table[fmt]


def data_uri(data: bytes, kind: Kind) -> str:
    """``data:<mime>;base64,...`` for bytes of a supported format; ValueError otherwise."""
    return f"data:{mime_type(data, kind)};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class MediaProblem:
    """One cell that cannot be sent, with what a user needs to find and fix it."""

    row_key: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row_key!r}: column {self.column!r}: {self.reason}"


class MediaBuilder:
    """Builds the media parts of one row; a bad cell becomes the row's ``media_error``, never an exception."""

    def __init__(self, section: MediaSection) -> None:
        self.section = section
        self.columns: list[tuple[str, Kind]] = [(c, "image") for c in section.image_columns]
        self.columns += [(c, "video") for c in section.video_columns]
        self.max_bytes = int(section.max_file_mb * 1024 * 1024)

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def check_columns(self, columns: tuple[str, ...] | list[str], where: str) -> None:
        missing = [c for c in self.column_names if c not in columns]
        if missing:
            raise SpecError(f"{where}: media column(s) {', '.join(map(repr, missing))} not in the input")

    # One check shared by the pre-scan (size + head) and the build (the whole file), so they agree.
    def _check(self, size: int, head: bytes, kind: Kind, source: str) -> str:
        if size > self.max_bytes:
            raise ValueError(
                f"{kind} {source} is {size / 1e6:.1f} MB, over media.max_file_mb = {self.section.max_file_mb:g}"
            )
        try:
            return mime_type(head, kind)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @staticmethod
    def _url(cell: Any) -> str | None:
        """The cell as sent when it is a URL (or an inline data URI), else None."""
        if isinstance(cell, str) and cell.lstrip().startswith(("http://", "https://", "data:")):
            return cell.strip()
        return None

    def _path(self, cell: Any, kind: Kind) -> tuple[Path, int]:
        text = str(cell).strip()
        path = Path(text)
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size < 0 or not path.is_file():
            raise ValueError(f"{kind} file not found: {text}")
        return path, size

    def load(self, cell: Any, kind: Kind) -> str:
        """The URL to send for one cell or message part (data URI for a path or bytes); ValueError if it cannot be."""
        return self._load(cell, kind)

    def _load(self, cell: Any, kind: Kind) -> str:
        url = self._url(cell)
        if url is not None:
            return url
        if isinstance(cell, bytes | bytearray | memoryview):
            data = bytes(cell)
            self._check(len(data), data, kind, "bytes")
            return data_uri(data, kind)
        path, size = self._path(cell, kind)
        if size > self.max_bytes:  # checked before reading: a huge file must not be loaded to learn it is too big
            self._check(size, b"", kind, f"file {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {kind} file {path}: {exc.strerror}") from None
        mime = self._check(len(data), data, kind, f"file {path}")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def check(self, cell: Any, kind: Kind) -> str:
        """``load``'s verdict from the size and first bytes alone (ValueError if bad); returns a stand-in URL."""
        self._inspect(cell, kind)
        return cell if isinstance(cell, str) else "data:"

    def _inspect(self, cell: Any, kind: Kind) -> None:
        """``_load``'s verdict from the size and first bytes alone: what the pre-scan can afford."""
        if self._url(cell) is not None:
            return
        if isinstance(cell, bytes | bytearray | memoryview):
            self._check(len(cell), bytes(cell[:HEAD_BYTES]), kind, "bytes")
            return
        path, size = self._path(cell, kind)
        try:
            with path.open("rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError as exc:
            raise ValueError(f"cannot read {kind} file {path}: {exc.strerror}") from None
        self._check(size, head, kind, f"file {path}")

    def cells(self, row: Row) -> tuple[Cells, str | None]:
        """Each media column's part (None for a null cell), or the first problem as the row's error."""
        out: Cells = {}
        for column, kind in self.columns:
            cell = row.values.get(column)
            if cell is None or cell in ("", b""):
                out[column] = None
                continue
            try:
                url = self._load(cell, kind)
            except ValueError as exc:
                return {}, str(MediaProblem(row.key, column, str(exc)))
            if kind == "image":
                image: dict[str, Any] = {"url": url}
                if self.section.detail:
                    image["detail"] = self.section.detail
                out[column] = {"type": "image_url", "image_url": image}
            else:
                out[column] = {"type": "video_url", "video_url": {"url": url}}
        return out, None

    def parts(self, row: Row) -> tuple[list[dict[str, Any]], str | None]:
        """The row's media parts in column order, nulls left out: the shape ``Renderer`` appends."""
        cells, error = self.cells(row)
        return [p for p in cells.values() if p is not None], error

    def scan(self, rows: Iterable[Row]) -> Iterable[MediaProblem]:
        """Problems in ``rows`` found by stat and a 16-byte read per file: no file is read whole."""
        for row in rows:
            for column, kind in self.columns:
                cell = row.values.get(column)
                if cell is None or cell in ("", b""):
                    continue
                try:
                    self._inspect(cell, kind)
                except ValueError as exc:
                    yield MediaProblem(row.key, column, str(exc))

    def require_clean(self, chunks: Iterable[list[Row]]) -> None:
        """Raise ``InputError`` listing the problems when ``strict_inputs`` is on: called before any request."""
        problems: list[MediaProblem] = []
        count = 0
        for chunk in chunks:
            for problem in self.scan(chunk):
                count += 1
                if len(problems) < SHOWN_PROBLEMS:
                    problems.append(problem)
        if count:
            shown = "; ".join(map(str, problems))
            more = f" (+{count - len(problems)} more)" if count > len(problems) else ""
            raise InputError(
                f"{count} media cell(s) cannot be sent and media.strict_inputs is on; nothing was sent: {shown}{more}"
            )
