"""Job files: every bad field is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.job.spec import load_spec, spec_from_dict

BASE = {"job": {"input": "in.csv", "output": "out.parquet"}, "prompt": {"user": "{text}"}}


def with_(section: str, **values: object) -> dict[str, object]:
    data = {k: dict(v) for k, v in BASE.items()}
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (with_("job", bogus=1), "job.bogus: unknown key"),
        (with_("model", temperature=3), "model.temperature"),
        (with_("model", top_p=0), "model.top_p"),
        (with_("model", seed=0), "model.seed"),
        (with_("model", max_tokens=0), "model.max_tokens"),
        (with_("model", frequency_penalty=-2.5), "model.frequency_penalty"),
        (with_("model", reasoning_effort="extreme"), "model.reasoning_effort"),
        (with_("limits", rpm=-1), "limits.rpm"),
        (with_("limits", concurrency="many"), "limits.concurrency"),
        (with_("endpoint", preset="nope"), "endpoint.preset"),
        (with_("output", format="json_schema"), "needs output.schema"),
        (with_("output", name="has space"), "output.name"),
        ({"job": {"input": "x.csv"}, "prompt": {"user": "x"}}, "job.output: required key is missing"),
        ({"job": {"input": "x.csv", "output": "y.parquet"}}, "prompt: required key is missing"),
    ],
)
def test_bad_fields_are_one_line_naming_file_and_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, "jobs/x.toml")
    message = str(info.value)
    assert message.startswith("jobs/x.toml: ")
    assert needle in message
    assert "\n" not in message


def test_overrides_are_validated_like_the_file() -> None:
    spec = spec_from_dict(BASE, "j.toml", {"rpm": 120, "model": "m", "input": "other.csv"})
    assert spec.limits.rpm == 120
    assert spec.model.name == "m"
    assert spec.job.input == Path("other.csv")
    with pytest.raises(SpecError, match=r"limits\.concurrency"):
        spec_from_dict(BASE, "j.toml", {"concurrency": 0})


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\ninput=")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


def test_defaults_and_derived_paths(tmp_path: Path) -> None:
    path = tmp_path / "j.toml"
    path.write_text('[job]\ninput = "a.csv"\noutput = "out/a.parquet"\n[prompt]\nuser = "{x}"\n')
    spec = load_spec(path)
    assert spec.name == "j"
    # Relative paths in a job file are beside the job file, wherever the command runs.
    assert spec.job.input == tmp_path / "a.csv"
    assert spec.ledger_path == tmp_path / "out/a.parquet.ledger.sqlite"
    assert spec.manifest_path == tmp_path / "out/a.parquet.manifest.json"
    assert spec.base_url == "https://api.aimlapi.com/v1"
    assert spec.api_key_env == "AIMLAPI_API_KEY"
    assert spec.structured_output == "json_schema"
    assert spec.source_sha256 and len(spec.source_sha256) == 64


def test_presets_set_dialect_and_key_variable() -> None:
    spec = spec_from_dict(with_("endpoint", preset="llamacpp"))
    assert spec.structured_output == "json_object_schema"
    assert spec.base_url == "http://127.0.0.1:8080/v1"
    assert not spec.key_required
    spec = spec_from_dict(with_("endpoint", preset="openai", structured_output="instructions"))
    assert spec.structured_output == "instructions"
    assert spec.api_key_env == "OPENAI_API_KEY"


def test_example_jobs_load() -> None:
    for job in sorted(Path("jobs").glob("*.toml")):
        spec = load_spec(job)
        # Each row's messages come from a template, a column of message lists, or a Batch line's body.
        assert spec.prompt.user or spec.prompt.messages_column or spec.job.input_format == "openai_batch"


def test_object_uris_are_not_anchored_and_keep_one_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``s3://`` names the same object from any folder; its local copy, ledger and manifest live in one data
    folder, the same whichever folder the job runs from."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    data = {
        "job": {"input": "s3://b/in/x.csv", "output": "s3://b/out/y.jsonl", "run_output": "gs://c/runs/{date}.csv"},
        "prompt": {"user": "{text}"},
    }
    spec = spec_from_dict(data, tmp_path / "jobs" / "x.toml", base_dir=tmp_path / "jobs")
    home = tmp_path / "data" / "seedbatch"
    assert spec.job.input == home / "s3" / "b" / "in" / "x.csv"
    assert spec.job.output == home / "s3" / "b" / "out" / "y.jsonl"
    assert spec.job.run_output == str(home / "gs" / "c" / "runs" / "{date}.csv")
    assert spec.objects == data["job"]
    assert spec.output_location == "s3://b/out/y.jsonl"
    assert spec.ledger_path == home / "s3" / "b" / "out" / "y.jsonl.ledger.sqlite"
    assert spec.manifest_path.parent == spec.ledger_path.parent
    # A flag's URI too; a relative flag path stays relative to the current folder.
    flagged = spec_from_dict(data, "x.toml", {"input": "rel/in.csv", "output": "s3://other/o.parquet"})
    assert flagged.job.input == Path("rel/in.csv")
    assert flagged.objects == {"output": "s3://other/o.parquet", "run_output": "gs://c/runs/{date}.csv"}
    # `..` in a key cannot climb out of the data folder.
    climbing = spec_from_dict({**data, "job": {"input": "s3://b/../../../etc/x.csv", "output": "o.csv"}}, "x.toml")
    assert climbing.job.input == home / "s3" / "b" / "etc" / "x.csv"
    with pytest.raises(SpecError, match="not a valid object URI"):
        spec_from_dict({**data, "job": {"input": "s3://b:notaport/x.csv", "output": "o.csv"}}, "x.toml")
