"""Images and video in rows: cell forms, checks before sending, data URIs, hashing by content, memory.

Tests marked ``NEEDS_DIFF`` exercise the runner/prompts/spec/cli half of the feature (pre-scan for
``strict_inputs``, ``--strict-inputs``, ``position = "inline"``, null media cells counted, media-error
hashes); they skip, with that reason shown by ``-ra``, until that change is in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.errors import InputError
from pipeline.job.spec import OVERRIDES, JobSpec, MediaSection, spec_from_dict
from pipeline.localapi import LocalAPI
from pipeline.records import Row
from pipeline.requests import media
from pipeline.requests.media import MediaBuilder, MediaProblem
from pipeline.requests.prepare import prepare
from pipeline.runner import RunOptions, run_job

ROOT = Path(__file__).resolve().parents[1]

NEEDS_DIFF = pytest.mark.skipif(
    "strict_inputs" not in OVERRIDES,
    reason="needs the runner/prompts/spec/cli media change (/tmp/media_runner.diff): pre-scan, --strict-inputs, inline",
)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 8), seed: int = 0) -> bytes:
    """A real image encoded by Pillow, so the magic bytes are the ones a user's files have."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def sha12(data: bytes) -> str:
    """The local API's echo id of a data-URI image: ``[image:<sha12>]``."""
    return hashlib.sha256(data).hexdigest()[:12]


def row(key: str = "r1", **values: Any) -> Row:
    return Row(index=0, key=key, values=values)


def builder(**section: Any) -> MediaBuilder:
    return MediaBuilder(MediaSection(**{"image_columns": ["img"], **section}))


def decode(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64")
    return head[5:-7], base64.b64decode(payload, validate=True)


def job(tmp_path: Path, frame: pl.DataFrame, **sections: dict[str, Any]) -> JobSpec:
    """An image job over ``frame`` (written as Parquet so binary columns survive)."""
    src = tmp_path / "rows.parquet"
    frame.write_parquet(src)
    data: dict[str, Any] = {
        "job": {"input": str(src), "output": str(tmp_path / "out.parquet"), "id_column": "id"},
        "model": {"max_tokens": 64},
        "prompt": {"user": "Describe product {id}."},
        "media": {"image_columns": ["img"]},
        "endpoint": {"preset": "local"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return spec_from_dict(data)


def run(spec: JobSpec, api: LocalAPI) -> Any:
    endpoint = spec.endpoint.model_copy(update={"base_url": api.base_url})
    return run_job(spec.model_copy(update={"endpoint": endpoint}), RunOptions())


def output(spec: JobSpec) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in pl.read_parquet(spec.job.output).to_dicts()}


# ---------------------------------------------------------------- cell forms


@pytest.mark.parametrize("url", ["https://example.com/a.png", "http://cdn.example.com/x?y=1", "  https://e.com/b.jpg "])
def test_url_cell_is_sent_as_is_with_detail(url: str) -> None:
    parts, error = builder(detail="low").parts(row(img=url))
    assert error is None
    assert parts == [{"type": "image_url", "image_url": {"url": url.strip(), "detail": "low"}}]


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_path_cell_becomes_data_uri_with_sniffed_mime(tmp_path: Path, fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    path = tmp_path / "photo.bin"  # the extension says nothing; the magic bytes decide
    path.write_bytes(data)
    parts, error = builder().parts(row(img=str(path)))
    assert error is None
    assert decode(parts[0]["image_url"]["url"]) == (mime, data)  # base64 round trip, exact bytes
    assert "detail" not in parts[0]["image_url"]


def test_bytes_cell_becomes_data_uri() -> None:
    data = image_bytes("JPEG")
    for cell in (data, bytearray(data), memoryview(data)):
        parts, error = builder().parts(row(img=cell))
        assert error is None
        assert decode(parts[0]["image_url"]["url"]) == ("image/jpeg", data)


@pytest.mark.parametrize("cell", [None, "", b""])
def test_null_cell_is_omitted(cell: Any) -> None:
    b = builder()
    assert b.parts(row(img=cell)) == ([], None)
    assert b.cells(row(img=cell)) == ({"img": None}, None)  # None: the renderer counts it as a null cell


def test_video_column_uses_video_part(tmp_path: Path) -> None:
    mp4 = b"\x00\x00\x00\x18ftypmp42" + bytes(64)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4)
    b = MediaBuilder(MediaSection(video_columns=["clip"], detail="high"))
    parts, error = b.parts(row(clip=str(path)))
    assert error is None
    assert list(parts[0]) == ["type", "video_url"] and "detail" not in parts[0]["video_url"]
    assert decode(parts[0]["video_url"]["url"]) == ("video/mp4", mp4)


# ---------------------------------------------------------------- checks before sending


def test_missing_file_is_a_row_error_naming_row_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    for strict in (False, True):  # strict is enforced by the pre-scan; rendering never raises
        parts, error = builder(strict_inputs=strict).parts(row("sku-7", img=str(missing)))
        assert parts == []
        assert error == f"row 'sku-7': column 'img': image file not found: {missing}"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    _, error = builder().parts(row(img=str(tmp_path)))
    assert error is not None and "not found" in error


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (image_bytes("BMP"), "unknown"),
        (image_bytes("TIFF"), "unknown"),
        (b"%PDF-1.7\n" + bytes(32), "unknown"),
        (b"\x00\x00\x00\x18ftypmp42" + bytes(16), "mp4"),  # a video in an image column
    ],
)
def test_unsupported_image_format(tmp_path: Path, data: bytes, found: str) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    _, error = builder().parts(row(img=str(path)))
    assert error == (
        f"row 'r1': column 'img': file {path}: unsupported image format ({found}); supported: PNG, JPEG, GIF, WEBP"
    )
    _, error = builder().parts(row(img=data))
    assert error is not None and f"unsupported image format ({found})" in error


def test_image_in_video_column_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(image_bytes("PNG"))
    _, error = MediaBuilder(MediaSection(video_columns=["clip"])).parts(row(clip=str(path)))
    assert error is not None and "unsupported video format (png); supported: MP4, MOV, WEBM, AVI" in error


def test_too_large_file_is_an_error_found_without_reading_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(image_bytes("PNG") + bytes(30_000))
    small = builder(max_file_mb=0.01)  # 10,485 bytes

    def no_read(self: Path) -> bytes:
        raise AssertionError("a file over the limit was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    _, error = small.parts(row(img=str(path)))
    assert error is not None
    assert str(path) in error and "over media.max_file_mb = 0.01" in error
    _, error = small.parts(row(img=image_bytes("PNG") + bytes(30_000)))
    assert error is not None and "image bytes is 0.0 MB, over media.max_file_mb" in error


def test_scan_agrees_with_build(tmp_path: Path) -> None:
    """The pre-scan (stat + 16 bytes) finds exactly the rows the build would mark as errors."""
    good = tmp_path / "good.jpg"
    good.write_bytes(image_bytes("JPEG"))
    bmp = tmp_path / "x.bmp"
    bmp.write_bytes(image_bytes("BMP"))
    big = tmp_path / "big.gif"
    big.write_bytes(image_bytes("GIF") + bytes(20_000))
    cells: list[Any] = [str(good), "https://e.com/a.png", None, str(tmp_path / "gone.png"), str(bmp), str(big)]
    cells += [image_bytes("WEBP"), b"not an image at all"]
    rows = [row(f"k{i}", img=c) for i, c in enumerate(cells)]
    b = builder(max_file_mb=0.01)
    scanned = {p.row_key: str(p) for p in b.scan(rows)}
    built = {r.key: e for r in rows if (e := b.parts(r)[1]) is not None}
    assert scanned == built
    assert sorted(scanned) == ["k3", "k4", "k5", "k7"]


def test_require_clean_lists_rows_and_paths(tmp_path: Path) -> None:
    rows = [row(f"k{i}", img=str(tmp_path / f"gone-{i}.png")) for i in range(8)]
    b = builder(strict_inputs=True)
    b.require_clean([[row(img="https://e.com/a.png"), row(img=None)], []])
    with pytest.raises(InputError) as err:
        b.require_clean([rows[:5], rows[5:]])
    message = str(err.value)
    assert message.startswith("8 media cell(s) cannot be sent and media.strict_inputs is on; nothing was sent:")
    assert f"row 'k0': column 'img': image file not found: {tmp_path / 'gone-0.png'}" in message
    assert message.endswith("(+3 more)")


def test_media_problem_message() -> None:
    assert str(MediaProblem("a", "img", "why")) == "row 'a': column 'img': why"


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi"),
        (b"\x00\x00\x00\x14ftypqt  ", "mov"),
        (b"\x00\x00\x00\x18ftypisom", "mp4"),
        (b"\x1a\x45\xdf\xa3\x9f", "webm"),
        (b"BM6\x00", None),
        (b"", None),
    ],
)
def test_sniff(head: bytes, fmt: str | None) -> None:
    assert media.sniff(head) == fmt


# ---------------------------------------------------------------- request hash follows content


def test_hash_follows_file_content_not_path(tmp_path: Path) -> None:
    first = tmp_path / "a.png"
    first.write_bytes(image_bytes("PNG", seed=1))
    spec = job(tmp_path, pl.DataFrame({"id": ["p1"], "img": [str(first)]}))
    renderer = prepare(spec).renderer
    before = renderer.render(row("p1", id="p1", img=str(first)))
    assert str(first).encode() not in before.body
    moved = tmp_path / "sub" / "renamed.png"
    moved.parent.mkdir()
    first.rename(moved)
    assert renderer.render(row("p1", id="p1", img=str(moved))).request_hash == before.request_hash
    moved.write_bytes(image_bytes("PNG", seed=2))
    assert renderer.render(row("p1", id="p1", img=str(moved))).request_hash != before.request_hash
    as_bytes = renderer.render(row("p1", id="p1", img=image_bytes("PNG", seed=2)))
    assert as_bytes.request_hash == renderer.render(row("p1", id="p1", img=str(moved))).request_hash


def test_rerun_resends_changed_file_not_renamed_one(tmp_path: Path, api: LocalAPI) -> None:
    paths = [tmp_path / f"img-{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(image_bytes("PNG", seed=i))
    spec = job(tmp_path, pl.DataFrame({"id": ["a", "b", "c"], "img": [str(p) for p in paths]}))
    assert run(spec, api).requests_sent == 3
    renamed = tmp_path / "renamed.png"
    paths[0].rename(renamed)  # same bytes, new name
    paths[1].write_bytes(image_bytes("PNG", seed=99))  # same name, new bytes
    spec = job(tmp_path, pl.DataFrame({"id": ["a", "b", "c"], "img": [str(renamed), str(paths[1]), str(paths[2])]}))
    again = run(spec, api)
    assert (again.requests_sent, again.rows_from_ledger) == (1, 2)
    assert f"[image:{sha12(image_bytes('PNG', seed=99))}]" in output(spec)["b"]["content"]


# ---------------------------------------------------------------- end to end against the local API


def test_image_job_end_to_end(tmp_path: Path, api: LocalAPI) -> None:
    """Paths, raw bytes (a Parquet binary column), URLs, nulls and a missing file in one job."""
    png, jpeg, raw = image_bytes("PNG", seed=1), image_bytes("JPEG", seed=2), image_bytes("WEBP", seed=3)
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "b.jpg").write_bytes(jpeg)
    url = "https://example.com/c.png"
    frame = pl.DataFrame(
        {
            "id": ["path", "jpeg", "url", "null", "missing", "bytes"],
            "img": [str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), url, None, str(tmp_path / "gone.png"), None],
            "raw": [None, None, None, None, None, raw],
        },
        schema={"id": pl.String, "img": pl.String, "raw": pl.Binary},
    )
    spec = job(tmp_path, frame, media={"image_columns": ["img", "raw"], "detail": "high"})
    summary = run(spec, api)
    out = output(spec)
    assert summary.requests_sent == 5  # the missing file's row is never sent
    assert f"[image:{sha12(png)}]" in out["path"]["content"]
    assert f"[image:{sha12(jpeg)}]" in out["jpeg"]["content"]
    assert f"[image:{sha12(url.encode())}]" in out["url"]["content"]
    assert f"[image:{sha12(raw)}]" in out["bytes"]["content"]
    assert "[image:" not in out["null"]["content"]
    assert out["missing"]["status"] == "error"
    assert out["missing"]["error"] == f"row 'missing': column 'img': image file not found: {tmp_path / 'gone.png'}"
    assert out["missing"]["error_kind"] == "media"
    assert summary.exit_code == 1
    assert api.stats()["received"] == 5


def test_example_job_runs_against_local_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs/label_images.toml as committed, with its own built-in local API."""
    from pipeline.job.spec import load_spec

    monkeypatch.chdir(ROOT)
    spec = load_spec(ROOT / "jobs/label_images.toml", {"output": tmp_path / "label_images.parquet"})
    summary = run_job(spec, RunOptions())
    assert summary.exit_code == 0, summary.error_examples
    frame = pl.read_parquet(tmp_path / "label_images.parquet")
    assert frame.height == len(pl.read_csv(ROOT / "data/images.csv"))
    assert frame.get_column("category").null_count() == 0
    first = (ROOT / frame.get_column("image")[0]).read_bytes()
    assert f"[image:{sha12(first)}]" in frame.get_column("content")[0]


def test_example_images_are_small() -> None:
    total = sum(p.stat().st_size for p in (ROOT / "data/images").glob("*"))
    assert 0 < total < 200_000


# ---------------------------------------------------------------- needs the runner/prompts/spec/cli change


@NEEDS_DIFF
def test_strict_inputs_stops_before_any_request(tmp_path: Path, api: LocalAPI) -> None:
    good = tmp_path / "ok.png"
    good.write_bytes(image_bytes("PNG"))
    ids = [f"p{i}" for i in range(300)]  # more than one chunk: the bad row is in the last one
    cells = [str(good)] * 299 + [str(tmp_path / "gone.png")]
    spec = job(tmp_path, pl.DataFrame({"id": ids, "img": cells}), media={"strict_inputs": True})
    with pytest.raises(InputError, match=r"row 'p299': column 'img': image file not found: .*gone\.png"):
        run(spec, api)
    assert api.stats()["received"] == 0
    assert not spec.ledger_path.exists()


@NEEDS_DIFF
def test_strict_inputs_cli_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    monkeypatch.chdir(ROOT)
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data/images.csv"
    csv.write_text("product_id,image,title\np-1,data/images/nope.jpg,mug\n")
    args = ["run", "jobs/label_images.toml", "--input", str(csv), "--output", str(tmp_path / "o.parquet")]
    result = CliRunner().invoke(main, [*args, "--strict-inputs", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "row 'p-1': column 'image': image file not found: data/images/nope.jpg" in result.output
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1, result.output  # without the flag: a row error, the run goes on


@NEEDS_DIFF
def test_inline_position_places_images_at_placeholders(tmp_path: Path) -> None:
    front, back = image_bytes("PNG", seed=1), image_bytes("JPEG", seed=2)
    frame = pl.DataFrame({"id": ["a"], "front": [front], "back": [back]})
    spec = job(
        tmp_path,
        frame,
        prompt={"user": "Front {front} and back {back} of {id}: same {{item}}?"},
        media={"image_columns": ["front", "back"], "position": "inline"},
    )
    req = prepare(spec).renderer.render(row("a", id="a", front=front, back=back))
    content = orjson.loads(req.body)["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url", "text", "image_url", "text"]
    assert [p["text"] for p in content if p["type"] == "text"] == ["Front ", " and back ", " of a: same {item}?"]
    assert decode(content[3]["image_url"]["url"]) == ("image/jpeg", back)
    null_back = prepare(spec).renderer.render(row("a", id="a", front=front, back=None))
    assert null_back.null_cells == 1
    assert [p["type"] for p in orjson.loads(null_back.body)["messages"][-1]["content"]] == [
        "text",
        "image_url",
        "text",
        "text",
    ]


@NEEDS_DIFF
def test_null_media_cells_are_counted(tmp_path: Path, api: LocalAPI) -> None:
    spec = job(tmp_path, pl.DataFrame({"id": ["a", "b"], "img": [None, "https://e.com/x.png"]}))
    assert run(spec, api).null_cells == 1


@NEEDS_DIFF
def test_media_error_hash_differs_from_text_only_row(tmp_path: Path) -> None:
    """A row whose file is missing must not share a hash (and so a ledger answer) with a null-image row."""
    spec = job(tmp_path, pl.DataFrame({"id": ["a"], "img": [None]}), prompt={"user": "Describe this."})
    renderer = prepare(spec).renderer
    null = renderer.render(row("a", id="a", img=None))
    missing = renderer.render(row("b", id="b", img=str(tmp_path / "gone.png")))
    assert missing.not_sent is not None and missing.not_sent.error_kind == "media"
    assert null.not_sent is not None and null.not_sent.status == "skipped"  # its only placeholder is null
    assert missing.request_hash != null.request_hash


# ---------------------------------------------------------------- memory


def write_noise_images(folder: Path, n: int, side: int = 184) -> int:
    """``n`` distinct valid PNGs of ~100 KB (noise does not compress); returns their total size.

    Pillow encodes one image; each copy gets its own ``tEXt`` chunk before ``IEND``, which keeps the
    files valid and different (so no two requests are identical) at the cost of a file write.
    """
    folder.mkdir()
    rng = random.Random(0)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buf, "PNG", compress_level=0)
    png = buf.getvalue()
    assert png.endswith(b"IEND\xaeB`\x82")
    body, iend = png[:-12], png[-12:]
    total = 0
    for i in range(n):
        data = b"Comment\x00" + str(i).encode()
        chunk = len(data).to_bytes(4, "big") + b"tEXt" + data + zlib.crc32(b"tEXt" + data).to_bytes(4, "big")
        path = folder / f"{i:05d}.png"
        total += path.write_bytes(body + chunk + iend)
    return total


#: Runs one job in a fresh interpreter and reports its resident memory: RSS, not tracemalloc, because
#: tracemalloc books each orjson body at its ~1 MB buffer size although only ~136 KB of it is ever touched.
MEMORY_PROBE = """
import json, resource, sys
# Libraries a job of this size loads on first use (pipeline.lazy), imported up front: their code is
# start-up, not memory the images hold.
import httpx_aiohttp, pyarrow.compute, pyarrow.parquet
from pipeline.runner import RunOptions, run_job
from pipeline.job.spec import load_spec
spec = load_spec(sys.argv[1])
with open("/proc/self/statm") as f:  # resident now, in KiB like ru_maxrss below
    before = int(f.read().split()[1]) * resource.getpagesize() // 1024
summary = run_job(spec, RunOptions())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "before_kb": before, "peak_kb": peak, "sent": summary.requests_sent, "retries": summary.retries,
    "exit": summary.exit_code,
}))
"""


# The slow tier: late in the fast suite's one process the probe's growth rises with the tests run before it
# (22% alone, 37-68% after a third or half of the suite, 127% after all of it; not understood yet), so it
# runs where few tests come first.
@pytest.mark.slow
@NEEDS_DIFF  # with 256-row media chunks (before the change) RSS keeps climbing: 155/273/320 MB at 2k/4k/6k rows
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc (Linux)")
def test_image_job_memory_is_bounded_by_requests_in_flight(tmp_path: Path) -> None:
    """4,000 rows of ~100 KB images (~400 MB, ~540 MB as base64): the run's memory grows by a small part of it.

    The server is a ``seedbatch serve`` process of its own. Served from the test process, late in a full
    run in a fresh venv, the probe's RSS grew past all of the images (125-127%; 22% for the same venv and
    code run alone): the figure depended on what the test process had done before, not on the pipeline.
    """
    n = 4000
    started = time.perf_counter()
    total = write_noise_images(tmp_path / "imgs", n)
    made = time.perf_counter() - started
    paths = [str(tmp_path / f"imgs/{i:05d}.png") for i in range(n)]
    src = tmp_path / "rows.parquet"
    pl.DataFrame({"id": [f"p{i:05d}" for i in range(n)], "img": paths}).write_parquet(src)
    with served_in_its_own_process() as base_url:
        (tmp_path / "job.toml").write_text(
            f"""[job]\ninput = "{src}"\noutput = "{tmp_path / "out.parquet"}"\nid_column = "id"\n"""
            """[model]\nmax_tokens = 64\n[prompt]\nuser = "Describe product {id}."\n"""
            """[media]\nimage_columns = ["img"]\n[limits]\nconcurrency = 16\n"""
            f"""[endpoint]\npreset = "vllm"\nbase_url = "{base_url}"\n"""
        )
        started = time.perf_counter()
        # glibc's mmap threshold fixed at 64 KB: every image-sized buffer is its own mapping, returned to the
        # OS when freed; with its default, freed 130 KB buffers may stay in the heap once the threshold rose.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "job.toml")],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env=env,
        )
    wall = time.perf_counter() - started
    probe = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert (probe["sent"], probe["exit"]) == (n, 0)
    growth = (probe["peak_kb"] - probe["before_kb"]) * 1024
    print(
        f"\nmedia memory: {n} rows, images {total / 1e6:.0f} MB on disk (~{total * 4 / 3 / 1e6:.0f} MB as base64); "
        f"peak RSS {probe['peak_kb'] / 1024:.0f} MiB, {growth / 1e6:.0f} MB over the "
        f"{probe['before_kb'] / 1024:.0f} MiB after start-up ({growth / total:.0%} of the images); "
        f"{probe['retries']} retries; run {wall:.1f}s, images made in {made:.1f}s"
    )
    # Holding every image at once would be >= 100% of their bytes (>= 133% as base64 bodies); alone this
    # grows by ~20%, in the slow tier by ~40%.
    assert growth < 1.0 * total


@contextlib.contextmanager
def served_in_its_own_process() -> Iterator[str]:
    """``seedbatch serve`` on a free port of 127.0.0.1; its base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base_url}/models", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield base_url
    finally:
        server.terminate()
        server.wait(timeout=10)
