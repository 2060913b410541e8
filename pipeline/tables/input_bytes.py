"""An input file's bytes and text: its format by name, its one opener, its digest, decompression, lines.

``open_bytes`` is the one place an input file is opened for streaming: a .gz or .zst file is decompressed
as it is read (through pyarrow's decompressing stream), so every reader and every line number sees the
text, and the check pass's bytes feed the file's digest (``InputDigest``) as they go by. Every input file
is opened by Python (``open``), so an audit hook sees each pass.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from pipeline.errors import InputError
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow as pa
else:  # only a compressed input needs pyarrow here (see lazy)
    pa = lazy("pyarrow")

#: Input formats by file suffix (``ndjson`` is JSONL, by polars' name for it).
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "ndjson",
    ".ndjson": "ndjson",
}
#: Compressed text inputs (``reviews.csv.gz``, ``events.jsonl.zst``) by their last suffix: read as they
#: stream, through pyarrow's decompressing input stream.
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
#: The names ``codecs.lookup`` gives UTF-8, which pyarrow and orjson read natively.
UTF8_CODECS = ("utf-8", "utf-8-sig")


def input_format(path: Path) -> tuple[str | None, str | None, str]:
    """(format, compression, the format's suffix) from a file name: ``x.tsv.gz`` → ("csv", "gzip", ".tsv")."""
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None, None, ""
    compression = COMPRESSED.get(suffixes[-1])
    if compression is None:
        return FORMATS.get(suffixes[-1]), None, suffixes[-1]
    inner = suffixes[-2] if len(suffixes) > 1 else ""
    return FORMATS.get(inner), compression, inner


def text_codec(path: Path, encoding: str) -> str:
    """The canonical codec name of ``encoding``, or an InputError naming the bad value."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise InputError(
            f"{path}: unknown encoding {encoding!r} (job.encoding); "
            'use a text encoding Python knows, e.g. "utf-8", "latin-1" or "cp1252"'
        )
    return info.name


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line InputError."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def open_bytes(path: Path, digest: InputDigest | None = None) -> BinaryIO:
    """The one place input files are opened for streaming: a .gz or .zst file decompressed as it is read, so
    every reader and every line number sees the text. With ``digest``, the bytes as stored feed it as they
    are read (``open_input``'s pass). Other modules call it as ``input_bytes.open_bytes``, so wrapping this
    one name (as tests do, to watch what is read) covers every format."""
    compression = input_format(path)[1]
    raw: io.RawIOBase = open(path, "rb", buffering=0)  # noqa: SIM115 (returned open: the caller closes it)
    if digest is not None:
        raw = _Digesting(raw, digest)
    if compression is None:
        return io.BufferedReader(raw)
    try:
        stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression)
    except (pa.ArrowException, OSError) as exc:
        raw.close()
        raise InputError(f"{path}: cannot open the {compression} file: {str(exc).splitlines()[0]}") from None
    return io.BufferedReader(_Decompressed(stream, path, compression), buffer_size=1 << 16)


class InputDigest:
    """xxh3-128 of a file's bytes, fed by the pass that reads them; known once that pass reached the end."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()
        self.complete = False

    def reset(self) -> None:
        """For a pass that starts over from the file's first byte."""
        self._hash.reset()
        self.complete = False

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str | None:
        return self._hash.hexdigest() if self.complete else None


def hash_to_end(f: Any, digest: InputDigest) -> None:
    """Feed ``digest`` every byte left in the binary file ``f``, a megabyte at a time, and mark it complete."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        digest.update(view[:n])
    digest.complete = True


class _Digesting(io.RawIOBase):
    """A file whose bytes feed an ``InputDigest`` as they are read."""

    def __init__(self, raw: io.RawIOBase, digest: InputDigest) -> None:
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        if n:
            self._digest.update(memoryview(buffer)[:n])
        else:
            self._digest.complete = True
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Decompressed(io.RawIOBase):
    """pyarrow's decompressing stream as a Python binary file; a corrupt or cut-off file is an InputError."""

    def __init__(self, stream: pa.NativeFile, path: Path, compression: str) -> None:
        self._stream = stream
        self._path = path
        self._compression = compression

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{self._path}: cannot decompress this {self._compression} file ({str(exc).splitlines()[0]}); "
                "check that it is complete"
            ) from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class Replay:
    """A binary file whose first bytes read are kept, to be read again after ``rewind``: the CSV header is
    parsed from them, then the pass over the rows starts from the first byte without opening the file again.
    ``close`` before ``rewind`` keeps the file open (the header's reader closes its source)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._kept: bytearray | None = bytearray()
        self._replay = b""
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if self._replay:
            take = len(self._replay) if size < 0 else size
            data, self._replay = self._replay[:take], self._replay[take:]
            if size < 0:
                data += self._raw.read()
            return data
        data = self._raw.read(size)
        if self._kept is not None:
            self._kept += data
        return data

    def rewind(self) -> None:
        if self._kept is not None:
            self._replay, self._kept = bytes(self._kept), None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self._kept is None:
            self.closed = True
            self._raw.close()

    def release(self) -> None:
        """Close the file, whoever else holds it."""
        self._kept = None
        self.close()


class Undecodable(Exception):
    """Bytes the input's encoding cannot decode, at ``line``; each format turns it into its InputError."""

    def __init__(self, line: int, byte: int) -> None:
        super().__init__(line, byte)
        self.line = line
        self.byte = byte


def decode_message(path: Path, codec: str, line: int, byte: int) -> str:
    """The InputError text for an ``Undecodable`` byte: the encoding setting to change."""
    if codec in UTF8_CODECS:
        return (
            f"{path}: line {line}: the file is not UTF-8 (byte 0x{byte:02x} at line {line}); "
            'set job.encoding, e.g. job.encoding = "latin-1"'
        )
    return (
        f"{path}: line {line}: the file is not {codec} (byte 0x{byte:02x} at line {line}); "
        'set job.encoding to the encoding it was saved in, e.g. job.encoding = "utf-8" or "cp1252"'
    )


def text_lines(path: Path, codec: str, digest: InputDigest | None = None) -> Iterator[tuple[int, str]]:
    """Decoded physical lines (with their ``\\n``) and their 1-based numbers; ``Undecodable`` on bad bytes."""
    decoder = codecs.getincrementaldecoder(codec)("strict")
    line = 1
    pending = ""
    with open_bytes(path, digest) as f:
        for raw in f:
            try:
                pending += decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise Undecodable(line + pending.count("\n"), exc.object[exc.start]) from None
            if "\n" in pending:
                *whole, pending = pending.split("\n")
                for text in whole:
                    yield line, text + "\n"
                    line += 1
        try:
            pending += decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise Undecodable(line + pending.count("\n"), exc.object[exc.start]) from None
    if pending:
        yield line, pending


def byte_lines(path: Path, digest: InputDigest | None = None) -> Iterator[tuple[int, bytes]]:
    """Undecoded physical lines of a UTF-8 file and their 1-based numbers, a leading BOM removed: orjson
    parses (and checks) UTF-8 bytes itself, so JSONL lines need no decoding first."""
    with open_bytes(path, digest) as f:
        for line, raw in enumerate(f, 1):
            yield line, raw[3:] if line == 1 and raw.startswith(codecs.BOM_UTF8) else raw
