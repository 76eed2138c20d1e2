"""Fake ImageFolder data for scale tests: ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png``.

    python -m retia.data.fake --out DIR --classes 10 --train-per-class 20 --val-per-class 5 --size 64 \
        [--format png|jpg] [--seed 0] [--force]

Unlike random noise, the images can be learned: every class has its own hue (spread by the golden ratio), grating
(orientation and frequency) and shape (disc, square, triangle, ring), drawn on a darker background of the same
hue; each image jitters them (position, size, colour, grating phase) and adds Gaussian pixel noise. An image is a
function of ``(seed, split, class, index)`` only, so the output is the same for a seed whatever is generated
around it. Class folders are ``class_000`` ... (zero-padded so ImageFolder's sorted order is the class index).
"""
from __future__ import annotations

import argparse
import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RetiaError, expect

SPLITS = ("train", "val")
FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
SHAPES = ("disc", "square", "triangle", "ring")
GOLDEN = (math.sqrt(5) - 1) / 2
NOISE_STD = 0.06  # Gaussian pixel noise, in [0, 1] intensity units
JPEG_QUALITY = 90
PROGRESS_FROM = 500  # show a progress bar from this many images on


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable: colours in [0, 1], grating angle (radians) and cycles per image."""
    foreground: tuple[float, float, float]
    background: tuple[float, float, float]
    angle: float
    cycles: float
    shape: str


def class_names(classes: int) -> list[str]:
    width = max(3, len(str(classes - 1)))
    return [f"class_{c:0{width}d}" for c in range(classes)]


def class_style(c: int, seed: int) -> ClassStyle:
    """The style of class ``c`` (a function of ``seed`` and ``c`` only)."""
    rng = np.random.default_rng([seed, 0xC1A55, c])
    hue = (c * GOLDEN + rng.uniform(0, 0.05)) % 1.0
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = colorsys.hsv_to_rgb((hue + 0.5) % 1.0, rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.45))
    return ClassStyle(fg, bg, angle=float(rng.uniform(0, math.pi)), cycles=float(rng.uniform(2, 8)),
                      shape=SHAPES[c % len(SHAPES)])


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    # triangle pointing up: below the two slanted edges, above the base
    return (dy <= r * 0.6) & (dy >= -r + 2 * np.abs(dx))


def fake_image(style: ClassStyle, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size``x``size`` RGB uint8 image of a class: grating background, jittered shape, pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * style.cycles * (xx * math.cos(style.angle) + yy * math.sin(style.angle)) + phase)
    image = np.asarray(style.background, np.float32) * (1 + 0.35 * wave[..., None])
    r = rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, 1 - r, size=2)
    fg = np.clip(np.asarray(style.foreground, np.float32) + rng.normal(0, 0.06, 3), 0, 1)
    mask = _shape_mask(style.shape, xx, yy, cx, cy, r)
    image[mask] = fg * (0.85 + 0.15 * wave[mask, None])
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, NOISE_STD, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _check(classes, train_per_class, val_per_class, size, fmt, seed) -> str:
    for name, value, low in (("classes", classes, 1), ("train_per_class", train_per_class, 1),
                             ("val_per_class", val_per_class, 1), ("size", size, 8), ("seed", seed, 0)):
        expect(isinstance(value, int) and not isinstance(value, bool) and value >= low,
               f"fake data: {name} {value!r}: expected an integer >= {low}")
    expect(size <= 4096, f"fake data: size {size}: expected at most 4096")
    expect(str(fmt).lower() in FORMATS, f"fake data: format {fmt!r}: expected one of png, jpg")
    return FORMATS[str(fmt).lower()]


def generate_fake_data(out: str | Path, classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
                       size: int = 64, fmt: str = "png", seed: int = 0, force: bool = False,
                       progress: bool = True) -> dict:
    """Write the fake ImageFolder tree under ``out`` (see the module docstring); returns ``{"classes": [...],
    "train": n, "val": n}``. An existing non-empty ``out/train`` or ``out/val`` is an error unless ``force``
    (then the images are written over; other files stay)."""
    from PIL import Image
    from tqdm import tqdm

    ext = _check(classes, train_per_class, val_per_class, size, fmt, seed)
    root = Path(out).expanduser()
    expect(not root.exists() or root.is_dir(), f"fake data: out {str(out)!r} exists and is not a directory")
    for split in SPLITS:
        folder = root / split
        if folder.exists() and any(folder.iterdir()) and not force:
            raise RetiaError(f"fake data: {str(folder)!r} is not empty: expected a new or empty folder (or --force)")
    names = class_names(classes)
    styles = [class_style(c, seed) for c in range(classes)]
    counts = {"train": train_per_class, "val": val_per_class}
    total = classes * (train_per_class + val_per_class)
    bar = tqdm(total=total, desc="fake images", unit="img", disable=not progress or total < PROGRESS_FROM)
    for s, split in enumerate(SPLITS):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                pixels = fake_image(styles[c], size, np.random.default_rng([seed, s, c, i]))
                options = {"quality": JPEG_QUALITY} if ext == "jpg" else {}
                Image.fromarray(pixels).save(folder / f"img_{i:06d}.{ext}", **options)
                bar.update()
    bar.close()
    return {"classes": names, "train": classes * train_per_class, "val": classes * val_per_class}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retia.data.fake", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--format", default="png", help="png (lossless, default) or jpg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into non-empty train/ and val/ folders")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    info = generate_fake_data(a.out, a.classes, a.train_per_class, a.val_per_class, a.size, a.format, a.seed,
                              a.force, not a.no_progress)
    print(f"wrote {info['train']} train + {info['val']} val images of {len(info['classes'])} classes -> {a.out}")
    return info


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
