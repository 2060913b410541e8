"""`seedbatch run` then `seedbatch eval` end to end against the local API told how often to be wrong."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.localapi import LocalAPI, ServerConfig
from tests.helpers import ROOT, example_job, run, to_toml

LABELS = ("positive", "negative", "neutral")
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": list(LABELS)},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["sentiment", "stars"],
    "additionalProperties": False,
}
#: Rows whose review asks the local API to refuse: their answers are not usable.
REFUSED = 7


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args])


def labeled(n: int) -> pl.DataFrame:
    rng = random.Random(27)
    return pl.DataFrame(
        {
            "review_id": [f"r-{i:04d}" for i in range(n)],
            "text": [f"Review {i}: {rng.random():.6f}" + (" [[refuse]]" if i < REFUSED else "") for i in range(n)],
            "label": [LABELS[rng.randrange(3)] for _ in range(n)],
            "stars_true": [rng.randint(1, 5) for _ in range(n)],
        }
    )


def write_job(tmp_path: Path, api: LocalAPI, frame: pl.DataFrame, **sections: dict[str, Any]) -> Path:
    frame.write_csv(tmp_path / "input.csv")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    data: dict[str, dict[str, Any]] = {
        "job": {"input": "input.csv", "output": "out/result.parquet", "id_column": "review_id"},
        "model": {"max_tokens": 64},
        "prompt": {"user": "Review: {text}\n[[truth:sentiment={label}]] [[truth:stars={stars_true}]]"},
        "output": {"format": "json_schema", "schema": "schema.json", "invalid_retries": 0},
        "limits": {"concurrency": 16, "backoff_max_s": 0.5},
        "endpoint": {"preset": "local", "base_url": api.base_url},
        "evaluation": {},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
        data[name] = {k: v for k, v in data[name].items() if v is not None}  # None: leave the key out
    evaluation = data.pop("evaluation")
    job = tmp_path / "job.toml"
    text = to_toml(data)
    if evaluation:
        text += "[evaluation]\n" + "".join(f"{k} = {v}\n" for k, v in evaluation.items())
    job.write_text(text)
    return job


@pytest.fixture
def erring() -> Iterator[LocalAPI]:
    server = LocalAPI(ServerConfig(field_error_rates={"sentiment": 0.2, "stars": 0.5}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def within_binomial(accuracy: float, n: int, p: float) -> bool:
    """``accuracy`` is within 4 standard deviations of Binomial(n, p) / n (a 1-in-15,000 miss per check)."""
    return abs(accuracy - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_eval_measures_the_error_rate_the_server_was_given(tmp_path: Path, erring: LocalAPI) -> None:
    n = 600
    job = write_job(
        tmp_path, erring, labeled(n), evaluation={"fields": '{ sentiment = "label", stars = "stars_true" }'}
    )
    ran = cli("run", str(job), "--no-progress")
    assert ran.exit_code == 1, ran.output  # the refused rows
    assert "accuracy" in ran.output and "sentiment" in ran.output  # the run ends with the evaluation

    done = cli("eval", str(tmp_path / "out" / "result.parquet"), "--job", str(job), "--json")
    assert done.exit_code == 0, done.output
    doc = json.loads(done.output)
    sentiment, stars = doc["fields"]["sentiment"], doc["fields"]["stars"]
    # Refused rows are wrong, not dropped: n counts them and so does the "(no answer)" column.
    assert sentiment["n"] == stars["n"] == n
    assert sentiment["n_without_answer"] == stars["n_without_answer"] == REFUSED
    answered = n - REFUSED
    assert within_binomial(sentiment["correct"] / answered, answered, 0.8), sentiment["correct"]
    assert within_binomial(stars["correct"] / answered, answered, 0.5), stars["correct"]
    assert sentiment["accuracy"] == pytest.approx(sentiment["correct"] / n)
    confusion = sentiment["confusion"]
    assert confusion["columns"][-1] == "(no answer)"
    assert sum(row[-1] for row in confusion["matrix"]) == REFUSED
    assert sum(map(sum, confusion["matrix"])) == n
    assert set(sentiment["classes"]) == set(LABELS)
    # A wrong integer is one off the right one: the mean absolute error of the answered rows is the error share.
    assert stars["mean_absolute_error"] == pytest.approx(1 - stars["correct"] / answered)
    usd = pl.read_parquet(tmp_path / "out" / "result.parquet").get_column("usd_spent").sum()
    assert doc["cost_usd"] == pytest.approx(usd)
    assert sentiment["cost_per_correct_usd"] == pytest.approx(usd / sentiment["correct"])


def test_a_different_seed_errs_on_different_rows(tmp_path: Path) -> None:
    server = LocalAPI(ServerConfig(field_error_rates={"sentiment": 0.5}))
    server.start()
    try:
        wrong: list[set[str]] = []
        for seed in (1, 2):
            folder = tmp_path / f"seed{seed}"
            folder.mkdir()
            job = write_job(folder, server, labeled(200)[REFUSED:], model={"seed": seed})
            assert cli("run", str(job), "--no-progress").exit_code == 0
            out = pl.read_parquet(folder / "out" / "result.parquet")
            wrong.append(set(out.filter(pl.col("sentiment").cast(pl.String) != pl.col("label"))["review_id"]))
    finally:
        server.stop()
    assert all(60 < len(w) < 133 for w in wrong), [len(w) for w in wrong]
    assert wrong[0] != wrong[1]


def test_the_job_is_found_from_the_manifest_and_the_report_is_self_contained(
    tmp_path: Path, erring: LocalAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(tmp_path, erring, labeled(60), evaluation={"fields": '{ sentiment = "label" }'})
    monkeypatch.chdir(tmp_path)
    cli("run", "job.toml", "--no-progress")
    done = cli("eval", "out/result.parquet", "--report", "report.html")
    assert done.exit_code == 0, done.output
    assert "sentiment: confusion" in done.output and "wrote report.html" in done.output
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2  # the heat map and the per-class bars
    assert "(no answer)" in page
    # Nothing is fetched: no scripts, stylesheets or frames, and every reference is to the page itself
    # (#id) or inline (data:). The SVG namespace declarations (xmlns) are names, not addresses loaded.
    assert not re.search(r"<(?:script|link|img|iframe)\b", page)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", page)
    assert not re.search(r"url\((?!#)", page)
    assert job.exists()


def test_eval_without_a_report_never_imports_matplotlib(tmp_path: Path, erring: LocalAPI) -> None:
    job = write_job(tmp_path, erring, labeled(20), evaluation={"fields": '{ sentiment = "label" }'})
    cli("run", str(job), "--no-progress")
    code = (
        "import sys; from click.testing import CliRunner; from pipeline.cli import main; "
        f"r = CliRunner().invoke(main, ['eval', {str(tmp_path / 'out' / 'result.parquet')!r}, '--json']); "
        "assert r.exit_code == 0, r.output; print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "False", done.stderr


def test_a_gold_file_is_joined_on_the_id_column(tmp_path: Path, api: LocalAPI) -> None:
    frame = labeled(40)
    frame.select("review_id", "label").sample(fraction=1.0, shuffle=True, seed=3).write_ndjson(tmp_path / "gold.jsonl")
    job = write_job(
        tmp_path,
        api,
        frame.drop("label").with_columns(label=pl.lit("positive")),  # the input's own label is not gold
        prompt={"user": "Review: {text}"},
        evaluation={"gold_file": '"gold.jsonl"', "fields": '{ sentiment = "label" }'},
    )
    cli("run", str(job), "--no-progress")
    doc = json.loads(cli("eval", str(tmp_path / "out" / "result.parquet"), "--job", str(job), "--json").output)
    out = pl.read_parquet(tmp_path / "out" / "result.parquet").join(frame.select("review_id", "label"), on="review_id")
    right = out.filter((pl.col("status") == "ok") & (pl.col("sentiment").cast(pl.String) == pl.col("label_right")))
    assert doc["fields"]["sentiment"]["correct"] == right.height


def test_a_text_job_scores_its_answer_against_the_gold_column(tmp_path: Path) -> None:
    server = LocalAPI(ServerConfig(field_error_rates={"text": 0.25}))
    server.start()
    try:
        job = write_job(
            tmp_path,
            server,
            labeled(400)[REFUSED:],
            prompt={"user": "Review: {text}\n[[truth:text={label}]]"},
            output={"format": "text", "schema": None, "invalid_retries": None},
            evaluation={"gold_column": '"label"'},
        )
        ran = cli("run", str(job), "--no-progress")
        assert ran.exit_code == 0, ran.output
        doc = json.loads(cli("eval", str(tmp_path / "out" / "result.parquet"), "--json").output)
    finally:
        server.stop()
    content = doc["fields"]["content"]
    assert within_binomial(content["accuracy"], content["n"], 0.75), content["accuracy"]
    assert content["exact_match"] == content["accuracy"]
    assert set(content["classes"]) == set(LABELS)


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"fields": '{ sentiment = "verdict" }'}, "gold column 'verdict' is not in the input"),
        ({"fields": '{ mood = "label" }'}, "evaluation.fields.mood: not a top-level property of output.schema"),
        ({"gold_file": '"missing.csv"', "fields": '{ sentiment = "label" }'}, "missing.csv: no such file"),
        ({"gold_column": '"label"'}, "a schema job scores fields"),
        ({}, None),
    ],
)
def test_bad_evaluation_settings_stop_the_run_before_it_sends(
    tmp_path: Path, api: LocalAPI, evaluation: dict[str, str], message: str | None
) -> None:
    job = write_job(tmp_path, api, labeled(10), evaluation=evaluation or {"max_classes": "5"})
    ran = cli("run", str(job), "--no-progress")
    if message is None:  # [evaluation] naming no right answers is a job-file error
        assert ran.exit_code == 2 and "name the right answers" in ran.output, ran.output
    else:
        assert ran.exit_code == 2, ran.output
        assert message in ran.output
    assert len(ran.output.strip().splitlines()) == 1, ran.output
    assert api.stats()["received"] == 0


def test_eval_of_an_output_without_a_manifest_says_to_name_the_job(tmp_path: Path) -> None:
    pl.DataFrame({"content": ["positive"]}).write_parquet(tmp_path / "x.parquet")
    done = cli("eval", str(tmp_path / "x.parquet"))
    assert done.exit_code == 2
    assert "name the job with --job" in done.output


def test_the_example_job_runs_and_evaluates(tmp_path: Path, erring: LocalAPI) -> None:
    """jobs/sentiment_eval.toml over data/reviews_labeled.csv: what the README's two commands show."""
    spec = example_job("sentiment_eval.toml", tmp_path, erring)
    summary = run(spec)
    assert summary.rows_by_status == {"ok": 300}
    output = tmp_path / "out" / "sentiment_eval.parquet"
    report = tmp_path / "report.html"
    done = cli("eval", str(output), "--job", str(ROOT / "jobs" / "sentiment_eval.toml"), "--report", str(report))
    assert done.exit_code == 0, done.output
    doc = json.loads(cli("eval", str(output), "--job", str(ROOT / "jobs" / "sentiment_eval.toml"), "--json").output)
    sentiment = doc["fields"]["sentiment"]
    assert sentiment["n"] == 300
    assert {label: c["support"] for label, c in sentiment["classes"].items()} == dict.fromkeys(LABELS, 100)
    assert within_binomial(sentiment["accuracy"], 300, 0.8), sentiment["accuracy"]
    assert report.stat().st_size > 0


def test_each_stage_is_scored_on_its_own_rows(tmp_path: Path, api: LocalAPI) -> None:
    """Votes and escalation write a ``stage`` column: the report gives each stage's accuracy and cost."""
    job = write_job(tmp_path, api, labeled(6), evaluation={"fields": '{ sentiment = "label" }'})
    output = pl.DataFrame(
        {
            "review_id": [f"r-{i}" for i in range(6)],
            "label": ["positive", "negative", "neutral", "positive", "negative", "neutral"],
            "sentiment": ["positive", "negative", "positive", "positive", None, "neutral"],
            "status": ["ok", "ok", "ok", "ok", "invalid_output", "ok"],
            "usd_spent": [0.001, 0.001, 0.001, 0.004, 0.004, 0.004],
            "stage": ["first", "first", "first", "escalated", "escalated", "escalated"],
        }
    )
    output.write_parquet(tmp_path / "staged.parquet")
    done = cli("eval", str(tmp_path / "staged.parquet"), "--job", str(job), "--json")
    assert done.exit_code == 0, done.output
    doc = json.loads(done.output)
    assert doc["fields"]["sentiment"]["correct"] == 4
    assert doc["fields"]["sentiment"]["n_without_answer"] == 1
    first, escalated = doc["stages"]["first"]["fields"]["sentiment"], doc["stages"]["escalated"]["fields"]["sentiment"]
    assert (first["n"], first["correct"], first["cost_usd"]) == (3, 2, pytest.approx(0.003))
    assert (escalated["n"], escalated["correct"], escalated["n_without_answer"]) == (3, 2, 1)
    assert escalated["cost_per_correct_usd"] == pytest.approx(0.012 / 2)
    shown = cli("eval", str(tmp_path / "staged.parquet"), "--job", str(job))
    assert "stage escalated (3 rows)" in shown.output


def test_the_example_job_on_the_built_in_api_measures_the_error_rate_it_sets(tmp_path: Path) -> None:
    """The README's first command as written: preset "local" in this process, ``local_error_rates`` 0.2."""
    text = (ROOT / "jobs" / "sentiment_eval.toml").read_text(encoding="utf-8")
    text = text.replace('"../data/reviews_labeled.csv"', json.dumps(str(ROOT / "data" / "reviews_labeled.csv")))
    text = text.replace('"../out/sentiment_eval.parquet"', json.dumps(str(tmp_path / "out.parquet")))
    job = tmp_path / "sentiment_eval.toml"
    job.write_text(text, encoding="utf-8")
    ran = cli("run", str(job), "--no-progress")
    assert ran.exit_code == 0, ran.output
    doc = json.loads(cli("eval", str(tmp_path / "out.parquet"), "--job", str(job), "--json").output)
    sentiment = doc["fields"]["sentiment"]
    assert sentiment["n"] == 300 and sentiment["n_without_answer"] == 0
    assert within_binomial(sentiment["accuracy"], 300, 0.8), sentiment["accuracy"]
