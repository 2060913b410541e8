"""Writes the image sample jobs/label_images.toml uses: small product-photo-like JPEGs and a CSV naming them.

Deterministic (fixed seed, no timestamps), so rerunning gives identical bytes and the ledger keeps its
answers. The committed set is ~24 images of 160x160 px, well under 200 KB in all; ``--size`` and
``--count`` make bigger sets for benchmarks without committing them. Needs Pillow (a dev dependency).

python data/make_images.py                       # data/images/*.jpg and data/images.csv
python data/make_images.py --count 2000 --out /tmp/imgs --size 320
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent

COLORS = {
    "red": (196, 48, 43),
    "blue": (42, 92, 170),
    "green": (58, 140, 76),
    "yellow": (230, 190, 40),
    "black": (35, 35, 38),
    "white": (236, 236, 232),
}
PRODUCTS = ["mug", "bottle", "box", "lamp", "sneaker", "backpack"]
BACKGROUNDS = [(245, 245, 245), (232, 226, 214), (220, 230, 238)]


def draw_product(product: str, color: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    """A studio-style shot: plain backdrop, soft shadow, one simple product silhouette with a highlight."""
    bg = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (size, size), bg)
    s = size / 160  # shapes are laid out on a 160 px grid and scaled
    shadow = Image.new("L", (size, size), 0)
    ImageDraw.Draw(shadow).ellipse([40 * s, 122 * s, 120 * s, 138 * s], fill=110)
    img.paste((0, 0, 0), mask=shadow.filter(ImageFilter.GaussianBlur(5 * s)))
    d = ImageDraw.Draw(img)
    dx = rng.uniform(-8, 8)

    def at(*xy: float) -> list[float]:
        """Grid coordinates (x, y, x, y, ...) shifted by ``dx`` and scaled to the image."""
        return [(v + dx if i % 2 == 0 else v) * s for i, v in enumerate(xy)]

    def pts(*xy: float) -> list[tuple[float, float]]:
        flat = at(*xy)
        return list(zip(flat[::2], flat[1::2], strict=True))

    r = max(1, int(6 * s))
    if product == "mug":
        d.rounded_rectangle(at(50, 50, 104, 128), radius=r, fill=color)
        d.arc(at(92, 66, 124, 104), start=-90, end=90, fill=color, width=int(7 * s))
    elif product == "bottle":
        d.rounded_rectangle(at(60, 56, 100, 130), radius=2 * r, fill=color)
        d.rectangle(at(72, 30, 88, 58), fill=color)
        d.rectangle(at(70, 24, 90, 32), fill=(60, 60, 60))
    elif product == "box":
        top = tuple(min(255, c + 40) for c in color)
        side = tuple(max(0, c - 40) for c in color)
        d.polygon(pts(40, 62, 96, 62, 96, 128, 40, 128), fill=color)
        d.polygon(pts(40, 62, 62, 44, 118, 44, 96, 62), fill=top)
        d.polygon(pts(96, 62, 118, 44, 118, 110, 96, 128), fill=side)
    elif product == "lamp":
        d.polygon(pts(54, 70, 106, 70, 94, 36, 66, 36), fill=color)
        d.rectangle(at(77, 70, 83, 120), fill=(90, 90, 90))
        d.ellipse(at(56, 116, 104, 130), fill=(70, 70, 70))
    elif product == "sneaker":
        d.chord(at(36, 70, 124, 150), start=180, end=360, fill=color)
        d.rectangle(at(36, 108, 124, 122), fill=(240, 240, 240))
    else:  # backpack
        d.rounded_rectangle(at(48, 40, 112, 130), radius=3 * r, fill=color)
        d.rounded_rectangle(at(58, 86, 102, 120), radius=r, outline=(30, 30, 30))
    d.ellipse(at(62, 60, 70, 68), fill=(255, 255, 255))  # specular highlight
    return img


def make(out: Path, count: int, size: int, seed: int = 7) -> list[dict[str, str]]:
    """Write ``count`` JPEGs under ``out/images`` and return their rows (path relative to the project root)."""
    rng = random.Random(seed)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        # Product and colour step at different rates, so the first 36 images are all different pairs.
        product, color = PRODUCTS[i % len(PRODUCTS)], list(COLORS)[(i + i // len(PRODUCTS)) % len(COLORS)]
        path = folder / f"p-{i:04d}.jpg"
        draw_product(product, COLORS[color], size, rng).save(path, "JPEG", quality=80, optimize=True)
        shown = path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path
        rows.append({"product_id": f"p-{i:04d}", "image": str(shown), "title": f"{color} {product}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=160, help="Side of each square image in pixels.")
    parser.add_argument("--out", type=Path, default=HERE, help="Folder for images/ and images.csv.")
    args = parser.parse_args()
    rows = make(args.out, args.count, args.size)
    rows.append({"product_id": f"p-{args.count:04d}", "image": "", "title": "listing without a photo"})
    with (args.out / "images.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["product_id", "image", "title"])
        writer.writeheader()
        writer.writerows(rows)
    total = sum(p.stat().st_size for p in (args.out / "images").glob("p-*.jpg"))
    print(f"wrote {len(rows)} rows to {args.out / 'images.csv'}, {total / 1e3:.0f} KB of images")


if __name__ == "__main__":
    main()
