"""How many times a whole ``seedbatch run`` opens its input: one pass to check, one to send, one to write.

Each run is a subprocess with an audit hook (``sys.addaudithook``: hooks cannot be removed, so they get a
process of their own) counting the ``open`` events for the input's path, by thread. The up-to-date
rerun reads the input once, to hash it.

``python tests/test_input_opens.py`` prints the counts per format, for comparing two commits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, reviews

ROWS = 5000
#: The most opens a run may make of its input, and an up-to-date rerun.
MAX_RUN_OPENS = 3
MAX_RERUN_OPENS = 1

_COUNT = r"""
import os, sys, threading, json
target = os.path.realpath(sys.argv[1])
counts = {}
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.realpath(path) == target:
            name = threading.current_thread().name
            counts[name] = counts.get(name, 0) + 1
sys.addaudithook(hook)
from pipeline.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("\nOPENS " + json.dumps({"code": code, "counts": counts}) + "\n")
"""


def write_input(folder: Path, suffix: str, rows: int = ROWS) -> Path:
    frame = reviews(rows)
    path = folder / f"reviews{suffix}"
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".csv.gz":
        import gzip

        path.write_bytes(gzip.compress(frame.write_csv().encode()))
    elif suffix == ".jsonl":
        frame.write_ndjson(path)
    else:
        frame.write_parquet(path, row_group_size=1000)
    return path


def write_demo_job(folder: Path, input_path: Path, chunk_rows: int = 2000) -> Path:
    job = folder / "job.toml"
    job.write_text(
        f"""[job]
input = "{input_path}"
output = "{folder / "out.parquet"}"
id_column = "review_id"
chunk_rows = {chunk_rows}

[model]
max_tokens = 16

[prompt]
user = "Product: {{product}}\\nStars: {{stars}}\\nReview: {{text}}"

[limits]
rpm = 1000000
concurrency = 64

[endpoint]
preset = "local"
"""
    )
    return job


def count_opens(input_path: Path, *argv: str) -> tuple[int, dict[str, int]]:
    """(exit code, opens of ``input_path`` by thread name) of ``seedbatch ARGV`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _COUNT, str(input_path), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    line = next((ln for ln in done.stderr.splitlines() if ln.startswith("OPENS ")), None)
    assert line is not None, done.stderr[-2000:]
    data = json.loads(line.removeprefix("OPENS "))
    return int(data["code"] or 0), dict(data["counts"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".csv.gz"])
def test_a_run_opens_its_input_at_most_three_times_and_an_up_to_date_rerun_once(tmp_path: Path, suffix: str) -> None:
    input_path = write_input(tmp_path, suffix)
    job = write_demo_job(tmp_path, input_path)
    code, opens = count_opens(input_path, "run", str(job), "--no-progress")
    assert code == 0
    assert sum(opens.values()) <= MAX_RUN_OPENS, opens
    code, opens = count_opens(input_path, "run", str(job), "--no-progress")
    assert code == 0
    assert sum(opens.values()) <= MAX_RERUN_OPENS, opens


if __name__ == "__main__":  # the figures for a commit: opens per format, a run then an up-to-date rerun
    import tempfile

    for suffix in (".csv", ".jsonl", ".parquet", ".csv.gz"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            input_path = write_input(folder, suffix)
            job = write_demo_job(folder, input_path)
            first = count_opens(input_path, "run", str(job), "--no-progress")
            again = count_opens(input_path, "run", str(job), "--no-progress")
            print(f"{suffix:9} run: exit {first[0]} opens {first[1]}   rerun: exit {again[0]} opens {again[1]}")
