"""A seeded ImageNet-style JPEG folder (no real ImageNet here): `OUT/{train,val}/class-NNN/*.jpg`,
photo-like content (smooth colour fields plus fine texture) at sizes drawn around ImageNet's typical
500×375, JPEG quality 90 (about 60–120 kB per image, as ImageNet's).

    python bench/jpeg_folder.py --out /tmp/jpegs --classes 10 --train 200 --val 20 [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 500), (400, 300)]


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random colour field (bilinearly upsampled 8×6 grid) with per-pixel texture on top."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    texture = rng.normal(0, 18, (height, width, 3))
    return np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)


def write_folder(out: Path, classes: int, per_split: dict[str, int], seed: int) -> int:
    rng = np.random.default_rng(seed)
    written = 0
    for split, count in per_split.items():
        for c in range(classes):
            folder = out / split / f"class-{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = SIZES[rng.integers(len(SIZES))]
                Image.fromarray(photo_like(rng, width, height)).save(folder / f"{i:05d}.jpg", quality=90)
                written += 1
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=200, help="images per class in train/")
    parser.add_argument("--val", type=int, default=20, help="images per class in val/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = write_folder(Path(args.out), args.classes, {"train": args.train, "val": args.val}, args.seed)
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*.jpg"))
    print(f"{n} images, {size / n / 1e3:.0f} kB each on average, in {args.out}")


if __name__ == "__main__":
    main()
