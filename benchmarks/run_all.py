"""Run the seedbatch benchmarks against the built-in local API and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py                      # all of them, full sizes -> benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick              # small sizes -> benchmarks/out/RESULTS.quick.md
    python benchmarks/run_all.py --only overhead      # one (repeatable, or comma-separated)

Plain scripts, no pytest. Every figure is measured in this run; a missed target says so in the table.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import bench_crash
import bench_failures
import bench_inflight
import bench_memory
import bench_overhead
import bench_pacing
import bench_pool
import bench_quality
import bench_ray
import bench_ray_nodes
import bench_resume
import bench_scale
import bench_throughput
from common import BENCH, OUT, ROOT, BenchResult, machine

#: Run order: resume reuses the ledger the memory benchmark fills.
BENCHMARKS: list[ModuleType] = [
    bench_throughput,
    bench_inflight,
    bench_pool,
    bench_overhead,
    bench_memory,
    bench_resume,
    bench_crash,
    bench_ray,
    bench_pacing,
    bench_failures,
    bench_ray_nodes,
    bench_scale,
    bench_quality,
]
NAMES = [m.NAME for m in BENCHMARKS]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[BenchResult], quick: bool, argv: list[str], elapsed_s: float) -> str:
    info = machine()
    lines = [
        "# seedbatch benchmarks",
        "",
        "Written by `python benchmarks/run_all.py` (`make bench`). Every figure below was measured in the run "
        "that wrote this file; nothing is copied from elsewhere. A missed target is marked ✗.",
        "",
    ]
    if quick:
        lines += ["**QUICK RUN (`--quick`): reduced sizes; not the figures the targets are defined for.**", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in info.items()]
    lines += [
        f"| command | `{' '.join(['python benchmarks/run_all.py', *argv])}` |",
        f"| total time | {elapsed_s / 60:.1f} min |",
        "",
        "## Summary",
        "",
        "| # | Benchmark | Figure | Value | Target | Met | Reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        if r.error:
            lines.append(
                f"| {i} | {r.title} | (failed) | {_cell(r.error.splitlines()[-1])} | | ✗ | "
                f"`python benchmarks/run_all.py --only {r.name}` |"
            )
        for f in r.figures:
            met = "" if f.met is None else ("✓" if f.met else "✗ missed")
            lines.append(
                f"| {i} | {r.title} | {_cell(f.label)} | {_cell(f.value)} | {_cell(f.target)} | {met} | "
                f"`{f.command}{' --quick' if quick else ''}` |"
            )
    lines.append("")
    for i, r in enumerate(results, 1):
        lines += [
            f"## {i}. {r.title}",
            "",
            f"Reproduce: `python benchmarks/run_all.py --only {r.name}{' --quick' if quick else ''}`",
            "",
        ]
        if r.settings:
            lines += ["Settings:", ""]
            lines += [f"- {k}: {v}" for k, v in r.settings.items()]
            lines.append("")
        if r.commands:
            lines += ["Processes (the port is picked by the server at start):", "", "```"]
            lines += r.commands
            lines += ["```", ""]
        if r.figures:
            lines += ["| Figure | Value | Target | Met |", "|---|---|---|---|"]
            for f in r.figures:
                met = "" if f.met is None else ("✓" if f.met else "✗ missed")
                lines.append(f"| {_cell(f.label)} | {_cell(f.value)} | {_cell(f.target)} | {met} |")
            lines.append("")
        for note in r.notes:
            lines.append(f"- {note}")
        if r.error:
            lines += ["Failed:", "", "```", r.error.strip(), "```"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help=f"benchmark(s) to run: {', '.join(NAMES)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, for iterating")
    ap.add_argument("--output", type=Path, default=None, help="where to write the Markdown")
    args = ap.parse_args(args_in)
    wanted = [n.strip() for part in args.only for n in part.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(NAMES))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    chosen = [m for m in BENCHMARKS if not wanted or m.NAME in wanted]
    if args.output is not None:
        output = args.output
    elif args.quick or wanted:
        output = OUT / ("RESULTS.quick.md" if args.quick else "RESULTS.partial.md")
    else:
        output = BENCH / "RESULTS.md"
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: list[BenchResult] = []
    failed = 0
    for module in chosen:
        print(f"== {module.NAME}: {module.TITLE}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.monotonic()
        try:
            result: BenchResult = module.run(args.quick)
        except Exception:
            failed += 1
            result = BenchResult(module.NAME, module.TITLE, error=traceback.format_exc())
            print(result.error, file=sys.stderr, flush=True)
        results.append(result)
        for f in result.figures:
            met = "" if f.met is None else ("  [ok]" if f.met else "  [MISSED]")
            print(f"   {f.label}: {f.value}{f'  (target {f.target})' if f.target else ''}{met}", flush=True)
        print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    output.write_text(render(results, args.quick, args_in, time.monotonic() - started))
    print(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
