"""A small COCO-format data set of coloured shapes, so every command runs without downloading COCO.

Classes differ in shape; with ``colour_by_class`` each class also keeps to its own band of hues (the
quickstart's setting: a detector trained from scratch for a few CPU minutes learns colour far sooner
than silhouette, see ``CLASS_HUES``). It is built to exercise what real data exercises: object sizes
from ~8 px to ~60% of the image (the scale-aware part of DyHead has something to do), textured
backgrounds, partial occlusions, boxes cut by the image border, and non-contiguous category ids
(1, 3, 7, 10) so the label mapping is tested. Everything follows from the seed: the same seed gives
byte-identical JSON and images.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import MAX_SYNTHETIC_IMAGES, MAX_SYNTHETIC_SIZE

# Deliberately non-contiguous ids: a data loader that uses category ids as labels breaks visibly.
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 10, "name": "cross", "supercategory": "shape"},
]
# Hue centres (0..1) per category id for colour_by_class; each shape's hue is its centre +- CLASS_HUE_SPREAD.
CLASS_HUES = {1: 0.0, 3: 0.25, 7: 0.5, 10: 0.75}
CLASS_HUE_SPREAD = 0.06
MIN_OBJECT_SIZE = 8  # px, the smallest shape diameter
MAX_OBJECT_FRACTION = 0.6  # the largest shape diameter, as a fraction of the image side
MAX_OBJECTS = 6
MIN_VISIBLE_FRACTION = 0.6  # an occluded or border-cut shape keeps at least this much of itself
MIN_VISIBLE_PIXELS = 16
PLACEMENT_TRIES = 12
SPLIT_CODES = {"train": 0, "val": 1}


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    seed: int = 0,
    colour_by_class: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/{train,val}/*.jpg`` and ``out_dir/annotations/{train,val}.json``; return a summary.

    ``colour_by_class``: each class's shapes take hues near its own ``CLASS_HUES`` entry (else any hue).
    The settings are recorded in each JSON's ``info.generator``. Each image gets its own random stream
    (seed, split, index), so adding images leaves the others alone.
    The JSON files are written last and atomically: when they exist, the images they list exist too.
    """
    for what, count in (("train", num_train), ("val", num_val)):
        if not 0 <= count <= MAX_SYNTHETIC_IMAGES:
            raise DyheadError(f"the number of synthetic {what} images must be within 0..{MAX_SYNTHETIC_IMAGES}, got {count}")
    if not 32 <= image_size <= MAX_SYNTHETIC_SIZE:
        raise DyheadError(
            f"synthetic image size must be within 32..{MAX_SYNTHETIC_SIZE} px (larger ones exhaust memory), got {image_size}"
        )
    if seed < 0:
        raise DyheadError(f"the seed must be >= 0, got {seed}")
    root = Path(out_dir)
    summary: dict[str, Any] = {"root": str(root), "categories": [c["name"] for c in CATEGORIES]}
    for split, count in (("train", num_train), ("val", num_val)):
        images_dir = root / split
        ann_file = root / "annotations" / f"{split}.json"
        settings = generator_settings(count, image_size, seed, colour_by_class)
        num_anns = _write_split(images_dir, ann_file, split, settings)
        summary[f"{split}_images"] = str(images_dir)
        summary[f"{split}_ann"] = str(ann_file)
        summary[f"num_{split}"] = count
        summary[f"num_{split}_annotations"] = num_anns
    return summary


def ensure_synthetic(cfg: Any) -> dict[str, Any] | None:
    """Create the synthetic data set at ``cfg``'s paths when ``cfg.synthetic`` is on and it is missing.

    ``cfg`` is a ``DataConfig``. Its paths must follow the layout ``make_synthetic_coco`` writes, with the
    root taken from ``train_ann``'s grandparent; anything else is a ``DyheadError`` naming the layout. An
    existing data set made with other settings (size, count, seed, colours) is a ``DyheadError`` too.
    Returns the summary when the data set was written, else None.
    """
    if not cfg.synthetic:
        return None
    root = Path(cfg.train_ann).parent.parent
    expected = {
        "train_images": root / "train",
        "train_ann": root / "annotations" / "train.json",
        "val_images": root / "val",
        "val_ann": root / "annotations" / "val.json",
    }
    wrong = [
        f"data.{key} = '{getattr(cfg, key)}' (expected '{path}')"
        for key, path in expected.items()
        if os.path.normpath(getattr(cfg, key)) != os.path.normpath(path)
    ]
    if wrong:
        raise DyheadError(
            f"data.synthetic needs the layout <root>/train, <root>/val, <root>/annotations/train.json, "
            f"<root>/annotations/val.json with root '{root}'; got " + "; ".join(wrong)
        )
    if expected["train_ann"].is_file() and expected["val_ann"].is_file():
        for split, count in (("train", cfg.synthetic_num_train), ("val", cfg.synthetic_num_val)):
            want = generator_settings(count, cfg.synthetic_image_size, cfg.synthetic_seed, cfg.synthetic_colour_by_class)
            check_settings(expected[f"{split}_ann"], want)
        return None
    return make_synthetic_coco(
        root,
        cfg.synthetic_num_train,
        cfg.synthetic_num_val,
        cfg.synthetic_image_size,
        cfg.synthetic_seed,
        cfg.synthetic_colour_by_class,
    )


def synthetic_settings(ann_file: Path) -> dict[str, Any] | None:
    """The generator settings recorded in a synthetic split's annotation file (None when unreadable)."""
    try:
        got = json.loads(ann_file.read_text()).get("info", {}).get("generator")
    except (OSError, ValueError, AttributeError):
        return None
    return got if isinstance(got, dict) else None


def describe_settings(settings: dict[str, Any] | None) -> str:
    """Generator settings in words: "num_images=4, image_size=32, ..." ("unknown settings" for None)."""
    return "unknown settings" if not isinstance(settings, dict) else ", ".join(f"{k}={v}" for k, v in settings.items())


def check_settings(ann_file: Path, want: dict[str, Any]) -> None:
    """A one-line error when an existing synthetic split was made with other settings than the recipe's.

    We never delete or overwrite it ourselves: the user may have put work there.
    """
    got = synthetic_settings(ann_file)
    if got != want:
        raise DyheadError(
            f"{ann_file} was made with {describe_settings(got)}, but the recipe asks for "
            + describe_settings(want)
            + f"; delete {ann_file.parent.parent} to have it made again, or point data.* elsewhere"
        )


def holds_synthetic_set(root: Path) -> bool:
    """Whether ``root`` holds a data set ``make_synthetic_coco`` wrote (its JSON files say so)."""
    found = False
    for split in SPLIT_CODES:
        ann_file = Path(root) / "annotations" / f"{split}.json"
        if not ann_file.exists():
            continue
        try:
            info = json.loads(ann_file.read_bytes()).get("info", {})
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
        if not isinstance(info, dict) or not isinstance(info.get("generator"), dict):
            return False
        found = True
    return found


def generator_settings(num_images: int, image_size: int, seed: int, colour_by_class: bool) -> dict[str, Any]:
    """What a split was made with (stored in its JSON, compared by ``ensure_synthetic``)."""
    return {"num_images": num_images, "image_size": image_size, "seed": seed, "colour_by_class": colour_by_class}


def _write_split(images_dir: Path, ann_file: Path, split: str, settings: dict[str, Any]) -> int:
    for folder in (images_dir, ann_file.parent):
        with _writing(folder, folder / ".none"):
            folder.mkdir(parents=True, exist_ok=True)
    previous = _generated_files(ann_file)  # what the set being replaced listed
    images, annotations = [], []
    seed, size = settings["seed"], settings["image_size"]
    for index in range(settings["num_images"]):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        pixels, objects = render_image(rng, size, settings["colour_by_class"])
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        _atomic_save(Image.fromarray(pixels), images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, (x, y, w, h), area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": f"dyhead synthetic shapes ({split}, seed {seed})", "generator": settings},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    tmp = ann_file.with_name(ann_file.name + f".tmp{os.getpid()}")
    with _writing(ann_file, tmp):
        tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")))
        os.replace(tmp, ann_file)
    for name in previous - {im["file_name"] for im in images}:  # a smaller set: its stale images go
        (images_dir / name).unlink(missing_ok=True)
    return len(annotations)


def _generated_files(ann_file: Path) -> set[str]:
    """The image file names an earlier synthetic split's JSON lists (ours: it records its generator);
    an empty set when there is none or it is not ours."""
    try:
        data = json.loads(ann_file.read_bytes())
        if not isinstance(data.get("info", {}).get("generator"), dict):
            return set()
        return {Path(im["file_name"]).name for im in data["images"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _atomic_save(image: Image.Image, path: Path) -> None:
    """Save via a temporary file so two processes creating the same data set never see half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with _writing(path, tmp):
        image.save(tmp, format="JPEG", quality=92, subsampling=0)
        os.replace(tmp, path)


@contextlib.contextmanager
def _writing(path: Path, tmp: Path) -> Iterator[None]:
    """A failed write (full disk, read-only folder) is one ``DyheadError`` naming ``path``; no temporary is left."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DyheadError(f"cannot write {path}: {e.strerror or e}") from None


def render_image(
    rng: np.random.Generator, size: int, colour_by_class: bool = False
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int], int]]]:
    """Draw one image: (HxWx3 uint8, [(category_id, tight visible xywh box, visible pixel count)])."""
    image = _background(rng, size)
    texture = 10.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    placed: list[tuple[int, np.ndarray, np.ndarray]] = []  # (category id, full mask, colour), bottom first
    visible: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _try in range(PLACEMENT_TRIES):
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            mask = _shape_mask(rng, category["name"], size)
            if mask.sum() < MIN_VISIBLE_PIXELS:
                continue
            # the new shape lies on top: the ones below must keep enough of themselves to stay recognisable
            trimmed = [v & ~mask for v in visible]
            if all(t.sum() >= MIN_VISIBLE_FRACTION * full.sum() for t, (_, full, _) in zip(trimmed, placed)):
                break
        else:
            continue
        hue = CLASS_HUES[category["id"]] if colour_by_class else None
        colour = np.array(_bright_colour(rng, hue), dtype=np.float32)
        placed.append((category["id"], mask, colour))
        visible = trimmed + [mask.copy()]
    objects = []
    canvas = image
    for (category_id, mask, colour), seen in zip(placed, visible):
        canvas[mask] = colour + texture[mask]
        ys, xs = np.nonzero(seen)
        x1, y1 = int(xs.min()), int(ys.min())
        box = (x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1)  # pixel edges: [x1, x2)
        objects.append((category_id, box, int(seen.sum())))
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour blotches plus pixel noise, so a shape cannot be found by a flat-colour test."""
    base = rng.uniform(20, 110, 3)
    blotches = rng.uniform(-1, 1, (int(rng.integers(3, 9)),) * 2 + (3,))
    small = Image.fromarray(((blotches + 1) * 127.5).astype(np.uint8))
    smooth = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    noise = 9.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return base.astype(np.float32) + 45 * smooth + noise  # clipped once, after the shapes are drawn


def _bright_colour(rng: np.random.Generator, hue: float | None = None) -> tuple[float, float, float]:
    """Any hue, or one within CLASS_HUE_SPREAD of ``hue`` (one draw either way, so the rest of the image
    stream is the same)."""
    h = rng.uniform() if hue is None else (hue + rng.uniform(-CLASS_HUE_SPREAD, CLASS_HUE_SPREAD)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.65, 1.0))
    return r * 255, g * 255, b * 255


def _shape_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A boolean (size, size) mask of one shape; diameters are log-uniform so small and large are common."""
    diameter = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(MAX_OBJECT_FRACTION * size)))
    margin = 0.25 * diameter  # a shape may hang over the border by at most about a quarter
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = diameter / 2
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        if name == "square":
            local = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
            local = [(x * r, y * r) for x, y in local]
        elif name == "triangle":
            local = [(1.1 * r * math.cos(a), 1.1 * r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
        else:  # cross: a plus sign with arms a third of the diameter wide
            a, b = r, r / 3
            local = [(b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                     (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b), (a, b)]  # fmt: skip
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in local], fill=1)
    return np.asarray(canvas, dtype=bool)
