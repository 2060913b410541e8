"""``seedbatch plan`` before and after a first look: the estimate says its basis, then learns from answers.

The input is none of the shipped examples: support messages generated here, from two words to a few
hundred, some of long words (far fewer tokens than characters/4), some of codes and punctuation (more),
in random order. A 20-row first look (``run --limit 20``) against the local API on loopback, ``plan``,
then the rest: the plan's expected cost is compared with what the server billed for the rest.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
from click.testing import CliRunner, Result

from pipeline.answers.costs import Price
from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import LocalAPI
from pipeline.planning import GUESSED, Measured, plan_job
from pipeline.records import Request
from tests.helpers import write_job

SHORT = ["ok", "so", "it", "no", "up", "me", "we", "is", "on", "my", "do", "go"]
LONG = [
    "incomprehensibly",
    "disproportionately",
    "uncharacteristically",
    "counterproductive",
    "misunderstanding",
    "notwithstanding",
    "reimbursement",
    "troubleshooting",
    "responsibilities",
    "inconveniences",
]
PLAIN = ["the", "order", "arrived", "late", "and", "box", "was", "damaged", "please", "help", "refund", "thanks"]


def _message(rng: random.Random) -> str:
    style = rng.choice(("terse", "plain", "long words", "codes"))
    if style == "terse":
        return " ".join(rng.choice(SHORT) for _ in range(rng.randint(2, 8)))
    if style == "plain":
        return " ".join(rng.choice(PLAIN) for _ in range(rng.randint(10, 120))) + "."
    if style == "long words":
        return " ".join(rng.choice(LONG) for _ in range(rng.randint(5, 80)))
    codes = [f"ORD-{rng.randint(0, 99999):05d}/{rng.choice('ABCDEF')}-{rng.randint(1, 9)}!?" for _ in range(30)]
    return " ".join(codes[: rng.randint(1, 30)])


def held_out(n: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    return pl.DataFrame(
        {
            "ticket_id": [f"t-{i:04d}" for i in range(n)],
            "channel": [rng.choice(("email", "chat", "phone transcript")) for _ in range(n)],
            "body": [_message(rng) for _ in range(n)],
        }
    )


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--no-progress"] if args[0] == "run" else list(args))


def summary_fields(result: Result) -> dict[str, str]:
    line = next(line for line in result.output.splitlines() if line.startswith("seedbatch summary:"))
    return dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())


def test_plan_states_its_basis_then_learns_from_a_first_look(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(
        tmp_path,
        api,
        held_out(300, seed=25),
        job={"id_column": "ticket_id"},
        model={"max_tokens": 256},
        prompt={
            "system": "Classify the support message: positive, negative or neutral.",
            "user": "Channel: {channel}\nMessage: {body}",
        },
    )
    spec = load_spec(job)

    before = cli("plan", str(job))
    assert before.exit_code == 0, before.output
    assert f"basis          {GUESSED}" in before.output
    guessed = plan_job(spec)
    assert guessed.measured == 0 and guessed.to_send == 300

    first = cli("run", str(job), "--limit", "20")
    assert first.exit_code == 0, first.output
    api.reset()

    after = cli("plan", str(job))
    assert after.exit_code == 0, after.output
    assert "basis          measured on 20 answered requests of this job" in after.output, after.output
    assert "as billed on those answers" in after.output, "the local API reports usd_spent: its prices are measured"
    learned = plan_job(spec)
    assert (learned.answered, learned.to_send, learned.measured) == (20, 280, 20)
    assert api.stats()["received"] == 0, "plan sends nothing"

    rest = cli("run", str(job))
    assert rest.exit_code == 0, rest.output
    billed = summary_fields(rest)
    assert billed["requests_sent"] == "280"
    usd, prompt, completion = float(billed["usd_spent"]), int(billed["prompt_tokens"]), int(billed["completion_tokens"])
    assert learned.est_cost_usd is not None and guessed.est_cost_usd is not None
    error = learned.est_cost_usd / usd - 1
    print(
        f"\nheld-out 300 rows, plan for the 280 after a 20-row first look: cost ${learned.est_cost_usd:.6f} vs "
        f"billed ${usd:.6f} ({error:+.1%}); input tokens {learned.est_prompt_tokens} vs {prompt} "
        f"({learned.est_prompt_tokens / prompt - 1:+.1%}); output tokens {learned.est_completion_tokens} vs "
        f"{completion} ({learned.est_completion_tokens / completion - 1:+.1%}); before any answer the plan "
        f"expected ${guessed.est_cost_usd:.6f} for all 300"
    )
    assert abs(error) <= 0.20


def _measured(bills: list[tuple[int, int, float]]) -> Measured:
    m = Measured()
    for i, (prompt, completion, usd) in enumerate(bills):
        req = Request(i, str(i), b"", f"h{i}", est_prompt_tokens=prompt, max_tokens=64)
        m.add(req, prompt, completion, usd)
    return m


def test_the_billed_price_is_what_the_answers_cost() -> None:
    table = Price(0.30, 2.60)
    billed = Price(0.25, 2.00)
    varied = _measured([(p, c, billed.usd(p, c)) for p, c in ((40, 12), (300, 9), (120, 30), (75, 11))])
    price, source = varied.billed_price(table)
    assert price is not None and source == "as billed on those answers"
    assert abs(price.input_per_million - 0.25) < 1e-6 and abs(price.output_per_million - 2.0) < 1e-6
    # Costs the ledger filled in from the table (the server said nothing) are the table's prices, and say so.
    filled = _measured([(p, c, table.usd(p, c)) for p, c in ((40, 12), (300, 9), (120, 30))])
    assert filled.billed_price(table) == (table, "the price table, which those answers' cost matches")
    # Every answer in the same input/output mix: two prices cannot be told apart, the table is scaled.
    same_mix = _measured([(100, 10, billed.usd(100, 10)), (200, 20, billed.usd(200, 20))])
    price, source = same_mix.billed_price(table)
    assert price is not None and source == "the price table scaled to the bill"
    assert abs(price.usd(300, 30) - billed.usd(300, 30)) < 1e-12
    assert _measured([(100, 10, 0.0)]).billed_price(table) == (table, "the price table")
