"""Writes the sample inputs the example jobs use. Deterministic: rerunning gives identical files.

python data/make_samples.py            # data/reviews.csv, data/invoices.jsonl
python data/make_samples.py --big N    # data/big_reviews.parquet with N rows (benchmarks)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

PRODUCTS = [
    "blender",
    "kettle",
    "desk lamp",
    "office chair",
    "headphones",
    "backpack",
    "air fryer",
    "phone case",
    "yoga mat",
    "coffee grinder",
    "electric toothbrush",
    "standing desk",
]
GOOD = [
    "works perfectly",
    "exceeded my expectations",
    "is sturdy and well made",
    "was easy to set up",
    "is quiet and fast",
    "looks great on my desk",
    "has excellent battery life",
    "was worth every cent",
]
BAD = [
    "stopped working after a week",
    "arrived scratched",
    "is louder than advertised",
    "feels cheap",
    "broke on the second use",
    "has a confusing manual",
    "smells of plastic",
    "was missing a part",
]
MEH = ["does the job", "is okay for the price", "is fine but nothing special", "works as described"]
EXTRAS = [
    "Shipping took {d} days.",
    "Customer support answered within {d} hours.",
    "I bought it for my {who}.",
    "The packaging was {pk}.",
    "Returned it and got a refund in {d} days.",
    "Would buy again.",
    "Not sure I would recommend it.",
    "The color is slightly different from the photos.",
]
WHO = ["mother", "office", "flat", "son", "partner", "studio"]
PACKAGING = ["excessive", "recyclable", "damaged", "neat"]


def review(rng: random.Random, i: int) -> dict[str, object]:
    product = rng.choice(PRODUCTS)
    mood = rng.choices(["pos", "neg", "meh"], weights=[5, 3, 2])[0]
    phrase = rng.choice({"pos": GOOD, "neg": BAD, "meh": MEH}[mood])
    stars = {"pos": rng.choice([4, 5]), "neg": rng.choice([1, 2]), "meh": 3}[mood]
    extras = " ".join(
        e.format(d=rng.randint(1, 14), who=rng.choice(WHO), pk=rng.choice(PACKAGING))
        for e in rng.sample(EXTRAS, rng.randint(1, 3))
    )
    text = f"The {product} {phrase}. {extras}"
    if rng.random() < 0.1:
        text += " " + rng.choice(GOOD + BAD).capitalize() + " too, honestly."
    return {
        "review_id": f"r-{i:04d}",
        "product": product,
        "stars": stars,
        "text": text if rng.random() > 0.02 else None,
    }


VENDORS = ["Acme Supplies Ltd", "Nordic Paper AB", "Bluefin Logistics", "Kestrel Office GmbH", "Maple & Co"]
ITEMS = [
    ("A4 paper, box of 5 reams", 24.5),
    ("Toner cartridge BK-201", 79.0),
    ("Desk organiser", 12.9),
    ("Courier delivery", 15.0),
    ("Ergonomic mouse", 39.99),
    ("Whiteboard markers (12)", 8.75),
    ("Monitor arm", 89.0),
    ("Consulting hour", 120.0),
]


def invoice(rng: random.Random, i: int) -> dict[str, object]:
    currency = rng.choice(["EUR", "USD", "GBP"])
    lines = []
    total = 0.0
    for desc, price in rng.sample(ITEMS, rng.randint(1, 4)):
        qty = rng.randint(1, 6)
        total += qty * price
        lines.append(f"  {qty} x {desc} @ {price:.2f} {currency}")
    date = f"2026-{rng.randint(1, 10):02d}-{rng.randint(1, 28):02d}"
    text = "\n".join(
        [
            f"INVOICE No. INV-{1000 + i}",
            f"From: {rng.choice(VENDORS)}",
            f"Date: {date}",
            "Items:",
            *lines,
            f"Total due: {total:.2f} {currency}",
            f"Payment within {rng.choice([14, 30, 45])} days.",
        ]
    )
    return {"invoice_id": f"INV-{1000 + i}", "text": text}


def write_samples() -> None:
    rng = random.Random(20261122)
    with (HERE / "reviews.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["review_id", "product", "stars", "text"])
        w.writeheader()
        for i in range(300):
            w.writerow(review(rng, i))
    with (HERE / "invoices.jsonl").open("w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps(invoice(rng, i)) + "\n")


def write_big(n: int, path: Path) -> None:
    import polars as pl

    rng = random.Random(7)
    chunk = 100_000
    frames = []
    for start in range(0, n, chunk):
        rows = [review(rng, i) for i in range(start, min(n, start + chunk))]
        frames.append(
            pl.DataFrame(
                rows, schema={"review_id": pl.String, "product": pl.String, "stars": pl.Int64, "text": pl.String}
            )
        )
    pl.concat(frames).write_parquet(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "big_reviews.parquet")
    args = ap.parse_args()
    if args.big:
        write_big(args.big, args.out)
    else:
        write_samples()
