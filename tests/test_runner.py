"""The library API: ``run_job`` / ``arun_job`` with a transport injected through ``RunOptions``.

No server: an ``httpx.MockTransport`` answers, so these tests show the composition (prepare, lock,
ledger, executor, output, manifest, exit codes, stopping) without the network.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

import pipeline
from pipeline import ExitCode, RunOptions, Selection, StopReason, StopToken, arun_job, run_job
from pipeline.errors import SpecError
from tests.helpers import make_spec, reviews


def answering(content: str = "positive", *, status: int = 200, delay_s: float = 0.0) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if delay_s:
            await asyncio.sleep(delay_s)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "no"}})
        message = {"role": "assistant", "content": content}
        return httpx.Response(
            200,
            json={
                "id": "x",
                "model": "mock",
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
            },
        )

    return httpx.MockTransport(handler)


def spec_for(tmp_path: Path, n: int = 12, **sections: dict[str, Any]) -> Any:
    return make_spec(
        tmp_path, None, reviews(n), endpoint={"preset": "vllm", "base_url": "http://127.0.0.1:9/v1"}, **sections
    )


def test_public_api_is_exported_and_typed() -> None:
    for name in ("run_job", "arun_job", "load_spec", "JobSpec", "RunOptions", "Selection", "RunSummary", "ExitCode"):
        assert hasattr(pipeline, name), name
    assert pipeline.run_job is run_job


def test_run_job_with_an_injected_transport(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    summary = run_job(spec, RunOptions(transport=answering(), selection=Selection(limit=5)))
    assert summary.exit_code == ExitCode.OK
    assert summary.requests_sent == 5 and summary.rows_by_status == {"ok": 5}
    out = pl.read_parquet(spec.job.output)
    assert out.height == 5 and set(out["content"]) == {"positive"}
    manifest = json.loads(spec.manifest_path.read_text())
    assert manifest["exit_code"] == 0 and manifest["endpoint"] == "http://127.0.0.1:9/v1"


def test_arun_job_runs_inside_a_running_event_loop(tmp_path: Path) -> None:
    """A notebook has a loop running: ``await arun_job(spec)`` works there; ``run_job`` says what to use."""
    spec = spec_for(tmp_path)

    async def notebook() -> Any:
        with pytest.raises(SpecError, match="await arun_job"):
            run_job(spec)
        return await arun_job(spec, RunOptions(transport=answering()))

    summary = asyncio.run(notebook())
    assert summary.rows_by_status == {"ok": 12}


def test_fatal_answer_stops_the_run_and_maps_to_exit_4(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    summary = run_job(spec, RunOptions(transport=answering(status=401)))
    assert summary.stopped_by is StopReason.FATAL
    assert summary.exit_code == ExitCode.FATAL_API
    assert pl.read_parquet(spec.job.output).get_column("status").unique().to_list() == ["pending"]


def test_stop_token_from_another_thread_stops_cleanly(tmp_path: Path) -> None:
    """What the CLI's SIGTERM handler does: request a stop; in-flight answers are kept, the rest pending."""
    spec = spec_for(tmp_path, n=400, limits={"rpm": 600})  # 10 requests/s: the run is still going at 0.5 s
    stop = StopToken()
    threading.Timer(0.5, stop.request, args=("signal SIGTERM",)).start()
    summary = run_job(spec, RunOptions(transport=answering(delay_s=0.05), stop=stop, grace_s=5.0))
    assert summary.stopped_by is StopReason.SIGNAL and summary.stop_reason == "signal SIGTERM"
    assert summary.exit_code == ExitCode.PARTIAL
    counts = summary.rows_by_status
    assert counts.get("ok", 0) >= 1 and counts.get("pending", 0) >= 300, counts
    assert counts["ok"] == summary.requests_sent, "every request sent was answered and kept"


def test_a_hard_stop_abandons_what_is_in_flight(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, n=50)
    stop = StopToken()
    threading.Timer(0.3, stop.request, kwargs={"hard": True}).start()
    summary = run_job(spec, RunOptions(transport=answering(delay_s=30.0), stop=stop, grace_s=60.0))
    assert summary.exit_code == ExitCode.PARTIAL
    assert summary.rows_by_status == {"pending": 50}


def test_summary_as_dict_is_plain_json(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, n=3)
    summary = run_job(spec, RunOptions(transport=answering()))
    data = json.loads(json.dumps(summary.as_dict()))
    assert data["rows_by_status"] == {"ok": 3} and data["stopped_by"] is None
