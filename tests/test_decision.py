"""``decide``: one answer per run to "what does this run have to do", with its reasons.

Each case builds an output with a real run against the local API, changes one thing, and asks.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import LocalAPI
from pipeline.records import Selection
from pipeline.state.decision import Full, Patch, UpToDate, decide
from tests.helpers import reviews, write_job


def built(tmp_path: Path, api: LocalAPI) -> Path:
    job = write_job(tmp_path, api, reviews(30))
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 0, result.output
    return job


def test_an_unchanged_job_is_up_to_date_with_the_summary_of_the_run_that_built_it(
    tmp_path: Path, api: LocalAPI
) -> None:
    spec = load_spec(built(tmp_path, api))
    decision = decide(spec, Selection())
    assert isinstance(decision, UpToDate)
    assert decision.reasons == ("input, job and ledger unchanged since the output was written",)
    assert (decision.summary.rows_total, decision.summary.output_action) == (30, "up_to_date")


def test_one_changed_input_row_is_a_patch_of_that_row(tmp_path: Path, api: LocalAPI) -> None:
    job = built(tmp_path, api)
    frame = reviews(30)
    frame[4, "text"] = "Changed: the kettle leaks."
    frame.write_csv(tmp_path / "input.csv")
    decision = decide(load_spec(job), Selection())
    assert isinstance(decision, Patch)
    assert decision.rows == frozenset({4})
    assert decision.reasons[-1] == "1 row(s) to redo"


def test_fresh_is_a_full_build_saying_why(tmp_path: Path, api: LocalAPI) -> None:
    spec = load_spec(built(tmp_path, api))
    decision = decide(spec, Selection(), fresh=True)
    assert isinstance(decision, Full)
    assert decision.reasons == ("--fresh",)
    assert decision.prepared.rows == 30


def test_a_changed_job_is_a_full_build_saying_what_changed(tmp_path: Path, api: LocalAPI) -> None:
    job = built(tmp_path, api)
    job.write_text(job.read_text().replace("max_tokens = 64", "max_tokens = 65"))
    decision = decide(load_spec(job), Selection())
    assert isinstance(decision, Full)
    assert decision.reasons == ("the job (or the selection) changed",)
