"""Shared builders for tests: rows shaped like the sample data, job dicts and files, example jobs.

Test modules import these from here, never from ``conftest`` (which holds only fixtures).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.job.spec import JobSpec, spec_from_dict
from pipeline.localapi import LocalAPI
from pipeline.runner import RunOptions, run_job

ROOT = Path(__file__).resolve().parent.parent


def reviews(n: int, *, start: int = 0) -> pl.DataFrame:
    """Rows shaped like data/reviews.csv, each with distinct text so no two requests are identical."""
    products = ["kettle", "desk lamp", "backpack", "headphones"]
    return pl.DataFrame(
        {
            "review_id": [f"r-{i:05d}" for i in range(start, start + n)],
            "product": [products[i % len(products)] for i in range(start, start + n)],
            "stars": [1 + i % 5 for i in range(start, start + n)],
            "text": [
                f"Review number {i}: the {products[i % len(products)]} works as described."
                for i in range(start, start + n)
            ],
        }
    )


def job_dict(input_path: Path, output_path: Path, base_url: str | None, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job": {"input": str(input_path), "output": str(output_path), "id_column": "review_id"},
        "model": {"max_tokens": 64},
        "prompt": {
            "system": "Label the review: positive, negative or neutral.",
            "user": "Product: {product}\nStars: {stars}\nReview: {text}",
        },
        "limits": {"concurrency": 16, "max_attempts": 6, "backoff_max_s": 0.5},
        "endpoint": {"preset": "local"},
    }
    if base_url is not None:
        data["endpoint"]["base_url"] = base_url
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def make_spec(
    tmp_path: Path, api: LocalAPI | None, frame: pl.DataFrame | None = None, *, n: int = 30, **sections: dict[str, Any]
) -> JobSpec:
    """Write ``frame`` (default: ``n`` reviews) as CSV and return a validated job on the local API."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    input_path = tmp_path / "input.csv"
    (frame if frame is not None else reviews(n)).write_csv(input_path)
    data = job_dict(input_path, tmp_path / "out" / "result.parquet", api.base_url if api else None, **sections)
    return spec_from_dict(data, tmp_path / "job.toml")


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for job files: sections of strings, numbers and booleans."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, str):
                lines.append(f"{key} = {value!r}".replace("'", '"') if "\n" not in value else f'{key} = """{value}"""')
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_job(tmp_path: Path, api: LocalAPI | None, frame: pl.DataFrame, **sections: dict[str, Any]) -> Path:
    """``frame`` as input.csv and a job file (TOML) for a CLI or subprocess run against ``api``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    frame.write_csv(tmp_path / "input.csv")
    output = tmp_path / "out" / "result.parquet"
    data = job_dict(tmp_path / "input.csv", output, api.base_url if api else None, **sections)
    job = tmp_path / "job.toml"
    job.write_text(to_toml(data))
    return job


def example_job(name: str, tmp_path: Path, api: LocalAPI, **sections: dict[str, Any]) -> JobSpec:
    """A job file from jobs/, pointed at the local API and at tmp_path for its output."""
    data = tomllib.loads((ROOT / "jobs" / name).read_text())
    data = copy.deepcopy(data)
    for key in ("input",):
        data["job"][key] = os.path.normpath(ROOT / "jobs" / data["job"][key])
    for section, key in (("output", "schema"), ("model", "tools")):
        if isinstance(data.get(section, {}).get(key), str):
            data[section][key] = os.path.normpath(ROOT / "jobs" / data[section][key])
    data["job"]["output"] = str(tmp_path / "out" / Path(data["job"]["output"]).name)
    data["job"].pop("run_output", None)
    data["endpoint"] = {"preset": "local", "base_url": api.base_url}
    data.setdefault("limits", {}).update({"rpm": None, "tpm": None, "max_cost_usd": None})
    data["limits"] = {k: v for k, v in data["limits"].items() if v is not None}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return spec_from_dict(data, ROOT / "jobs" / name)


def quiet(**kwargs: Any) -> RunOptions:
    """Options for an in-process run in a test (library runs install no signal handlers)."""
    return RunOptions(**kwargs)


def run(spec: JobSpec, **kwargs: Any) -> Any:
    return run_job(spec, quiet(**kwargs))


#: Columns that legitimately differ between two runs of the same job.
TIMING = ["latency_ms", "response_id"]


def start(job: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(job: Path, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run the job to its end in a subprocess (a real ``seedbatch run``)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


class Poller:
    """Samples the local API's ``received`` counter every 50 ms: the admissions a limit is measured on."""

    def __init__(self, api: LocalAPI) -> None:
        self.api = api
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), int(self.api.stats()["received"])))
            self._stop.wait(0.05)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # One last sample: the final requests may arrive after the last 50 ms tick (flaky under load).
        self.samples.append((time.monotonic(), int(self.api.stats()["received"])))

    def rpm(self, total: int) -> tuple[float, float]:
        """(requests/min admitted between the first admission and the ``total``-th, window seconds)."""
        first = next((t, n) for t, n in self.samples if n > 0)
        last = next((t, n) for t, n in self.samples if n >= total)
        return (last[1] - first[1]) / (last[0] - first[0]) * 60.0, last[0] - first[0]
