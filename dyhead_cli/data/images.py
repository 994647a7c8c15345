"""Which images a command works on, and reading them: folders, file lists, a COCO file's image list.

Every command that takes images (``predict``, ``visualize``, the data sets) reads them through
``load_rgb`` (EXIF orientation applied, any PIL mode to RGB) and lists folders through ``find_images``.

Image ids: with an annotation file, its own ids; otherwise images are numbered 1..N in the order of their
sorted relative paths (relative to the deepest folder holding every input, ``root``).
Annotation files: an image's ``file_name`` is looked up under ``images_dir`` when given; else under the
recipe's ``data.val_images`` (or ``train_images``) when the file is the recipe's ``data.val_ann`` (or
``train_ann``); else under the annotation file's own folder.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from dyhead_cli.data.annotations import read_annotation_file
from dyhead_cli.data.transforms import test_transform
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as displayed (EXIF orientation applied) in RGB; a ``DyheadError`` naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except IMAGE_ERRORS as e:
        raise DyheadError(f"cannot read image {path}: {e}") from None

def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit greys are scaled to 0..255."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float32)
        peak = float(grey.max()) if grey.size else 0.0
        if peak > 255:  # 16-bit data: map its range (up to 65535) onto 0..255
            grey = grey * (255.0 / (65535.0 if peak <= 65535 else peak))
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@dataclass
class ImageEntry:
    id: int
    path: Path  # where to read it
    file_name: str  # as written to the image list (relative to ``root``, or the annotation file's name)

@dataclass
class ImageList:
    entries: list[ImageEntry]
    root: Path | None = None  # file names are relative to this folder
    ann_file: Path | None = None
    ann_categories: list[dict[str, Any]] | None = None  # the annotation file's categories, sorted by id

def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS

def find_images(folder: Path, seen: set[str] | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted; hidden files skipped.

    Symbolic links are followed, but each real folder is entered and each real file listed once: a link
    loop ends, and an image reached by two paths is listed under the first (in sorted order). ``seen``
    (real paths) carries this across several folders of one command line.
    """
    seen = set() if seen is None else seen
    found: list[Path] = []
    real = os.path.realpath(folder)
    if real in seen:
        return found
    seen.add(real)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            target = os.path.realpath(os.path.join(dirpath, d))
            if target not in seen:  # a loop, or a folder already listed through another path
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(f for f in filenames if not f.startswith(".") and is_image_file(Path(f))):
            path = Path(dirpath) / f
            target = os.path.realpath(path)
            if target not in seen:
                seen.add(target)
                found.append(path)
    return sorted(found)

def collect_images(paths: Sequence[Path], images_dir: Path | None = None, recipe: Recipe | None = None) -> ImageList:
    """Turn the command line's PATHs into numbered images (see the module docstring for the rules)."""
    if not paths:
        raise DyheadError("give at least one image, folder or COCO annotation file")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise DyheadError(f"no such file or folder: {p}")
    jsons = [p for p in paths if p.is_file() and p.suffix.lower() == ".json"]
    if jsons:
        if len(paths) > 1:
            raise DyheadError("a COCO annotation file must be the only PATH (its image ids would clash with others)")
        return images_from_annotations(jsons[0], images_dir, recipe)
    if images_dir is not None:
        raise DyheadError("--images is only used with a COCO annotation file as PATH")
    files: dict[Path, None] = {}
    seen: set[str] = set()  # real paths already listed (find_images)
    bases: list[Path] = []
    for p in paths:
        p = absolute(p)  # absolute, symlinks kept: a linked image is named where it is linked
        if p.is_dir():
            bases.append(p)
            for f in find_images(p, seen):
                files.setdefault(f, None)
        else:  # an explicitly named file is tried whatever its extension
            bases.append(p.parent)
            files.setdefault(p, None)
    if not files:
        raise DyheadError("no images found in " + ", ".join(str(p) for p in paths) + f" (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    root = Path(os.path.commonpath([str(b) for b in bases]))
    named = sorted((f.relative_to(root).as_posix(), f) for f in files)
    entries = [ImageEntry(i, f, name) for i, (name, f) in enumerate(named, start=1)]
    return ImageList(entries, root=root)

def absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))

def images_from_annotations(
    ann_file: Path, images_dir: Path | None, recipe: Recipe | None = None, data: dict[str, Any] | None = None
) -> ImageList:
    """The images of a COCO file (``data``: its already-read contents) under ``images_dir`` or the default."""
    data = read_annotation_file(ann_file) if data is None else data
    images_dir = Path(images_dir) if images_dir is not None else default_images_dir(ann_file, recipe)
    if not Path(images_dir).is_dir():
        raise DyheadError(f"image folder not found: {images_dir} (for {ann_file}; pass --images DIR)")
    ids = [img["id"] for img in data["images"]]
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise DyheadError(f"annotation file {ann_file}: image ids must be integers for COCO results, got {bad[0]!r}")
    if len(set(ids)) != len(ids):
        raise DyheadError(f"annotation file {ann_file} lists an image id more than once")
    entries = [
        ImageEntry(img["id"], Path(images_dir) / img["file_name"], str(img["file_name"]))
        for img in sorted(data["images"], key=lambda im: im["id"])
    ]
    cats = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in data["categories"]), key=lambda c: c["id"])
    return ImageList(entries, root=absolute(images_dir), ann_file=ann_file, ann_categories=cats)

def default_images_dir(ann_file: Path, recipe: Recipe | None = None) -> Path:
    """The recipe's image folder when ``ann_file`` is one of its annotation files, else the file's folder."""
    if recipe is not None:
        d = recipe.data
        for ann, images in ((d.val_ann, d.val_images), (d.train_ann, d.train_images)):
            if ann and Path(ann).is_file() and same_file(Path(ann), ann_file):
                return Path(images)
    return ann_file.parent

def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

class ImageFiles(Dataset):
    """The images of an ``ImageList`` through the recipe's test transform.

    Items are what ``data.coco.collate`` stacks (no boxes), or ``{"error": message, ...}`` for an image
    that cannot be read, so a worker never dies on a bad file.
    """

    def __init__(self, entries: list[ImageEntry], min_size: int, max_size: int) -> None:
        self.entries = entries
        self.transform = test_transform(min_size, max_size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            image = load_rgb(entry.path)
            width, height = image.size
            pixels = self.transform(image=np.asarray(image), bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
        except Exception as e:  # noqa: BLE001 - any failure on one file is that file's problem, never the run's
            message = str(e) if isinstance(e, DyheadError) else f"cannot read image {entry.path}: {type(e).__name__}: {e}"
            return {"error": message, "image_id": entry.id, "file_name": entry.file_name}
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),  # (H, W, 3) -> (3, H, W)
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": entry.id,
            "file_name": entry.file_name,
            "orig_size": (height, width),
            "size": (int(pixels.shape[0]), int(pixels.shape[1])),
        }
