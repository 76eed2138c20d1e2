"""Human keypoints in the COCO format: an embedded synthetic COCO tree and a top-down reader of real COCO.

Layout (the real COCO 2017 one; nothing is ever downloaded)::

    root/annotations/person_keypoints_train2017.json
    root/annotations/person_keypoints_val2017.json
    root/train2017/<file_name>          (``root/images/train2017/`` is accepted too)
    root/val2017/<file_name>

* :func:`make_synthetic_coco` *writes* such a tree: one stick figure per image (17 COCO joints drawn along
  COCO's skeleton) on a textured background, from a random pose (centre, size, rotation, lean, limb angles,
  facing the camera or not). The drawing is mirror-symmetric: the person's left/right follows from the facing
  (face drawn: the person's left is on the image right; hair drawn: the back, nose and eyes unlabelled), so
  horizontal flipping with COCO's left/right swap stays a valid augmentation, as on real people.
* :class:`COCOKeypoints` reads either tree the same way (pycocotools): one top-down sample per annotated person
  (``iscrowd`` 0, at least one labelled joint), cropped from its ground-truth box — centre of the box, size
  widened to the input aspect ratio and padded ×1.25 — by an affine warp to the input size (the HRNet /
  HR-NAS pipeline), with Gaussian heatmap targets (σ = 2 heatmap pixels) at 1/4 of the input and a weight
  per joint (0 for unlabelled joints, ``v`` = 0, and for joints whose Gaussian falls off the heatmap).
  Training adds HRNet's random scale (±35%), rotation (±45° on 60% of the samples) and flip (COCO flip pairs).

Coordinates are pixel indices (pixel *i* is centred at *i*), as COCO keypoints and the network's strided
convolutions are: heatmap pixel *j* sits at input pixel ``stride · j``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..cache import cache_root
from ..errors import RetiaError, expect
from .loaders import train_loader

COCO_KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                       "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
                       "left_knee", "right_knee", "left_ankle", "right_ankle")
# COCO's person skeleton as in its annotation files (1-based joint numbers).
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                 (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))  # 0-based left/right
# Per-joint OKS constants of the COCO keypoint evaluation (pycocotools' ``kpt_oks_sigmas``).
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10
NUM_JOINTS = len(COCO_KEYPOINT_NAMES)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = {"train": "train2017", "val": "val2017"}
COCO_LAYOUT = ("COCO keypoints: annotations/person_keypoints_{train,val}2017.json + "
               "{train,val}2017/<file_name> (or images/{train,val}2017/)")
SYNTHETIC_VERSION = 1  # bump when make_synthetic_coco draws differently (it is part of the cache key)


# ---------------------------------------------------------------------------------------------------------------
# pycocotools
# ---------------------------------------------------------------------------------------------------------------
def _coco_class():
    try:
        from pycocotools.coco import COCO
    except ImportError:  # pragma: no cover - depends on the environment
        raise RetiaError("the keypoint task needs pycocotools; expected it installed (pip install pycocotools)")
    return COCO


def load_coco(ann_file: str | Path):
    """A pycocotools ``COCO`` of ``ann_file``, without its prints; a one-line error for a missing or bad file."""
    path = Path(ann_file)
    if not path.is_file():
        raise RetiaError(f"annotation file {str(path)!r} does not exist; expected {COCO_LAYOUT}")
    COCO = _coco_class()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise RetiaError(f"annotation file {str(path)!r} is not COCO keypoint JSON ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); expected {COCO_LAYOUT}") from None


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` ('train' / 'val') under ``root``, checked to exist."""
    expect(split in SPLITS, f"split {split!r}: expected train or val")
    path = Path(root).expanduser()
    if not path.exists():
        raise RetiaError(f"datapath {str(root)!r} does not exist; expected {COCO_LAYOUT}")
    if not path.is_dir():
        raise RetiaError(f"datapath {str(root)!r} is not a directory; expected {COCO_LAYOUT}")
    ann = path / "annotations" / f"person_keypoints_{SPLITS[split]}.json"
    if not ann.is_file():
        raise RetiaError(f"annotation file {str(ann)!r} does not exist; expected {COCO_LAYOUT}")
    for images in (path / SPLITS[split], path / "images" / SPLITS[split]):
        if images.is_dir():
            return ann, images
    raise RetiaError(f"image folder {str(path / SPLITS[split])!r} does not exist; expected {COCO_LAYOUT}")


def check_input_size(input_size: int | Sequence[int], stride: int = 4) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair; both must be ints >= 16 divisible by ``stride`` so that the
    heatmap (input / stride) lines up with the input pixels."""
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    ok = (isinstance(size, (list, tuple)) and len(size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 16 and s % stride == 0 for s in size))
    if not ok:
        raise RetiaError(f"input_size {input_size!r}: expected [height, width], ints >= 16 divisible by {stride}")
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------------------------------------------------------
# geometry: boxes, affine crops, flips, heatmap targets
# ---------------------------------------------------------------------------------------------------------------
def clean_bbox(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x, y, w, h]`` clipped to the image as corner pixels ``(x1, y1, x2, y2)``; None when empty."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(width - 1.0, x1 + max(0.0, w - 1)), min(height - 1.0, y1 + max(0.0, h - 1))
    if w <= 0 or h <= 0 or x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def box_to_center_scale(box: Sequence[float], aspect_ratio: float, padding: float = 1.25) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Centre and crop size ``(w, h)`` in pixels of a corner box: widened to ``aspect_ratio`` (w / h) and
    padded by ``padding``, so the crop keeps the person's proportions and some context."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2], dtype=np.float64)
    return center, np.array([max(w, 1.0), max(h, 1.0)], dtype=np.float64) * padding


def crop_transform(center: Sequence[float], scale: Sequence[float], rotation: float,
                   output_size: Sequence[int]) -> np.ndarray:
    """2x3 affine matrix from image pixels to crop pixels: the box of size ``scale`` (w, h) around ``center``,
    turned by ``rotation`` degrees, onto ``output_size`` (h, w) with the centre at (w/2, h/2)."""
    out_h, out_w = output_size
    sx, sy = out_w / float(scale[0]), out_h / float(scale[1])
    t = math.radians(rotation)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # turns the image by -rotation
    lin = np.diag([sx, sy]) @ rot
    shift = np.array([out_w / 2, out_h / 2]) - lin @ np.asarray(center, dtype=np.float64)
    return np.concatenate([lin, shift[:, None]], axis=1)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The 2x3 inverse of a 2x3 affine matrix."""
    lin = np.linalg.inv(matrix[:, :2])
    return np.concatenate([lin, -(lin @ matrix[:, 2])[:, None]], axis=1)


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points`` (..., 2) through a 2x3 affine matrix."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp_image(image: np.ndarray, matrix: np.ndarray, output_size: Sequence[int]) -> torch.Tensor:
    """Bilinear affine warp of a uint8 HxWx3 image to a float ``(3, h, w)`` tensor in [0, 1] (outside: black),
    sampling each crop pixel at its exact image position (pixel-index convention, like cv2.warpAffine)."""
    out_h, out_w = output_size
    src = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    height, width = image.shape[:2]
    inv = torch.from_numpy(invert_affine(matrix)).float()
    v, u = torch.meshgrid(torch.arange(out_h, dtype=torch.float32), torch.arange(out_w, dtype=torch.float32),
                          indexing="ij")
    xy = torch.stack([u, v, torch.ones_like(u)], dim=-1) @ inv.T  # (h, w, 2) image positions
    grid = torch.stack([2 * xy[..., 0] / max(width - 1, 1) - 1, 2 * xy[..., 1] / max(height - 1, 1) - 1], -1)
    return F.grid_sample(src[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def flip_joints(joints: np.ndarray, visible: np.ndarray, width: int,
                pairs: Sequence[tuple[int, int]] = COCO_FLIP_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Joints of the horizontally flipped image (x → width − 1 − x) with left and right swapped."""
    joints, visible = joints.copy(), visible.copy()
    joints[:, 0] = width - 1 - joints[:, 0]
    for a, b in pairs:
        joints[[a, b]] = joints[[b, a]]
        visible[[a, b]] = visible[[b, a]]
    return joints, visible


def heatmap_targets(joints: np.ndarray, visible: np.ndarray, heatmap_size: Sequence[int],
                    sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian heatmaps ``(J, h, w)`` (peak at each joint's sub-pixel heatmap position, σ in heatmap pixels)
    and weights ``(J,)``: 1 for a labelled joint whose ±3σ window touches the heatmap, else 0 (its map is 0)."""
    h, w = heatmap_size
    ys, xs = np.arange(h, dtype=np.float64)[:, None], np.arange(w, dtype=np.float64)[None, :]
    target = np.zeros((len(joints), h, w), dtype=np.float32)
    weight = np.zeros(len(joints), dtype=np.float32)
    reach = 3 * sigma
    for j, ((x, y), v) in enumerate(zip(joints, visible)):
        if v <= 0 or x + reach < 0 or y + reach < 0 or x - reach > w - 1 or y - reach > h - 1:
            continue
        target[j] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
        weight[j] = 1.0
    return target, weight


# ---------------------------------------------------------------------------------------------------------------
# synthetic COCO tree
# ---------------------------------------------------------------------------------------------------------------
def _direction(angle: float) -> np.ndarray:
    """Unit vector at ``angle`` radians from straight down, turning towards +x (image coordinates, y down)."""
    return np.array([math.sin(angle), math.cos(angle)])


def synthetic_pose(rng: np.random.Generator) -> tuple[np.ndarray, bool, float]:
    """A random upright-ish pose in units of body height, pelvis at the origin: ``(joints (17, 2), facing the
    camera, head radius)``. Facing the camera puts the person's left on the image right."""
    facing = bool(rng.random() < 0.7)
    side = 1.0 if facing else -1.0  # image x direction of the person's left
    lean = rng.uniform(-0.15, 0.15)
    up, right = -_direction(lean), _direction(lean + math.pi / 2)  # body axes after the lean
    neck = 0.30 * up
    j = np.zeros((NUM_JOINTS, 2))
    head = neck + 0.14 * up + rng.uniform(-0.02, 0.02) * right
    j[0] = head - 0.01 * up                                   # nose
    eye, ear = 0.028, rng.uniform(0.07, 0.08)  # ears on the rim of the head (radius 0.075)
    j[1], j[2] = head + 0.02 * up + side * eye * right, head + 0.02 * up - side * eye * right
    j[3], j[4] = head + side * ear * right, head - side * ear * right
    shoulder, hip = rng.uniform(0.09, 0.12), rng.uniform(0.06, 0.08)
    for s, (sh, el, wr, hp, kn, an) in ((1, (5, 7, 9, 11, 13, 15)), (-1, (6, 8, 10, 12, 14, 16))):
        out = side * s  # +1: this limb hangs towards image +x (its rest direction tilts against the lean)
        j[sh] = neck + out * shoulder * right
        j[hp] = out * hip * right
        a_up = rng.uniform(-0.2, 1.9)
        a_fore = a_up + rng.uniform(-0.3, 2.0)
        j[el] = j[sh] + 0.16 * _rotate(_direction(out * a_up), lean)
        j[wr] = j[el] + 0.14 * _rotate(_direction(out * a_fore), lean)
        a_thigh = rng.uniform(-0.1, 0.5)
        a_shin = a_thigh + rng.uniform(-0.5, 0.2)
        j[kn] = j[hp] + 0.23 * _rotate(_direction(out * a_thigh), lean)
        j[an] = j[kn] + 0.23 * _rotate(_direction(out * a_shin), lean)
    return j, facing, 0.075


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    """``v`` turned by ``angle`` radians (+x towards +y: clockwise on screen, y pointing down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _background(rng: np.random.Generator, height: int, width: int):
    """A PIL RGB image: a colour gradient with random discs and strokes (distractors)."""
    from PIL import Image, ImageDraw

    c0, c1 = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
    t = np.linspace(0, 1, height)[:, None, None] * rng.uniform(0.3, 1) + \
        np.linspace(0, 1, width)[None, :, None] * rng.uniform(0, 0.7)
    img = c0 + (c1 - c0) * np.clip(t, 0, 1)
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            r = rng.uniform(2, max(3.0, width / 5))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
        else:
            x1, y1 = x0 + rng.uniform(-width / 2, width / 2), y0 + rng.uniform(-height / 2, height / 2)
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3)))
    return canvas


def _draw_person(rng: np.random.Generator, img, joints: np.ndarray, facing: bool, head_radius: float,
                 thickness: float) -> np.ndarray:
    """The stick figure over the PIL image ``img``, drawn at 2x and box-averaged down for smooth edges; a float
    HxWx3 array in [0, 1]."""
    from PIL import Image, ImageDraw

    width, height = img.size
    ss = 2
    big = img.resize((width * ss, height * ss), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    p = joints * ss + (ss - 1) / 2  # pixel index at 1x → pixel index at 2x
    def jitter(base):
        return tuple(min(255, max(0, int(c + d))) for c, d in zip(base, rng.uniform(-40, 40, 3)))

    arm, leg, torso = jitter((220, 60, 50)), jitter((50, 70, 200)), jitter((60, 170, 80))
    skin, hair, dark = jitter((235, 190, 150)), jitter((70, 45, 30)), (20, 20, 20)
    lw = max(2, int(round(thickness * ss)))

    def line(a, b, colour, w=lw):
        draw.line([tuple(p[a]), tuple(p[b])], fill=colour, width=w)
        for k in (a, b):
            r = w / 2
            draw.ellipse([p[k][0] - r, p[k][1] - r, p[k][0] + r, p[k][1] + r], fill=colour)

    for a, b, c in ((11, 13, leg), (13, 15, leg), (12, 14, leg), (14, 16, leg)):
        line(a, b, c)
    draw.polygon([tuple(p[5]), tuple(p[6]), tuple(p[12]), tuple(p[11])], fill=torso)
    for a, b, c in ((5, 7, arm), (7, 9, arm), (6, 8, arm), (8, 10, arm)):
        line(a, b, c)
    centre, r = (p[3] + p[4]) / 2, head_radius * ss
    draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=skin if facing else hair)
    ear = tuple(int(c * 0.8) for c in skin)
    for k in (3, 4):
        e = max(1.5, r * 0.3)
        draw.ellipse([p[k][0] - e, p[k][1] - e, p[k][0] + e, p[k][1] + e], fill=ear)
    if facing:
        for k, colour in ((1, dark), (2, dark), (0, (200, 40, 40))):
            e = max(1.0, r * 0.22)
            draw.ellipse([p[k][0] - e, p[k][1] - e, p[k][0] + e, p[k][1] + e], fill=colour)
    return np.asarray(big.reduce(ss), dtype=np.float64) / 255.0


def synthetic_person(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """One uint8 image with one stick figure and its COCO annotation fields (keypoints, bbox, area, ...)."""
    height, width = image_size
    pose, facing, head = synthetic_pose(rng)
    turn = math.radians(rng.uniform(-30, 30))
    pose = np.stack([_rotate(v, turn) for v in pose])
    body = rng.uniform(0.55, 0.85) * height
    joints = pose * body
    lo, hi = joints.min(0) - head * body, joints.max(0) + head * body
    size = hi - lo
    margin = 0.1 * size  # allow a little of the figure outside the image
    cx = rng.uniform(size[0] / 2 - margin[0], max(size[0] / 2 - margin[0], width - 1 - size[0] / 2 + margin[0]))
    cy = rng.uniform(size[1] / 2 - margin[1], max(size[1] / 2 - margin[1], height - 1 - size[1] / 2 + margin[1]))
    shift = np.array([cx, cy]) - (lo + hi) / 2
    joints, lo, hi = joints + shift, lo + shift, hi + shift
    image = _draw_person(rng, _background(rng, height, width), joints, facing, head * body, 0.045 * body)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    inside = (joints[:, 0] >= 0) & (joints[:, 0] <= width - 1) & (joints[:, 1] >= 0) & (joints[:, 1] <= height - 1)
    labelled = inside & (facing | (np.arange(NUM_JOINTS) > 2))  # seen from the back: no nose, no eyes
    kps = np.where(labelled[:, None], np.round(joints, 2), 0.0)
    x1, y1 = np.clip(lo, 0, None)
    x2, y2 = min(hi[0], width - 1.0), min(hi[1], height - 1.0)
    bbox = [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1 + 1), 2), round(float(y2 - y1 + 1), 2)]
    ann = {"keypoints": [float(v) for row in np.concatenate([kps, 2.0 * labelled[:, None]], 1) for v in row],
           "num_keypoints": int(labelled.sum()), "bbox": bbox,
           # COCO's area is the person's mask; a stick figure's own pixels would make OKS far stricter than for
           # a real person, so take half the box (about a real person's mask / box ratio)
           "area": round(0.5 * bbox[2] * bbox[3], 2), "iscrowd": 0, "category_id": 1}
    return (image * 255 + 0.5).astype(np.uint8), ann


def _categories() -> list[dict[str, Any]]:
    return [{"supercategory": "person", "id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES),
             "skeleton": [list(pair) for pair in COCO_SKELETON]}]


def make_synthetic_coco(root: str | Path, num_train: int = 256, num_val: int = 64,
                        image_size: Sequence[int] = (96, 72), seed: int = 0) -> Path:
    """Write a synthetic COCO keypoint tree (see the module docstring) to ``root`` and return it: PNG images,
    one stick figure each, ``person_keypoints_{train,val}2017.json``. The same arguments write the same bytes."""
    from PIL import Image

    expect(isinstance(num_train, int) and num_train >= 1, f"num_train {num_train!r}: expected an int >= 1")
    expect(isinstance(num_val, int) and num_val >= 1, f"num_val {num_val!r}: expected an int >= 1")
    ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
        isinstance(s, int) and s >= 32 for s in image_size)
    expect(ok, f"image_size {image_size!r}: expected [height, width], ints >= 32")
    root = Path(root).expanduser()
    height, width = int(image_size[0]), int(image_size[1])
    for split, count, offset, split_seed in (("train", num_train, 0, seed), ("val", num_val, 1_000_000, seed + 7919)):
        rng = np.random.default_rng([split_seed, SYNTHETIC_VERSION])
        folder = root / SPLITS[split]
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = offset + i + 1
            pixels, ann = synthetic_person(rng, (height, width))
            name = f"{image_id:012d}.png"
            Image.fromarray(pixels).save(folder / name, compress_level=1)
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            annotations.append(dict(ann, id=image_id, image_id=image_id))
        data = {"info": {"description": f"retia synthetic COCO keypoints (seed {seed})"}, "images": images,
                "annotations": annotations, "categories": _categories()}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        with open(root / "annotations" / f"person_keypoints_{SPLITS[split]}.json", "w") as f:
            json.dump(data, f)
    return root


def synthetic_cache_path(cache_dir: str | Path | None = None, **params: Any) -> Path:
    """Where the synthetic tree of ``params`` lives: ``<cache_dir>/synthetic_coco_<hash>`` (default cache dir
    ``$RETIA_CACHE`` or ``~/.cache/retia``)."""
    base = cache_root(cache_dir)
    key = json.dumps(dict(params, version=SYNTHETIC_VERSION), sort_keys=True)
    return base / f"synthetic_coco_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def ensure_synthetic_coco(root: Path, **params: Any) -> Path:
    """Generate the synthetic tree at ``root`` unless a complete one is there (written to a temporary folder
    and renamed, so concurrent or interrupted runs never leave a half tree)."""
    if (root / "COMPLETE").is_file():
        return root
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_synthetic_coco(tmp, **params)
    (tmp / "COMPLETE").write_text(json.dumps(params, sort_keys=True))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "COMPLETE").is_file():
            raise
    return root


# ---------------------------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------------------------
class COCOKeypoints(Dataset):
    """Top-down person samples of one COCO split (see the module docstring).

    ``dataset[i]`` → ``(image (3, H, W) normalised, target (J, H/4, W/4), weight (J,), meta)`` with ``meta`` =
    ``{"index", "image_id", "center", "scale", "rotation", "joints"}`` (``joints``: the crop's joint positions in
    input pixels, after augmentation). ``records`` holds one dict per sample (image id, file, joints, visibility,
    centre, scale); ``coco`` is the pycocotools object of the split.
    """

    def __init__(self, root: str | Path, split: str = "val", input_size: int | Sequence[int] = (64, 48),
                 train: bool = False, flip: bool = True, scale_factor: float = 0.35, rotation_factor: float = 45.0,
                 rotation_prob: float = 0.6, sigma: float = 2.0, stride: int = 4, padding: float = 1.25,
                 flip_prob: float = 0.5):
        self.input_size = check_input_size(input_size, stride)
        self.heatmap_size = (self.input_size[0] // stride, self.input_size[1] // stride)
        self.ann_file, self.image_dir = coco_paths(root, split)
        self.coco = load_coco(self.ann_file)
        self.split, self.train, self.flip, self.flip_prob = split, train, flip, flip_prob
        self.scale_factor, self.rotation_factor, self.rotation_prob = scale_factor, rotation_factor, rotation_prob
        self.sigma, self.stride, self.padding = sigma, stride, padding
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.records = self._records()
        if not self.records:
            raise RetiaError(f"annotation file {str(self.ann_file)!r} has no person with labelled keypoints")

    def _records(self) -> list[dict[str, Any]]:
        aspect = self.input_size[1] / self.input_size[0]
        records = []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.loadImgs(image_id)[0]
            for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False)):
                kps = np.asarray(ann.get("keypoints", []), dtype=np.float64)
                if ann.get("category_id", 1) != 1 or kps.size != 3 * NUM_JOINTS or kps[2::3].max() <= 0:
                    continue
                box = clean_bbox(ann["bbox"], info["width"], info["height"])
                if box is None or ann.get("area", 1) <= 0:
                    continue
                center, scale = box_to_center_scale(box, aspect, self.padding)
                records.append({"image_id": image_id, "ann_id": ann["id"], "file": self.image_dir / info["file_name"],
                                "joints": kps.reshape(-1, 3)[:, :2].copy(), "visible": kps[2::3].copy(),
                                "center": center, "scale": scale})
        return records

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, index: int) -> np.ndarray:
        """The whole uint8 HxWx3 image of sample ``index``."""
        from PIL import Image

        path = self.records[index]["file"]
        if not path.is_file():
            raise RetiaError(f"image {str(path)!r} listed in {str(self.ann_file)!r} does not exist")
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def _augment(self, rec, image):
        joints, visible = rec["joints"], rec["visible"]
        center, scale, rotation = rec["center"].copy(), rec["scale"].copy(), 0.0
        if self.train:
            sf, rf = self.scale_factor, self.rotation_factor
            scale = scale * float(np.clip(np.random.randn() * sf + 1, 1 - sf, 1 + sf))
            if np.random.rand() < self.rotation_prob:
                rotation = float(np.clip(np.random.randn() * rf, -2 * rf, 2 * rf))
            if self.flip and np.random.rand() < self.flip_prob:
                image = image[:, ::-1]
                joints, visible = flip_joints(joints, visible, image.shape[1])
                center[0] = image.shape[1] - 1 - center[0]
        return image, joints, visible, center, scale, rotation

    def __getitem__(self, index: int):
        rec = self.records[index]
        image, joints, visible, center, scale, rotation = self._augment(rec, self.read_image(index))
        matrix = crop_transform(center, scale, rotation, self.input_size)
        crop = (warp_image(image, matrix, self.input_size) - self.mean) / self.std
        in_crop = apply_affine(joints, matrix)
        target, weight = heatmap_targets(in_crop / self.stride, visible, self.heatmap_size, self.sigma)
        meta = {"index": index, "image_id": rec["image_id"], "center": torch.from_numpy(center).float(),
                "scale": torch.from_numpy(scale).float(), "rotation": torch.tensor(rotation, dtype=torch.float32),
                "joints": torch.from_numpy(in_crop).float()}
        return crop, torch.from_numpy(target), torch.from_numpy(weight), meta


class COCOKeypointDataModule(pl.LightningDataModule):
    """A COCO keypoint tree at ``datapath`` as train / val :class:`COCOKeypoints`; with ``synthetic`` (the
    arguments of :func:`make_synthetic_coco`), the tree is generated there first by :meth:`prepare_data`.

    Evaluation needs: ``val_set.records`` (image id, centre, scale per sample), ``val_coco`` / ``val_ann_file``
    (the ground truth for COCOeval), ``input_size``, ``heatmap_size``; ``num_joints`` = 17.
    """

    num_joints = NUM_JOINTS
    joint_names = COCO_KEYPOINT_NAMES
    skeleton = COCO_SKELETON
    flip_pairs = COCO_FLIP_PAIRS

    def __init__(self, datapath: str | Path, input_size: int | Sequence[int] = (64, 48), batch_size: int = 16,
                 num_workers: int = 0, sigma: float = 2.0, flip: bool = True, scale_factor: float = 0.35,
                 rotation_factor: float = 45.0, rotation_prob: float = 0.6,
                 synthetic: dict[str, Any] | None = None):
        super().__init__()
        expect(isinstance(batch_size, int) and batch_size > 0, f"batch_size {batch_size!r}: expected a positive int")
        self.input_size = check_input_size(input_size)
        self.heatmap_size = (self.input_size[0] // 4, self.input_size[1] // 4)
        self.root, self.synthetic = Path(datapath).expanduser(), synthetic
        if synthetic is None:
            coco_paths(self.root, "val")  # fail now, in one line, on a wrong path
        self.batch_size, self.num_workers, self.sigma = batch_size, num_workers, sigma
        self.augment = dict(flip=flip, scale_factor=scale_factor, rotation_factor=rotation_factor,
                            rotation_prob=rotation_prob)
        self.train_set: COCOKeypoints | None = None
        self.val_set: COCOKeypoints | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic_coco(self.root, **self.synthetic)
        coco_paths(self.root, "val")

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic is not None and not (self.root / "COMPLETE").is_file():
            self.prepare_data()
        if self.val_set is None:
            self.val_set = COCOKeypoints(self.root, "val", self.input_size, train=False, sigma=self.sigma)
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = COCOKeypoints(self.root, "train", self.input_size, train=True, sigma=self.sigma,
                                           **self.augment)

    @property
    def val_coco(self):
        """The pycocotools ground truth of the validation split."""
        self.setup("validate")
        return self.val_set.coco

    @property
    def val_ann_file(self) -> Path:
        return coco_paths(self.root, "val")[0]

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


def build_keypoint_datamodule(datapath: str | Path | None = None, input_size: int | Sequence[int] = (64, 48),
                              batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                              **kwargs: Any) -> COCOKeypointDataModule:
    """COCO keypoints at ``datapath``, or, when None, the synthetic tree generated once into a cache folder and
    read through the same reader. ``kwargs``: ``num_train``, ``num_val``, ``image_size`` (synthetic images),
    ``cache_dir`` or ``root`` (where the synthetic tree goes), and the reader's ``sigma``, ``flip``,
    ``scale_factor``, ``rotation_factor``, ``rotation_prob``."""
    synth_keys = {"num_train", "num_val", "image_size"}
    synthetic = {k: kwargs.pop(k) for k in list(kwargs) if k in synth_keys}
    cache_dir, root = kwargs.pop("cache_dir", None), kwargs.pop("root", None)
    if datapath is not None:
        extra = sorted(set(synthetic) | {k for k, v in (("cache_dir", cache_dir), ("root", root)) if v is not None})
        if extra:
            raise RetiaError(f"{', '.join(extra)}: only for the synthetic data (datapath None), not {str(datapath)!r}")
        return COCOKeypointDataModule(datapath, input_size, batch_size, num_workers, **kwargs)
    check_input_size(input_size)
    params = {"num_train": 256, "num_val": 64, "image_size": [96, 72], **synthetic, "seed": seed}
    params["image_size"] = list(params["image_size"])
    path = Path(root).expanduser() if root is not None else synthetic_cache_path(cache_dir, **params)
    return COCOKeypointDataModule(path, input_size, batch_size, num_workers, synthetic=params, **kwargs)
