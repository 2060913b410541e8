"""What the CLI prints, as text or fields: a run's summary line, the up-to-date line, ``plan`` and ``status``.

Built here, in the library, so the CLI stays a shell (parse, call, print) and another front end (a
notebook, a service) prints the same words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.records import RunSummary

if TYPE_CHECKING:
    from pipeline.job.spec import JobSpec
    from pipeline.planning import JobStatus, Plan


def up_to_date_fields(summary: RunSummary) -> dict[str, Any]:
    """The one line of a run that had nothing to do: every row reused, nothing sent, nothing rewritten."""
    return {
        "output_action": summary.output_action,
        "rows": summary.rows_total,
        "from_ledger": summary.rows_from_ledger,
        "requests_sent": summary.requests_sent,
        "output": summary.output_path,
        "built_by_run": summary.run_id,
        "exit_code": summary.exit_code,
    }


def summary_fields(summary: RunSummary) -> dict[str, Any]:
    """The ``summary`` line of a run that did work (the README's field names, in its order)."""
    return {
        "job": summary.job,
        "run_id": summary.run_id,
        "output_action": summary.output_action,
        "rows": summary.rows_total,
        **{f"rows_{k}": v for k, v in sorted(summary.rows_by_status.items())},
        "from_ledger": summary.rows_from_ledger,
        "requests_sent": summary.requests_sent,
        "retries": summary.retries,
        "http_429": summary.http_429,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "usd_spent": round(summary.usd_spent, 6),
        "wall_s": round(summary.wall_s, 2),
        "requests_per_s": round(summary.requests_sent / max(summary.wall_s, 1e-3), 1),
        "exit_code": summary.exit_code,
        "output": summary.output_path,
    }


def plan_lines(spec: JobSpec, job: str, p: Plan) -> list[str]:
    """``seedbatch plan``'s table: rows, basis, tokens, cost, duration, warnings."""
    lines = [
        f"job            {spec.name} ({job})",
        f"rows           {p.rows:,} selected; {p.answered:,} already answered in the ledger; "
        f"{p.duplicates:,} duplicates; {p.to_send:,} to send",
    ]
    if p.too_long or p.skipped:
        empty = f"{p.skipped:,} with every placeholder empty (prompt.send_empty = true sends them)"
        if spec.context_tokens:
            too_long = f"{p.too_long:,} too long for the context ({spec.context_tokens:,} tokens with max_tokens)"
            lines.append(f"not sent       {too_long}; {empty}")
        else:
            lines.append(f"not sent       {empty}")
    lines += [
        f"basis          {p.basis}",
        f"input tokens   ~{p.est_prompt_tokens:,}",
        f"output tokens  ~{p.est_completion_tokens:,} expected; "
        f"at most {p.max_completion_tokens:,} (max_tokens {spec.model.max_tokens} x rows)",
    ]
    if p.est_cost_usd is not None:
        lines.append(f"cost           ~${p.est_cost_usd:.4f} expected; at most ${p.max_cost_usd:.4f}")
    else:
        lines.append(f"cost           unknown: no price for {spec.model.name!r} (add [pricing] to the job)")
    if p.est_minutes is not None:
        lines.append(f"duration       ~{p.est_minutes:.1f} min, bound by {p.binding_limit}")
    else:
        lines.append("duration       unbounded by limits (no rpm/tpm set): paced by the server's rate-limit headers")
    lines += [f"warning        {warning}" for warning in p.warnings]
    return lines


def status_lines(spec: JobSpec, job: str, s: JobStatus) -> list[str]:
    """``seedbatch status``: rows by outcome, tokens, cost, the last run."""
    failed = ", ".join(f"{k}={v}" for k, v in sorted(s.failed_by_status.items()))
    return [
        f"job       {spec.name} ({job})",
        f"rows      {s.rows:,} total: {s.ok:,} ok, {s.failed:,} failed{f' ({failed})' if failed else ''}, "
        f"{s.pending:,} pending",
        f"tokens    {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion",
        f"cost      ${s.usd_spent:.6f}",
        f"last run  {s.last_run or 'never'}",
    ]
