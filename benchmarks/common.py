"""Shared plumbing for the benchmarks: the local API as a subprocess, the client as a subprocess, inputs, jobs.

Every figure a benchmark reports is computed from something measured here: the server's ``/_stats``
counters (polled with timestamps), the client's own JSON summary line, and the kernel's rusage of the
client process (``benchmarks/measured.py``: CPU seconds and peak RSS of that one process, not of the harness).

Peak RSS is not the harness's own ``wait4`` of a child it spawned: Linux carries the high-water mark of the
memory a process had before ``exec`` into its ``ru_maxrss``, and ``subprocess`` starts children with vfork,
so every child reported at least the harness's peak (383 MB once the harness had built the 1M-row input,
whatever the child used). The small launcher's ``wait4`` of the client is the client's own figure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
OUT = BENCH / "out"
#: The seedbatch CLI of the interpreter running the benchmarks (same venv, no PATH lookup).
SEEDBATCH = [sys.executable, "-m", "pipeline"]
MODEL = "bytedance/dola-seed-2-0-lite"


def byte_compile() -> None:
    """Compile the package's modules to ``__pycache__``, as installing a package does.

    An editable checkout writes them on first import, unless ``PYTHONDONTWRITEBYTECODE`` is set (it is
    on the 2-core benchmark machine): then every ``seedbatch`` process compiled the whole package again,
    ~60 ms of each start-up that no installed copy pays. Stale files are recompiled; fresh ones are kept.
    """
    import compileall

    compileall.compile_dir(ROOT / "pipeline", quiet=1)


byte_compile()


def free_port() -> int:
    """A loopback port free now: a benchmark that resumes another's ledger must reach the same endpoint,
    since answers are keyed by the endpoint's URL (port included)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rel(path: Path) -> str:
    """A path as the reader would type it from the project root."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def shell(cmd: Sequence[str]) -> str:
    """A command line for RESULTS.md: the interpreter shown as ``python``, paths relative to the root."""
    shown = ["python" if c == sys.executable else c for c in cmd]
    return shlex.join(shown).replace(str(ROOT) + "/", "")


def has_taskset() -> bool:
    return Path("/usr/bin/taskset").exists() and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None and has_taskset() else cmd


# ------------------------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One line of the results table."""

    label: str
    value: str
    target: str = ""
    met: bool | None = None  # None: informational, no target
    command: str = ""


@dataclass
class BenchResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the exact server/client command lines used
    error: str | None = None

    def add(self, label: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(label, value, target, met, f"python benchmarks/run_all.py --only {self.name}"))


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at start": load,
    }


# ------------------------------------------------------------------------------------------- server


@dataclass
class Sample:
    t: float
    received: int
    answered_ok: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int


class Server:
    """``seedbatch serve`` in its own process (optionally pinned to one core); counters via ``/_stats``."""

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        rpm: float | None = None,
        tpm: float | None = None,
        cpu: int | None = None,
        extra: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        cmd = [*SEEDBATCH, "serve", "--port", str(port), "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms)]
        if rpm is not None:
            cmd += ["--rpm", str(rpm)]
        if tpm is not None:
            cmd += ["--tpm", str(tpm)]
        cmd += list(extra)  # e.g. fault options: --fail-5xx 0.05 --drop 0.02 --hang 0.005 --hang-s 120
        self.cmd = pinned(cmd, cpu)
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"seedbatch serve exited early ({self.proc.wait()}): {shell(self.cmd)}")
            if "local API on " in line:
                self.base_url = line.rsplit("local API on ", 1)[1].strip()
                break
        else:
            raise RuntimeError("seedbatch serve did not start within 30 s")
        # Keep draining stderr so a chatty server can never block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def command(self) -> str:
        return shell(self.cmd)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root_url + "/_stats", timeout=120) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data

    def reset(self) -> None:
        req = urllib.request.Request(self.root_url + "/_reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    @contextlib.contextmanager
    def poll(self, interval_s: float = 0.1) -> Iterator[list[Sample]]:
        """Sample the counters every ``interval_s`` in a thread while the block runs."""
        samples: list[Sample] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    s = self.stats()
                except OSError:
                    stop.wait(interval_s)
                    continue
                samples.append(
                    Sample(
                        time.monotonic(),
                        s["received"],
                        s["answered_ok"],
                        s["rate_limited"],
                        s["prompt_tokens"],
                        s["completion_tokens"],
                    )
                )
                stop.wait(interval_s)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()


def answer_window(samples: Sequence[Sample], total_ok: int) -> tuple[Sample, Sample] | None:
    """The first sample with an answer and the first with all ``total_ok`` answers: the measured window."""
    first = next((s for s in samples if s.answered_ok > 0), None)
    last = next((s for s in samples if s.answered_ok >= total_ok), None)
    if first is None or last is None or last.t <= first.t:
        return None
    return first, last


#: More 429s than this fraction of the rows is a storm (the pacer failed to hold the limit).
STORM_FRACTION = 0.01


def admitted_rate(samples: Sequence[Sample], n: int) -> tuple[float, float] | None:
    """(requests/min admitted by the server, window seconds) from its first admission to the ``n``-th."""
    first = next((s for s in samples if s.received - s.rate_limited > 0), None)
    last = next((s for s in samples if s.received - s.rate_limited >= n), None)
    if first is None or last is None or last.t <= first.t:
        return None
    done = (last.received - last.rate_limited) - (first.received - first.rate_limited)
    return done / (last.t - first.t) * 60.0, last.t - first.t


# ------------------------------------------------------------------------------------------- client


@dataclass
class ClientRun:
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    summary: dict[str, Any]
    stderr_tail: str
    killed: bool = False

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def command(self) -> str:
        return shell(self.cmd)


def client_cmd(verb: str, job: Path, *extra: str, cpu: int | None = None) -> list[str]:
    cmd = [*SEEDBATCH, verb, str(job), *extra]
    if verb == "run":
        cmd += ["--no-progress", "--log-format", "json", "--progress-interval", "3600"]
    return pinned(cmd, cpu)


def run_client(
    cmd: list[str],
    *,
    timeout_s: float = 7200.0,
    kill_after: float | None = None,
    kill_when: Any = None,
) -> ClientRun:
    """Run one client process to its end (or SIGKILL it); its wall, CPU and peak RSS are its own.

    The client is started by ``benchmarks/measured.py`` (see there why: a child spawned straight from this
    harness inherits the harness's peak RSS), which times it from spawn to exit and takes its ``wait4``
    rusage. ``kill_when``: an optional callable polled every 20 ms; when it returns True the client (and
    its launcher) is SIGKILLed, and the figures are the harness's view of it.
    """
    log = OUT / "client.stderr"
    OUT.mkdir(parents=True, exist_ok=True)
    figures_path = OUT / f"client.{os.getpid()}.measured.json"
    figures_path.unlink(missing_ok=True)
    launcher = [sys.executable, str(ROOT / "benchmarks" / "measured.py"), str(figures_path), *cmd]
    with log.open("w") as err:
        started = time.monotonic()
        proc = subprocess.Popen(launcher, cwd=ROOT, stdout=err, stderr=err, start_new_session=True)
        killed = False
        status = 0
        rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            now = time.monotonic()
            if (kill_after is not None and now - started >= kill_after) or (kill_when is not None and kill_when()):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            if now - started > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(proc.pid, 0)
                raise RuntimeError(f"client timed out after {timeout_s:.0f}s: {shell(cmd)}")
            time.sleep(0.02)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    summary: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("{") and '"event": "summary"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                summary = json.loads(line)
    assert rusage is not None
    figures = {
        "returncode": proc.returncode,
        "wall_s": wall,
        "user_s": rusage.ru_utime,
        "sys_s": rusage.ru_stime,
        "maxrss_mb": rusage.ru_maxrss / 1024.0,  # Linux: kilobytes
    }
    if not killed and figures_path.exists():
        figures = json.loads(figures_path.read_text())
        figures_path.unlink()
    return ClientRun(
        cmd=cmd,
        returncode=int(figures["returncode"]),
        wall_s=float(figures["wall_s"]),
        user_s=float(figures["user_s"]),
        sys_s=float(figures["sys_s"]),
        maxrss_mb=float(figures["maxrss_mb"]),
        summary=summary,
        stderr_tail="\n".join(text.splitlines()[-8:]),
        killed=killed,
    )


def require_ok(run: ClientRun, what: str) -> None:
    if run.returncode not in (0,) and not run.killed:
        raise RuntimeError(f"{what}: client exited {run.returncode}: {run.command}\n{run.stderr_tail}")


# ------------------------------------------------------------------------------------------- inputs, jobs


def _review_module() -> Any:
    sys.path.insert(0, str(ROOT / "data"))
    try:
        import make_samples
    finally:
        sys.path.pop(0)
    return make_samples


def make_reviews(path: Path, n: int, *, seed: int = 7, pad_sentences: int = 0) -> Path:
    """``n`` product reviews with the sample generator's realistic lengths; ``pad_sentences`` makes long prompts.

    Written once and reused while the file is newer than this module (inputs are deterministic).
    """
    if path.exists() and path.stat().st_mtime > Path(__file__).stat().st_mtime:
        return path
    import polars as pl

    ms = _review_module()
    rng = random.Random(seed)
    filler = ms.GOOD + ms.BAD + ms.MEH
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    chunk = 100_000
    for start in range(0, n, chunk):
        rows = []
        for i in range(start, min(n, start + chunk)):
            r = ms.review(rng, i)
            r["review_id"] = f"r-{i:07d}"
            if pad_sentences:
                extra = " ".join(f"Also, it {rng.choice(filler)}." for _ in range(pad_sentences))
                r["text"] = f"{r['text'] or ''} {extra}"
            rows.append(r)
        schema = {"review_id": pl.String, "product": pl.String, "stars": pl.Int64, "text": pl.String}
        frames.append(pl.DataFrame(rows, schema=schema))
    tmp = path.with_name(path.name + ".tmp")
    pl.concat(frames).write_parquet(tmp)
    os.replace(tmp, path)
    return path


def write_job(
    name: str,
    input_path: Path,
    *,
    rpm: float | None = None,
    tpm: float | None = None,
    concurrency: int = 64,
    max_tokens: int = 64,
    max_attempts: int = 6,
    id_column: str = "review_id",
) -> Path:
    """A job TOML in benchmarks/out/ (preset vllm: an OpenAI-compatible server, no key, URL from --base-url)."""
    OUT.mkdir(parents=True, exist_ok=True)
    limits = [f"concurrency = {concurrency}", f"max_attempts = {max_attempts}"]
    if rpm is not None:
        limits.append(f"rpm = {rpm}")
    if tpm is not None:
        limits.append(f"tpm = {tpm}")
    return _job_file(name, input_path, max_tokens, limits, "vllm", id_column=id_column)


def write_default_job(
    name: str,
    input_path: Path,
    *,
    rpm: float | None = None,
    preset: str = "vllm",
    max_tokens: int = 64,
    stream: bool = False,
) -> Path:
    """A job TOML like ``write_job`` but with the job's DEFAULT limits: only ``rpm`` when given.

    No concurrency, attempts or timeouts, so a benchmark measures whatever the client picks on its own
    (the pacing benchmark must stay valid while the defaults change). ``preset = "local"`` runs the
    built-in API in-process; "vllm" takes the URL from ``--base-url``.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    limits = [f"rpm = {rpm}"] if rpm is not None else []
    return _job_file(name, input_path, max_tokens, limits, preset, ["stream = true"] if stream else [])


def _job_file(
    name: str,
    input_path: Path,
    max_tokens: int,
    limits: list[str],
    preset: str,
    endpoint: list[str] | None = None,
    id_column: str = "review_id",
) -> Path:
    """The benchmarks' one job shape; absolute paths, since a job file's relative paths are beside it."""
    text = f"""# Written by benchmarks/common.py for the {name!r} benchmark.
[job]
name = "{name}"
input = "{input_path.resolve()}"
output = "{(OUT / name).resolve()}.parquet"
id_column = "{id_column}"

[model]
name = "{MODEL}"
max_tokens = {max_tokens}
temperature = 0.0

[prompt]
system = "You label product reviews. Answer with one word: positive, negative or neutral."
user = "Review {{review_id}} of a {{product}} ({{stars}} stars): {{text}}"

[limits]
{chr(10).join(limits)}

[endpoint]
preset = "{preset}"
{chr(10).join(endpoint or [])}
"""
    path = OUT / f"{name}.toml"
    path.write_text(text)
    return path


def clean_job(name: str) -> None:
    """Remove a job's output, ledger, manifest and lock so the next run starts from nothing."""
    for p in OUT.glob(f"{name}.parquet*"):
        p.unlink()
    for p in OUT.glob(f".{name}.parquet*"):
        p.unlink()


def pct(x: float) -> str:
    return f"{x:.3f}"
