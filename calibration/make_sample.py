"""Write a tiny ImageFolder sample set (procedural PNG images, one folder per class) to try `--calib` with.

    python calibration/make_sample.py OUT_DIR [--classes 2] [--per-class 8] [--size 64] [--seed 0]

It needs only numpy and Pillow. Each class has its own pattern (gradient, checkerboard, stripes, rings, blobs) with a
seeded random colour, phase and noise, so the classes differ visibly and a rerun with the same seed writes the same
bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("gradient", "checkerboard", "stripes", "rings", "blobs")


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    # A grey-level field in [0, 1]; the random frequency and phase make every image of a class different.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq, phase = rng.uniform(2.0, 6.0), rng.uniform(0.0, 2 * np.pi)
    if kind == "gradient":
        angle = rng.uniform(0.0, 2 * np.pi)
        field = np.cos(angle) * xx + np.sin(angle) * yy
        return (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    if kind == "checkerboard":
        return ((np.floor(xx * freq + phase) + np.floor(yy * freq + phase)) % 2).astype(np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * xx + phase)
    if kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy) + phase)
    # blobs: a few Gaussian bumps at random places.
    field = np.zeros((size, size), dtype=np.float32)
    for cy, cx in rng.uniform(0.1, 0.9, size=(4, 2)):
        field += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
    return np.clip(field, 0.0, 1.0)


def make_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Return one RGB ``size``×``size`` image of pattern ``kind`` (one of PATTERNS), tinted and noised with ``rng``."""
    field = _pattern(kind, size, rng)
    low, high = rng.uniform(0.0, 0.4, size=3), rng.uniform(0.6, 1.0, size=3)
    rgb = low + field[..., None] * (high - low) + rng.normal(0.0, 0.04, size=(size, size, 3))
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write ``classes`` × ``per_class`` PNG images of ``size``×``size`` pixels to ``root/<NN_pattern>/<i>.png`` and
    return ``root``. Class folders are numbered so their sorted order (which sets the labels) is the creation order;
    more classes than patterns reuse the patterns with other random colours. The same seed writes the same files."""
    if classes < 1 or per_class < 1 or size < 1:
        raise ValueError("classes, per_class and size must be at least 1")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        kind = PATTERNS[c % len(PATTERNS)]
        folder = root / f"{c:02d}_{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(kind, size, rng).save(folder / f"{i:03d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the sample set."""
    parser = argparse.ArgumentParser(description="Write a tiny ImageFolder sample set for edgeprune --calib.")
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_image_folder(args.out, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes * args.per_class} images to {root}; try: edgeprune build ... --calib {root}")


if __name__ == "__main__":
    main()
