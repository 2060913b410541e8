"""Objects (``s3://bucket/key``, ``gs://…``) in and out, through pyarrow's filesystems.

A job may name an object as its input or output. Everything else stays on this machine's disk:
each object has one local copy (``job.objects.local_copy_path``, which ``spec`` fills in), the reader
reads that copy and the writer writes it, exactly as for a local job, and the ledger, lock and manifest sit beside it.
Why local: SQLite needs a file system with working locks (object stores have none), and an answer
that was paid for must be durable before anything else happens to it, which a commit to a local
file is and an upload at the end of a run is not.

- An input object is downloaded once into its local copy, and again only when its size or
  modification time changed: a run reads its input three times (the check pass, the requests, the
  output), and a cron rerun of an unchanged input downloads nothing.
- An output is written locally (atomically, as always), then uploaded once, finished: with pyarrow's
  ``allow_delayed_open`` a file smaller than one upload part (10 MB) is a single PUT; a larger one is a
  multipart upload, which S3 also shows only once complete. Readers see the old object or the new one.
  A stream pyarrow closes completes its upload (there is no abort), so the object's size is checked
  after the upload: a local read failing half-way (a disk error) is reported, not hidden.
- Credentials come from where pyarrow looks for them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, then the instance metadata service). pyarrow's
  ``FileSystem.from_uri`` also reads ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL`` (a local S3 such as
  MinIO or moto); ``S3FileSystem()`` alone would not, so every object is opened through ``from_uri``.

Every failure before sending (bucket or object missing, no credentials, access denied, unknown
scheme) is one ``InputError``/``SpecError`` line naming the URI.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.errors import InputError, SeedbatchError, SpecError
from pipeline.job.objects import is_object_uri, local_copy_path, objects_home
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.job.spec import JobSpec
else:  # only object-store jobs need pyarrow's filesystems (see lazy)
    pa, pafs = lazy("pyarrow"), lazy("pyarrow.fs")

__all__ = [
    "UploadError",
    "check_output",
    "download",
    "fetch_input",
    "is_object_uri",
    "local_copy_path",
    "objects_home",
    "objects_named",
    "open_object",
    "upload",
]


class UploadError(SeedbatchError):
    """The run finished and its output is on local disk, but the upload failed: a rerun uploads it again
    (nothing is paid twice: the answers are in the local ledger)."""

    exit_code = 1


#: Credential sources other than the instance metadata service, which only a request can ask.
_AWS_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def open_object(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``uri`` and the path inside it; an unknown scheme or bad URI is a SpecError.

    S3 objects are opened with ``allow_delayed_open`` (a small upload is one PUT, not a multipart
    upload) unless the URI's query says otherwise.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() == "s3":
        _check_aws_credentials(uri)
        query = dict(parse_qsl(parts.query))
        query.setdefault("allow_delayed_open", "true")
        uri = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SpecError(f"{_shown(uri)}: cannot open this location ({_first_line(exc)})") from None
    return fs, str(path)


def fetch_input(spec: JobSpec) -> None:
    """Bring ``job.input``'s object (if it is one) into its local copy, unless the copy is current."""
    uri = spec.objects.get("input")
    if uri is not None:
        download(uri, spec.job.input, what="job.input or --input")


def download(uri: str, local: Path, *, what: str = "the URI") -> Path:
    """The object at ``uri`` as the local file ``local`` (kept when its size and modification time match)."""
    fs, path = open_object(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        bucket = path.split("/", 1)[0]
        if "/" in path and _info(fs, bucket, uri).type == pafs.FileType.NotFound:
            raise InputError(f"{_shown(uri)}: bucket {bucket!r} not found (check {what})")
        raise InputError(f"{_shown(uri)}: no such object (check {what})")
    if info.type != pafs.FileType.File:
        raise InputError(f"{_shown(uri)}: is a folder, not an object; name one file (check {what})")
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    if mtime is not None and local.is_file():
        st = local.stat()
        if st.st_size == info.size and abs(st.st_mtime - mtime) < 1e-3:
            return local
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
    except OSError as exc:
        raise InputError(
            f"{_shown(uri)}: cannot write its local copy in {local.parent} ({exc.strerror}); "
            "set XDG_DATA_HOME to a writable folder"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_UPLOAD_CHUNK):
                dst.write(chunk)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, local)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{_shown(uri)}: download failed ({_first_line(exc)})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return local


def check_output(spec: JobSpec) -> None:
    """Fail before sending when an output object's bucket is missing or cannot be reached."""
    for key in ("output", "run_output"):
        uri = spec.objects.get(key)
        if uri is None:
            continue
        if key == "run_output":  # a template: only its bucket is checked now
            uri = uri.format(date="2026-01-01", run_id="run")
        if not urlsplit(uri).path.strip("/"):  # s3://results.parquet: a bucket, no object in it
            example = f"{_shown(uri).rstrip('/')}/out.parquet"
            raise SpecError(f"{_shown(uri)}: job.{key} needs a key inside the bucket, e.g. {example}")
        fs, path = open_object(uri)
        bucket = path.split("/", 1)[0]
        if _info(fs, bucket, uri).type == pafs.FileType.NotFound:
            raise SpecError(f"{_shown(uri)}: bucket {bucket!r} not found (create it, or fix job.{key})")


def upload(local: Path, uri: str) -> None:
    """Put the finished local file at ``uri`` in one go: readers see the old object or the new one.

    Written through an explicit stream and ``close``, then checked with one HEAD: ``pyarrow.fs.copy_files``
    ignores an error raised when it closes the stream (a delayed-open PUT fails only then), so through it a
    missing bucket would look like a successful upload.
    """
    fs, path = open_object(uri)
    size = local.stat().st_size
    try:
        out = fs.open_output_stream(path)
        try:
            with open(local, "rb") as src:
                while chunk := src.read(_UPLOAD_CHUNK):
                    out.write(chunk)
        finally:
            out.close()  # the PUT (or the multipart completion) happens here, and its error surfaces here
        info = fs.get_file_info(path)
    except (pa.ArrowException, OSError) as exc:
        raise UploadError(
            f"{_shown(uri)}: upload failed ({_first_line(exc)}); the output is at {local} and a rerun "
            "uploads it again without paying for any row"
        ) from None
    if info.type != pafs.FileType.File or info.size != size:
        raise UploadError(
            f"{_shown(uri)}: upload failed (the object holds {info.size} bytes, the output {size}); the output is "
            f"at {local} and a rerun uploads it again without paying for any row"
        )


#: Bytes read from the local output at a time while uploading.
_UPLOAD_CHUNK = 1 << 20


@contextlib.contextmanager
def objects_named(spec: JobSpec) -> Iterator[None]:
    """A one-line error about a local copy says which object it is a copy of."""
    try:
        yield
    except (InputError, SpecError) as exc:
        message = str(exc)
        for key, uri in spec.objects.items():
            local = str(getattr(spec.job, key))
            message = message.replace(local, f"{_shown(uri)} (local copy {local})", 1) if local in message else message
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except (pa.ArrowException, OSError) as exc:
        text = _first_line(exc)
        if "ACCESS_DENIED" in text or "403" in text:
            raise InputError(
                f"{_shown(uri)}: access denied ({text}); check the AWS credentials (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may read and write this bucket"
            ) from None
        raise InputError(f"{_shown(uri)}: cannot reach the object store ({text})") from None


def _check_aws_credentials(uri: str) -> None:
    """No credentials anywhere pyarrow would look: say so now, not as an 'access denied' from S3 later.

    Only decided when the instance metadata service is switched off (``AWS_EC2_METADATA_DISABLED``):
    otherwise an EC2 role may supply them, and only the first request can tell.
    """
    query = dict(parse_qsl(urlsplit(uri).query))
    if query.get("anonymous", "").lower() in ("true", "1") or query.get("access_key") or query.get("role_arn"):
        return
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return
    if any(os.environ.get(name) for name in _AWS_CREDENTIAL_ENV):
        return
    home = Path(os.path.expanduser("~"))
    files = [
        Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"),
        Path(os.environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config"),
    ]
    if any(f.is_file() for f in files):
        return
    raise SpecError(
        f"{_shown(uri)}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
        "(or add ?anonymous=true to the URI for a public bucket)"
    )


_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _REQUEST_ID.sub("", text)


def _shown(uri: str) -> str:
    """The URI without its query: options like ``access_key``/``secret_key`` never reach a message."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(query="", fragment=""))
