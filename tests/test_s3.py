"""Inputs and outputs in S3, against a real S3 API: moto's server on a free 127.0.0.1 port.

Not a mock of pyarrow: seedbatch talks HTTP to the server through pyarrow's S3 filesystem, found by
``AWS_ENDPOINT_URL_S3`` as a user's MinIO would be. Credentials are fake and set in the environment of
these tests only. The ledger, lock and manifest must stay on local disk (``XDG_DATA_HOME`` here).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.records import ExitCode
from tests.helpers import ROOT, reviews, to_toml

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

BUCKET = "seedbatch-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Requests(logging.Handler):
    """The request lines moto's server logs (``"PUT /bucket/key HTTP/1.1" 200``): what reached S3."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


REQUESTS = _Requests()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    log = logging.getLogger("werkzeug")
    log.addHandler(REQUESTS)
    log.propagate = False
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=True)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        log.removeHandler(REQUESTS)
        log.propagate = True


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pafs.FileSystem:
    """Fake credentials and the local endpoint in this test's environment; a fresh bucket; local data in tmp."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true&allow_bucket_deletion=true")
    if fs.get_file_info(BUCKET).type != pafs.FileType.NotFound:
        fs.delete_dir(BUCKET)
    fs.create_dir(BUCKET)
    return fs


def _put(fs: pafs.FileSystem, key: str, local: Path) -> None:
    with fs.open_output_stream(f"{BUCKET}/{key}") as out:
        out.write(local.read_bytes())


def _job(tmp_path: Path, api: LocalAPI, name: str, input_uri: str, output: str) -> Path:
    (tmp_path / "schemas").mkdir(exist_ok=True)
    shutil.copy(ROOT / "jobs" / "schemas" / "review_label.json", tmp_path / "schemas" / "review_label.json")
    job = tmp_path / "jobs" / f"{name}.toml"
    job.parent.mkdir(exist_ok=True)
    job.write_text(
        to_toml(
            {
                "job": {"input": input_uri, "output": output, "id_column": "review_id"},
                "model": {"max_tokens": 128},
                "prompt": {"system": "Label the review.", "user": "Product: {product}\nReview: {text}"},
                "output": {"format": "json_schema", "schema": "../schemas/review_label.json"},
                "endpoint": {"preset": "local", "base_url": api.base_url},
            }
        )
    )
    return job


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, ["run", *args, "--no-progress"])


def _summary(result: Result) -> dict[str, str]:
    line = next(x for x in result.output.splitlines() if x.startswith("seedbatch summary:"))
    return dict(part.split("=", 1) for part in line.removeprefix("seedbatch summary: ").split())


def _listing(fs: pafs.FileSystem) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
    return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)


def test_parquet_and_csv_inputs_from_s3_outputs_to_s3_then_rerun_pays_nothing(
    tmp_path: Path, api: LocalAPI, s3: pafs.FileSystem
) -> None:
    reviews(12).write_parquet(tmp_path / "a.parquet")
    reviews(8, start=100).write_csv(tmp_path / "b.csv")
    _put(s3, "in/reviews.parquet", tmp_path / "a.parquet")
    _put(s3, "in/reviews.csv", tmp_path / "b.csv")
    parquet_job = _job(
        tmp_path, api, "from_parquet", f"s3://{BUCKET}/in/reviews.parquet", f"s3://{BUCKET}/out/labels.parquet"
    )
    csv_job = _job(tmp_path, api, "from_csv", f"s3://{BUCKET}/in/reviews.csv", "../out/unused.parquet")

    first = _run(str(parquet_job))
    assert first.exit_code == ExitCode.OK, first.output
    assert _summary(first)["output"] == f"s3://{BUCKET}/out/labels.parquet"
    # The CSV job's output comes from the flag: an object URI is not anchored to the job's folder.
    second = _run(str(csv_job), "--output", f"s3://{BUCKET}/out/labels.csv")
    assert second.exit_code == ExitCode.OK, second.output
    assert api.stats()["received"] == 12 + 8

    uploads = [line for line in REQUESTS.lines if "/out/labels." in line and ('"PUT' in line or '"POST' in line)]
    print("output upload requests:", *(u.split('"')[1] for u in uploads), sep="\n  ")
    assert len(uploads) == 2, uploads
    assert all('"PUT /' in u and "uploads" not in u and "partNumber" not in u for u in uploads), uploads

    listing = _listing(s3)
    print("\nbucket listing after the first runs:")
    for path, size in listing:
        print(f"  s3://{path}  {size} bytes")
    assert [p for p, _ in listing] == [
        f"{BUCKET}/in/reviews.csv",
        f"{BUCKET}/in/reviews.parquet",
        f"{BUCKET}/out/labels.csv",
        f"{BUCKET}/out/labels.parquet",
    ], "ledger, lock and manifest stay local: only the outputs are uploaded"

    with s3.open_input_file(f"{BUCKET}/out/labels.parquet") as f:
        df = pl.from_arrow(pq.read_table(f))
    assert isinstance(df, pl.DataFrame)
    print("output schema (s3://seedbatch-test/out/labels.parquet):")
    print(df.schema)
    assert df.height == 12
    assert df.get_column("review_id").to_list() == reviews(12).get_column("review_id").to_list()
    assert set(df.get_column("status").to_list()) == {"ok"}
    assert isinstance(df.schema["topics"], pl.List)
    with s3.open_input_stream(f"{BUCKET}/out/labels.csv") as f:
        csv = pl.read_csv(f.read(), infer_schema_length=0)
    assert csv.get_column("review_id").to_list() == [f"r-{i:05d}" for i in range(100, 108)]
    assert all(t.startswith("[") for t in csv.get_column("topics").to_list())

    data_home = tmp_path / "data-home" / "seedbatch" / "s3" / BUCKET
    ledger = data_home / "out" / "labels.parquet.ledger.sqlite"
    assert ledger.is_file(), sorted(str(p) for p in data_home.rglob("*"))
    assert (data_home / "out" / "labels.parquet.manifest.json").is_file()
    copy = data_home / "in" / "reviews.parquet"
    inode = copy.stat().st_ino

    again = _run(str(parquet_job))
    assert again.exit_code == ExitCode.OK, again.output
    again_csv = _run(str(csv_job), "--output", f"s3://{BUCKET}/out/labels.csv")
    assert again_csv.exit_code == ExitCode.OK, again_csv.output
    assert api.stats()["received"] == 20, "a rerun resumes from the local ledger and pays for nothing"
    assert _summary(again)["requests_sent"] == "0"
    assert _summary(again)["from_ledger"] == "12"
    assert copy.stat().st_ino == inode, "an unchanged input object is not downloaded again"
    shown = ("rows", "from_ledger", "requests_sent", "usd_spent", "output")
    print("rerun:", " ".join(f"{k}={v}" for k, v in _summary(again).items() if k in shown))

    status = CliRunner().invoke(main, ["status", str(parquet_job)])
    assert status.exit_code == 0, status.output
    assert "12 total: 12 ok, 0 failed, 0 pending" in status.output
    plan = CliRunner().invoke(main, ["plan", str(parquet_job)])
    assert plan.exit_code == 0, plan.output
    assert "12 selected; 12 already answered in the ledger; 0 duplicates; 0 to send" in plan.output
    assert api.stats()["received"] == 20

    # Rows appended to the input object: the next run downloads it and sends only the new rows.
    reviews(10, start=100).write_csv(tmp_path / "b.csv")
    _put(s3, "in/reviews.csv", tmp_path / "b.csv")
    grown = _run(str(csv_job), "--output", f"s3://{BUCKET}/out/labels.csv")
    assert grown.exit_code == ExitCode.OK, grown.output
    assert api.stats()["received"] == 22
    with s3.open_input_stream(f"{BUCKET}/out/labels.csv") as f:
        assert pl.read_csv(f.read()).height == 10


def test_a_missing_bucket_or_object_is_one_line_before_any_request(
    tmp_path: Path, api: LocalAPI, s3: pafs.FileSystem
) -> None:
    reviews(3).write_csv(tmp_path / "in.csv")
    _put(s3, "in.csv", tmp_path / "in.csv")
    cases = [
        (
            _job(tmp_path, api, "bad_out", f"s3://{BUCKET}/in.csv", "s3://no-such-bucket/out/labels.parquet"),
            "seedbatch: error: s3://no-such-bucket/out/labels.parquet: bucket 'no-such-bucket' not found",
        ),
        (
            _job(tmp_path, api, "bad_in", "s3://no-such-bucket/in.csv", str(tmp_path / "out.parquet")),
            "seedbatch: error: s3://no-such-bucket/in.csv: bucket 'no-such-bucket' not found",
        ),
        (
            _job(tmp_path, api, "no_object", f"s3://{BUCKET}/missing.csv", str(tmp_path / "out.parquet")),
            f"seedbatch: error: s3://{BUCKET}/missing.csv: no such object",
        ),
    ]
    for job, expected in cases:
        result = _run(str(job))
        lines = result.output.strip().splitlines()
        print(lines[0])
        assert result.exit_code == ExitCode.BAD_INPUT, result.output
        assert len(lines) == 1, result.output
        assert lines[0].startswith(expected), lines[0]
    assert api.stats()["received"] == 0


def test_a_bad_line_in_an_input_object_is_named_by_its_uri(tmp_path: Path, api: LocalAPI, s3: pafs.FileSystem) -> None:
    (tmp_path / "broken.csv").write_text("review_id,product,text\nr-1,kettle,fine\nr-2,lamp,too,dim\n")
    _put(s3, "broken.csv", tmp_path / "broken.csv")
    result = _run(str(_job(tmp_path, api, "broken", f"s3://{BUCKET}/broken.csv", str(tmp_path / "out.csv"))))
    lines = result.output.strip().splitlines()
    print(lines[0])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"seedbatch: error: s3://{BUCKET}/broken.csv (local copy "), lines[0]
    assert "line 3: 4 fields but the header has 3" in lines[0]
    assert api.stats()["received"] == 0


def test_show_reads_an_output_object(tmp_path: Path, api: LocalAPI, s3: pafs.FileSystem) -> None:
    reviews(4).write_csv(tmp_path / "in.csv")
    _put(s3, "in.csv", tmp_path / "in.csv")
    job = _job(tmp_path, api, "shown", f"s3://{BUCKET}/in.csv", f"s3://{BUCKET}/out.jsonl")
    assert _run(str(job)).exit_code == ExitCode.OK
    result = CliRunner().invoke(main, ["show", f"s3://{BUCKET}/out.jsonl", "--rows", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("── row") == 2
    assert "r-00001" in result.output


def test_run_output_object_gets_only_this_runs_answers(tmp_path: Path, api: LocalAPI, s3: pafs.FileSystem) -> None:
    reviews(5).write_csv(tmp_path / "in.csv")
    job = _job(tmp_path, api, "runs", str(tmp_path / "in.csv"), str(tmp_path / "out" / "all.parquet"))
    job.write_text(job.read_text().replace("[model]", f'run_output = "s3://{BUCKET}/runs/{{run_id}}.jsonl"\n[model]'))
    first = _run(str(job), "--limit", "3")
    second = _run(str(job))
    assert first.exit_code == second.exit_code == ExitCode.OK, second.output
    runs = [_summary(first)["run_id"], _summary(second)["run_id"]]
    listing = [p for p, _ in _listing(s3)]
    assert listing == sorted(f"{BUCKET}/runs/{r}.jsonl" for r in runs)
    with s3.open_input_stream(f"{BUCKET}/runs/{runs[1]}.jsonl") as f:
        ids = [line.split('"review_id":"')[1][:7] for line in f.read().decode().splitlines()]
    assert ids == ["r-00003", "r-00004"], "the second run's file holds the two rows it paid for"


def test_a_failed_upload_keeps_the_local_output_and_a_rerun_uploads_it(
    tmp_path: Path, s3: pafs.FileSystem, s3_endpoint: str
) -> None:
    """The output bucket vanishes while answers are in flight: the run exits 1 naming the local file; once the
    bucket is back, a rerun pays for nothing and uploads."""
    slow = LocalAPI(ServerConfig(latency_ms=400))
    slow.start()
    try:
        reviews(4).write_csv(tmp_path / "in.csv")
        job = _job(tmp_path, slow, "vanishing", str(tmp_path / "in.csv"), f"s3://{BUCKET}/out/v.parquet")

        def delete_bucket_once_sending() -> None:
            while slow.stats()["received"] == 0:
                time.sleep(0.01)
            s3.delete_dir(BUCKET)

        deleter = threading.Thread(target=delete_bucket_once_sending)
        deleter.start()
        result = _run(str(job))
        deleter.join()
        lines = result.output.strip().splitlines()
        print(lines[-1])
        assert result.exit_code == 1, result.output
        assert lines[-1].startswith(f"seedbatch: error: s3://{BUCKET}/out/v.parquet: upload failed"), lines[-1]
        local = tmp_path / "data-home" / "seedbatch" / "s3" / BUCKET / "out" / "v.parquet"
        assert f"the output is at {local}" in lines[-1]
        assert pl.read_parquet(local).get_column("status").to_list() == ["ok"] * 4
        paid = slow.stats()["received"]

        s3.create_dir(BUCKET)
        again = _run(str(job))
        assert again.exit_code == ExitCode.OK, again.output
        assert slow.stats()["received"] == paid
        assert [p for p, _ in _listing(s3)] == [f"{BUCKET}/out/v.parquet"]
    finally:
        slow.stop()


def test_the_example_s3_job_runs_against_a_real_s3_api(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``jobs/s3_reviews.toml`` as README shows it: the sample reviews uploaded, then run on the local API."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "XDG_DATA_HOME": str(tmp_path / "data-home"),
    }.items():
        monkeypatch.setenv(name, value)
    fs, _ = pafs.FileSystem.from_uri("s3://seedbatch-demo?allow_bucket_creation=true&allow_bucket_deletion=true")
    if fs.get_file_info("seedbatch-demo").type != pafs.FileType.NotFound:
        fs.delete_dir("seedbatch-demo")
    fs.create_dir("seedbatch-demo")
    pafs.copy_files(str(ROOT / "data" / "reviews.csv"), "seedbatch-demo/reviews.csv", destination_filesystem=fs)

    result = _run(str(ROOT / "jobs" / "s3_reviews.toml"), "--endpoint", "local")
    assert result.exit_code == ExitCode.OK, result.output
    rows = pl.read_csv(ROOT / "data" / "reviews.csv").height
    with fs.open_input_stream("seedbatch-demo/out/labels.csv") as f:
        out = pl.read_csv(f.read())
    assert out.height == rows
    assert out.get_column("status").to_list() == ["ok"] * rows
    assert _summary(_run(str(ROOT / "jobs" / "s3_reviews.toml"), "--endpoint", "local"))["requests_sent"] == "0"
