"""Templates reach every column, and every type renders as a person would write it (README 'Jobs')."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.job.spec import JobSpec, spec_from_dict
from pipeline.localapi import LocalAPI
from pipeline.records import ExitCode
from pipeline.requests.prepare import iter_requests, prepare
from tests.helpers import run


def _spec(tmp_path: Path, api: LocalAPI, frame: pl.DataFrame, user: str, system: str | None = None) -> JobSpec:
    path = tmp_path / "in.parquet"
    frame.write_parquet(path)
    prompt = {"user": user, **({"system": system} if system else {})}
    return spec_from_dict(
        {
            "job": {"input": str(path), "output": str(tmp_path / "out" / "r.parquet"), "id_column": "id"},
            "model": {"max_tokens": 16},
            "prompt": prompt,
            "endpoint": {"preset": "local", "base_url": api.base_url},
        },
        tmp_path / "job.toml",
    )


def sent(spec: JobSpec) -> list[list[dict[str, Any]]]:
    """The messages of every request a run of ``spec`` sends (the run's own path: prepare, then render)."""
    return [orjson.loads(r.body)["messages"] for chunk in iter_requests(prepare(spec, need_key=False)) for r in chunk]


def test_columns_with_spaces_and_punctuation_are_placeholders(tmp_path: Path, api: LocalAPI) -> None:
    frame = pl.DataFrame(
        {"id": ["a", "b"], "review text": ["Great", "Bad"], "a-b": ["x", "y"], "x.y": ["1", "2"], "q:1": ["?", "!"]}
    )
    spec = _spec(tmp_path, api, frame, "{review text} / {a-b} / {x.y} / {q:1} {{literal}}", system="About {a-b}")
    messages = sent(spec)
    assert messages[0] == [
        {"role": "system", "content": "About x"},
        {"role": "user", "content": "Great / x / 1 / ? {literal}"},
    ]
    assert run(spec).exit_code == ExitCode.OK
    assert api.stats()["received"] == 2


def test_values_render_by_type(tmp_path: Path, api: LocalAPI) -> None:
    frame = pl.DataFrame(
        {
            "id": ["a"],
            "tags": [["x", "y"]],
            "meta": [{"k": None, "n": 2}],
            "nested": [[{"when": dt.date(2026, 1, 2), "ok": True}]],
            "day": [dt.date(2026, 1, 2)],
            "at": [dt.datetime(2026, 1, 2, 3, 4, 5, 123456)],
            "at_utc": [dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)],
            "clock": [dt.time(3, 4, 5)],
            "price": [Decimal("1.50")],
            "n": [7],
            "f": [0.1],
            "flag": [True],
            "raw": [b"\x00hi"],
        },
        schema_overrides={"price": pl.Decimal(10, 2)},
    )
    names = [c for c in frame.columns if c != "id"]
    spec = _spec(tmp_path, api, frame, "\n".join(f"{c}={{{c}}}" for c in names))
    text = sent(spec)[0][-1]["content"]
    assert text.splitlines() == [
        'tags=["x","y"]',
        'meta={"k":null,"n":2}',
        'nested=[{"when":"2026-01-02","ok":true}]',
        "day=2026-01-02",
        "at=2026-01-02T03:04:05.123456",
        "at_utc=2026-01-02T03:04:05+00:00",
        "clock=03:04:05",
        "price=1.50",
        "n=7",
        "f=0.1",
        "flag=True",
        "raw=AGhp",
    ]
    assert run(spec).exit_code == ExitCode.OK


def test_an_unknown_placeholder_names_the_closest_columns(tmp_path: Path, api: LocalAPI) -> None:
    frame = pl.DataFrame({"id": ["a"], "review text": ["Great"], "product": ["kettle"]})
    spec = _spec(tmp_path, api, frame, "{review_text} {prodcut}")
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\ninput = "in.parquet"\noutput = "out/r.parquet"\n[prompt]\nuser = "{{review_text}} {{prodcut}}"\n'
        f'[endpoint]\npreset = "local"\nbase_url = "{api.base_url}"\n'
    )
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 2
    assert "'review_text' (closest: 'review text')" in result.output
    assert "'prodcut' (closest: 'product')" in result.output
    assert api.stats()["received"] == 0
    with pytest.raises(Exception, match="closest"):
        prepare(spec, need_key=False)
