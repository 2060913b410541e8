"""Writes data/reviews_labeled.csv: product reviews with a sentiment label written as ground truth.

python data/make_reviews_labeled.py     # deterministic: rerunning gives an identical file

Columns: review_id, product, stars, text, label (positive / negative / neutral, 100 rows each).

The label is the sentiment of the text as a careful human reader would give it, decided when the
text is composed (every sentence bank below carries its class), not inferred from the stars. The
texts are meant to be a real task, not a keyword lookup:

- clear positives and negatives in several registers (short, detailed, enthusiastic, matter of fact);
- neutrals of two kinds: factual or undecided ("arrived Tuesday, haven't used it enough yet") and
  mixed reviews whose good and bad points balance ("great sound, but the battery dies by noon");
- hard cases in every class: negation ("not bad at all", "can't fault it" are positive; "not worth
  the money" negative), sarcasm ("Oh great, it broke on day two. Exactly what I paid for.") and
  praise for something else than the product ("fast shipping, shame the kettle leaks").

Stars follow the label as buyers give them (positive 4-5, negative 1-2, neutral mostly 3), with a few
off-by-one stars a real review set has; a job that wants to measure reading should leave them out of
the prompt.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "reviews_labeled.csv"
ROWS_PER_LABEL = 100
SEED = 27

#: Each product with parts a review talks about, singular (templates say "the {a} is"), at least two.
PRODUCTS: dict[str, list[str]] = {
    "coffee grinder": ["grind setting", "burr", "hopper", "motor"],
    "standing desk": ["motor", "frame", "desktop", "control panel"],
    "phone case": ["grip", "button cover", "edge", "camera cutout"],
    "bluetooth speaker": ["sound", "battery", "charging port", "volume knob"],
    "backpack": ["zipper", "shoulder strap", "laptop sleeve", "side pocket"],
    "blender": ["motor", "jar", "blade", "lid"],
    "desk lamp": ["light", "arm", "dimmer", "base"],
    "rice cooker": ["inner pot", "lid", "timer", "steam vent"],
    "electric kettle": ["lid", "switch", "spout", "heating"],
    "office chair": ["seat", "armrest", "backrest", "gas lift"],
    "air fryer": ["basket", "timer", "fan", "display"],
    "yoga mat": ["surface", "thickness", "grip", "carry strap"],
}

# {p}: the product, {a} and {b}: two different parts of it, {n}: a small number.
POSITIVE_CORE = [
    "Really happy with this {p}. The {a} is excellent and the {b} feels solid.",
    "Best {p} I have owned. The {a} works flawlessly.",
    "I love this {p}. It does exactly what I wanted and the {a} is great.",
    "Five months in and the {p} still works like new. Highly recommend.",
    "Excellent {p}. Well built, and the {a} is better than on models twice the price.",
    "The {a} on this {p} is superb. Worth every penny.",
    "Fantastic purchase. The {p} is sturdy, the {a} is smooth and it looks great.",
    "My old {p} died and this one is a huge upgrade. The {a} alone makes it worth it.",
    "Does everything well. The {a} is reliable and the {b} is thoughtfully designed.",
    "Bought a second {p} for my office because the first one is so good.",
    "Great value. The {p} is solid and the {a} is a pleasure to use.",
    "Impressed. Setup took {n} minutes and the {p} has worked perfectly every day since.",
    "A delight to use every morning. The {a} is spot on.",
    "Top quality {p}. My whole family uses it and everyone loves the {a}.",
]
POSITIVE_HARD = [  # negation, understatement, praise after doubt
    "Not bad at all. Honestly, the {a} is much better than I expected for the price.",
    "I can't fault this {p}. Not a single problem in {n} months.",
    "I was worried the {a} would be flimsy, but it isn't. No complaints whatsoever.",
    "Never owned anything this easy to live with. Nothing has gone wrong with the {a}.",
    "I didn't expect much from such a cheap {p}, but I was wrong: it is wonderful.",
    "Can't complain about anything. The {a} has never let me down.",
    "Nothing to dislike here. The {a} and the {b} both work as they should, and then some.",
    "Skeptical at first after reading other reviews, but mine works perfectly. No regrets.",
    "There is no reason to spend more: this {p} does not disappoint.",
    "My wife was not convinced we needed a new {p}. Now she won't let me return it.",
]
NEGATIVE_CORE = [
    "The {a} broke after {n} days. Very disappointed with this {p}.",
    "Terrible {p}. The {a} stopped working and support never replied.",
    "Cheaply made. The {a} feels flimsy and the {b} cracked within a week.",
    "Do not buy this {p}. The {a} failed on the second use.",
    "Returned it. The {a} is poorly designed and the {b} rattles constantly.",
    "Awful quality for the price. The {p} arrived with a broken {a}.",
    "This {p} is a waste of money. The {a} barely works.",
    "I regret buying this {p}. The {a} is badly made and the {b} is already loose.",
    "Stopped working after {n} weeks. The {a} just died and the warranty claim was refused.",
    "Worst {p} I have owned. The {a} is useless.",
    "The {p} smells of burnt plastic and the {a} feels loose. Going back tomorrow.",
    "Really poor. The {a} jammed twice in the first week and now the {b} won't work.",
    "Disappointing. The {p} looks nothing like the photos and the {a} is badly finished.",
    "Broken out of the box. The {a} was cracked and the replacement was no better.",
]
NEGATIVE_HARD = [  # sarcasm, negation, praise of something other than the product
    "Oh great, the {a} broke on day two. Exactly what I paid for.",
    "Five stars for the box it came in. The {p} itself is useless.",
    "Fast shipping, lovely packaging, shame the {p} doesn't work. The {a} is dead.",
    "Not worth the money. The {a} is not even close to what was advertised.",
    "Wonderful, another {p} that lasts exactly one month. The {a} gave up yesterday.",
    "I really wanted to like this {p}, but the {a} never worked properly.",
    "Love how the {a} quits exactly when I need it. Said no one ever. Returning it.",
    "Nice color. That is the only nice thing I can say about this {p}.",
    "The seller was friendly and quick to answer, but the {p} itself is junk: the {a} fell off.",
    "Perfect if you enjoy fixing the {a} every other day. I don't.",
]
NEUTRAL_FACTUAL = [  # undecided, descriptive, or about something other than quality
    "Arrived on Tuesday as scheduled. Haven't used the {p} enough yet to have an opinion.",
    "The {p} does what it says. Nothing special, nothing wrong.",
    "Nothing more than a basic {p}. The {a} works, the {b} works. About what you'd expect.",
    "Average {p}. Neither impressed nor disappointed.",
    "Bought it as a gift, so I can't say how the {p} performs.",
    "Comparable to my previous {p}. Not better, not worse.",
    "The {p} is fine. I use it a few times a week and don't think about it much.",
    "Ordered the wrong size, so I exchanged it. The new one arrived today; too early to tell.",
    "It's okay. The {a} is ordinary and the {p} does the job.",
    "Standard {p}, standard {a}. It is what the listing says it is.",
    "Does the job, as long as you don't expect anything more from it. Three stars.",
    "Works as described. I have no strong feelings about this {p} either way.",
    "The {p} came in a plain box with a one-page manual. Set it up in {n} minutes. Too soon to judge.",
    "Middle of the road {p}. Nothing has broken, nothing has impressed me.",
]
NEUTRAL_MIXED = [  # good and bad points that balance
    "The {a} is great, but the {b} is disappointing. Overall it's okay.",
    "Good {a}, poor {b}. I'd call it average.",
    "Love the {a}, hate the {b}. It balances out to a middling {p}.",
    "The {p} looks nice and the {a} is decent, though the {b} feels cheap. Fine for the price.",
    "Some things are good, like the {a}, and some aren't, like the {b}. Mixed feelings.",
    "Works well most days, but the {a} acts up now and then. Not great, not terrible.",
    "Cheaper than the brand-name {p}, and you can tell from the {a}. Still, it does what it needs to.",
    "The {a} is better than my old one; the {b} is worse. A sideways move.",
    "Pros: the {a}. Cons: the {b}. Would I buy it again? Maybe.",
    "Decent {p} with one annoying flaw: the {b}. Everything else is fine.",
]
#: Sentences that say nothing about sentiment: a review's context, any class may carry one.
CONTEXT = [
    "I use it every day.",
    "Bought it for my {who}.",
    "Shipping took {n} days.",
    "I have had it for about {n} weeks.",
    "It replaced the {p} I had for years.",
    "I mostly use it on weekends.",
    "Ordered the black one.",
    "It came with a spare {a}.",
    "We are a family of {n}.",
    "I read the manual before using it.",
]
WHO = ["son", "daughter", "mother", "father", "partner", "flatmate", "office", "sister"]

#: (bank, share of that class's rows) per label: about a third of each class is a hard case.
BANKS: dict[str, list[tuple[list[str], float]]] = {
    "positive": [(POSITIVE_CORE, 0.65), (POSITIVE_HARD, 0.35)],
    "negative": [(NEGATIVE_CORE, 0.65), (NEGATIVE_HARD, 0.35)],
    "neutral": [(NEUTRAL_FACTUAL, 0.55), (NEUTRAL_MIXED, 0.45)],
}
#: Stars as buyers give them for each label (weights of 1 to 5 stars).
STAR_WEIGHTS = {
    "positive": [0, 0, 1, 8, 14],
    "negative": [14, 8, 1, 0, 0],
    "neutral": [0, 3, 14, 3, 0],
}


def fill(template: str, product: str, rng: random.Random) -> str:
    """One template with its product, two different parts of it, a small number and a person."""
    first, second = rng.sample(PRODUCTS[product], 2)
    return template.format(p=product, a=first, b=second, n=rng.randint(2, 11), who=rng.choice(WHO))


def review(label: str, rng: random.Random) -> tuple[str, str]:
    """A (product, text) pair for ``label``: its core sentence, sometimes with a context sentence."""
    banks, weights = zip(*BANKS[label], strict=True)
    bank = rng.choices(banks, weights=weights)[0]
    product = rng.choice(sorted(PRODUCTS))
    core = fill(rng.choice(bank), product, rng)
    roll = rng.random()
    if roll < 0.3:
        return product, f"{fill(rng.choice(CONTEXT), product, rng)} {core}"
    if roll < 0.55:
        return product, f"{core} {fill(rng.choice(CONTEXT), product, rng)}"
    return product, core


def make_rows(seed: int = SEED) -> list[dict[str, str | int]]:
    """ROWS_PER_LABEL distinct reviews per label, shuffled, with ids in file order."""
    rng = random.Random(seed)
    drafts: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for label in BANKS:
        made = 0
        while made < ROWS_PER_LABEL:
            product, text = review(label, rng)
            if text in seen:
                continue
            seen.add(text)
            drafts.append((product, text, label))
            made += 1
    rng.shuffle(drafts)
    rows: list[dict[str, str | int]] = []
    for i, (product, text, label) in enumerate(drafts):
        stars = rng.choices(range(1, 6), weights=STAR_WEIGHTS[label])[0]
        rows.append({"review_id": f"lr-{i:04d}", "product": product, "stars": stars, "text": text, "label": label})
    return rows


def main() -> None:
    rows = make_rows()
    with OUTPUT.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["review_id", "product", "stars", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {OUTPUT} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
