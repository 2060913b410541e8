"""The public API as another project sees it: installed, typed, with enums for statuses and exit codes.

The consumer is type-checked from a directory outside the repository with this venv's ``mypy --strict``,
so what it finds is what ``make install`` installed, not the working tree on ``sys.path``.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import pipeline
from pipeline import ExitCode, RunOptions, RunSummary, Status, run_job
from pipeline.records import RunTally
from tests.helpers import make_spec, reviews

ROOT = Path(__file__).resolve().parents[1]

CONSUMER = """
from pipeline import ExitCode, RunOptions, RunSummary, Selection, Status, load_spec, run_job


def failed_rows(summary: RunSummary) -> int:
    return sum(n for status, n in summary.rows_by_status.items() if status is not Status.OK)


def report(summary: RunSummary, in_flight: int) -> None:
    print(summary.requests_sent, in_flight)


summary = run_job(load_spec("job.toml"), RunOptions(selection=Selection(limit=3), progress=report))
ok: int = summary.rows_by_status.get(Status.OK, 0)
code: ExitCode = summary.exit_code
print(ok, code is ExitCode.PARTIAL, failed_rows(summary), summary.stopped_by)
"""

#: Each line is a mistake mypy must report, at that line of the file.
WRONG = """
from pipeline import ExitCode, RunSummary, Status


def count(summary: RunSummary, status: Status) -> int:
    return summary.rows_by_status.get(status, 0)


def clear(summary: RunSummary) -> None:
    summary.requests_sent = 0


count(RunSummary(job="j", run_id="r"), "ok")
code: str = RunSummary(job="j", run_id="r").exit_code
late: ExitCode = RunSummary(job="j", run_id="r").ended_at
"""


def _mypy(folder: Path, *files: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "mypy"),
            "--strict",
            "--no-incremental",
            "--python-executable",
            sys.executable,
            *files,
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_another_project_type_checks_its_use_of_the_installed_package(tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(ROOT), "the consumer must not sit inside the repository"
    (tmp_path / "consumer.py").write_text(CONSUMER)
    (tmp_path / "wrong.py").write_text(WRONG)
    checked = _mypy(tmp_path, "consumer.py", "wrong.py")
    out = checked.stdout + checked.stderr
    assert "Cannot find implementation or library stub" not in out, out
    assert "consumer.py" not in out, out
    errors = sorted(int(line.split(":")[1]) for line in out.splitlines() if line.startswith("wrong.py:"))
    lines = WRONG.splitlines()
    wanted = [
        i
        for i, text in enumerate(lines, 1)
        if "requests_sent = 0" in text or text.startswith(("count(", "code:", "late:"))
    ]
    assert errors == wanted, out
    assert checked.returncode == 1


def test_the_package_ships_its_type_marker() -> None:
    assert (Path(pipeline.__file__).parent / "py.typed").exists()
    assert 'pipeline = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_statuses_are_one_enum_that_compares_with_their_text() -> None:
    assert [s.value for s in Status] == list(pipeline.records.STATUSES)
    assert Status.OK == "ok" and {"ok": 1}[Status.OK] == 1 and f"{Status.INVALID_OUTPUT}" == "invalid_output"
    assert int(ExitCode.PARTIAL) == 3


def _fields_without_docstring(source: Path, name: str) -> list[str]:
    tree = ast.parse(source.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    body = cls.body
    missing = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = body[i + 1] if i + 1 < len(body) else None
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if not documented:
                missing.append(node.target.id)
    return missing


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("records.py", "RunSummary"),
        ("records.py", "Selection"),
        ("options.py", "RunOptions"),
        *(
            ("job/sections.py", section)
            for section in (
                "JobSection",
                "ModelSection",
                "FewShot",
                "PromptSection",
                "MediaSection",
                "OutputSection",
                "LimitsSection",
                "EndpointSection",
                "PricingSection",
                "ExecutorSection",
            )
        ),
    ],
)
def test_every_public_field_has_a_docstring(module: str, name: str) -> None:
    assert _fields_without_docstring(ROOT / "pipeline" / module, name) == []


def test_the_tally_counts_the_same_fields_the_summary_shows() -> None:
    assert [f.name for f in dataclasses.fields(RunTally)] == [f.name for f in dataclasses.fields(RunSummary)]


def _answering_after(delay_s: float) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        message = {"role": "assistant", "content": "positive"}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        return httpx.Response(200, json={"id": "x", "model": "m", "choices": [choice], "usage": usage})

    return httpx.MockTransport(handler)


def test_progress_gets_frozen_snapshots_and_run_job_returns_one(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, None, reviews(8), endpoint={"preset": "vllm", "base_url": "http://127.0.0.1:9/v1"})
    seen: list[tuple[RunSummary, int]] = []

    def keep(summary: RunSummary, in_flight: int) -> None:
        seen.append((summary, summary.requests_sent))

    # The answers take longer than the executor's progress tick, so the run reports at least once.
    summary = run_job(spec, RunOptions(transport=_answering_after(0.5), progress=keep, progress_interval_s=0.0))
    assert seen, "progress was called"
    assert all(snap.requests_sent == sent for snap, sent in seen), "a snapshot kept does not move on"
    assert all(snap.ended_at == 0 for snap, _ in seen) and summary.ended_at > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.requests_sent = 0  # type: ignore[misc]
    assert summary.exit_code is ExitCode.OK
    assert summary.rows_by_status == {Status.OK: 8} and all(type(k) is Status for k in summary.rows_by_status)
