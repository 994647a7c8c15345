"""COCO-format detection data: the Dataset, the batch collate and a DataLoader builder.

Category ids in COCO files have gaps (COCO itself uses 1..90 for 80 classes); the model wants labels
0..K-1, so the dataset keeps both mappings. Every mistake in the user's files (bad JSON, missing keys,
missing or corrupt images) is a ``DyheadError`` that names the file, because that is what the user
has to go and fix.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import struct
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from dyhead_cli.data.synthetic import ensure_synthetic
from dyhead_cli.data.transforms import MIN_BOX_SIDE, test_transform, train_transform
from dyhead_cli.errors import DyheadError

# what PIL raises on unreadable files (UnidentifiedImageError is an OSError; plugins also raise the rest)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "categories": ("id",),
    "annotations": ("id", "image_id", "category_id", "bbox"),
}


def read_annotation_file(path: str | Path, require_annotations: bool = False) -> dict[str, Any]:
    """Load a COCO JSON file and check the structure pycocotools relies on; a ``DyheadError`` otherwise.

    'annotations' may be absent (test-dev style image lists) unless ``require_annotations``.
    """
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyheadError(f"annotation file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DyheadError(f"annotation file {path} must hold a JSON object, got {type(data).__name__}")
    if "annotations" not in data and not require_annotations:
        data["annotations"] = []
    for key, fields in REQUIRED_KEYS.items():
        if key not in data:
            raise DyheadError(f"annotation file {path} has no '{key}' list (is it a COCO detection file?)")
        if not isinstance(data[key], list):
            raise DyheadError(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DyheadError(f"annotation file {path}: {key}[{i}] lacks {', '.join(repr(f) for f in missing)}")
            bad = [f for f in ("id", "image_id", "category_id") if f in entry and not is_id(entry[f])]
            if bad:
                raise DyheadError(f"annotation file {path}: {key}[{i}] has a non-scalar {bad[0]!r}: {entry[bad[0]]!r}")
    if not data["categories"]:
        raise DyheadError(f"annotation file {path} has no categories")
    if not data["images"]:
        raise DyheadError(f"annotation file {path} lists no images")
    return data


def is_id(value: Any) -> bool:
    """Ids are dictionary keys in pycocotools: ints (or strings), never lists, floats or booleans."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


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


class CocoDetection(Dataset):
    """Images and boxes of a COCO detection file.

    Items are dicts: ``image`` uint8 (3, H, W) after ``transform``; ``boxes`` float32 (N, 4) xyxy in that
    image's pixels; ``labels`` int64 (N,) in 0..K-1; ``image_id``; ``orig_size`` and ``size`` as (h, w).
    Crowd and zero-area boxes are not training targets (COCO evaluation handles crowds on its own).
    With ``skip_corrupt`` an unreadable image gives ``None`` (``collate`` drops and counts it).
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        transform: Callable[..., dict[str, Any]] | None = None,
        skip_corrupt: bool = False,
        remove_empty: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.num_skipped = 0  # in this process only; DataLoader workers count in their own copies
        data = read_annotation_file(self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.label_of_cat: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.cat_of_label: dict[int, int] = dict(enumerate(self.cat_ids))
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]
        self._targets = self._index_targets(data["annotations"])
        ids = sorted(self.coco.imgs)
        if remove_empty:
            ids = [i for i in ids if len(self._targets[i][1])]
        self.ids: list[int] = ids

    def _index_targets(self, annotations: list[dict[str, Any]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (xyxy boxes (N, 4) float32, labels (N,) int64) of the usable annotations, in one pass."""
        boxes: dict[int, list[list[float]]] = {i: [] for i in self.coco.imgs}
        labels: dict[int, list[int]] = {i: [] for i in self.coco.imgs}
        for i, ann in enumerate(annotations):
            where = f"annotation file {self.ann_file}: annotations[{i}] (id {ann.get('id')})"
            if ann["image_id"] not in boxes:
                raise DyheadError(f"{where} refers to unknown image id {ann['image_id']!r}")
            if ann["category_id"] not in self.label_of_cat:
                raise DyheadError(f"{where} refers to unknown category id {ann['category_id']!r}")
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise DyheadError(f"{where} has a malformed bbox {bbox!r} (want [x, y, w, h])")
            x, y, w, h = (float(v) for v in bbox)
            if ann.get("iscrowd", 0) or not (w > 0 and h > 0) or not all(map(math.isfinite, (x, y, w, h))):
                continue
            boxes[ann["image_id"]].append([x, y, x + w, y + h])
            labels[ann["image_id"]].append(self.label_of_cat[ann["category_id"]])
        return {
            i: (np.asarray(boxes[i], np.float32).reshape(-1, 4), np.asarray(labels[i], np.int64))
            for i in boxes
        }

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image_id = self.ids[index]
        try:
            image = load_rgb(self.image_path(index))
        except DyheadError:
            if not self.skip_corrupt:
                raise
            self.num_skipped += 1
            return None
        width, height = image.size
        boxes, labels = self._targets[image_id]
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)  # annotations may overhang the image a little
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = _nondegenerate(boxes)
        boxes, labels = boxes[keep], labels[keep]
        pixels = np.asarray(image)
        if self.transform is not None:
            out = self.transform(image=pixels, bboxes=boxes, labels=labels)
            pixels = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], np.int64).reshape(-1)
            keep = _nondegenerate(boxes)
            boxes, labels = boxes[keep], labels[keep]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),  # (H, W, 3) -> (3, H, W)
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, np.int64)),
            "image_id": int(image_id),
            "orig_size": (height, width),
            "size": (int(pixels.shape[0]), int(pixels.shape[1])),
        }


def _nondegenerate(boxes: np.ndarray) -> np.ndarray:
    return ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)


def collate(batch: Sequence[dict[str, Any] | None], size_divisibility: int = 128) -> dict[str, Any]:
    """Stack items into one zero-padded float batch (values stay 0..255; normalisation is the model's job).

    ``images`` is (B, 3, Hp, Wp) with Hp, Wp the largest size rounded up to ``size_divisibility`` (so every
    FPN level divides evenly); ``image_sizes`` keeps each image's real (h, w). ``None`` items (skipped
    corrupt images) are dropped and counted in ``num_skipped``; a batch of only ``None`` has B = 0.
    """
    items = [b for b in batch if b is not None]
    num_skipped = len(batch) - len(items)
    div = max(1, int(size_divisibility))
    if items:
        max_h = max(it["image"].shape[1] for it in items)
        max_w = max(it["image"].shape[2] for it in items)
        pad_h, pad_w = -(-max_h // div) * div, -(-max_w // div) * div
    else:
        pad_h = pad_w = 0
    images = torch.zeros((len(items), 3, pad_h, pad_w), dtype=torch.float32)
    for i, it in enumerate(items):
        _, h, w = it["image"].shape
        images[i, :, :h, :w] = it["image"]
    return {
        "images": images,
        "image_sizes": [tuple(it["size"]) for it in items],
        "orig_sizes": [tuple(it["orig_size"]) for it in items],
        "image_ids": [it["image_id"] for it in items],
        "targets": [{"boxes": it["boxes"], "labels": it["labels"]} for it in items],
        "num_skipped": num_skipped,
    }


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (forked workers would share the parent's)."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def build_dataset(cfg: Any, split: str, seed: int = 0) -> CocoDetection:
    """The ``split`` ("train" | "val") data set of a ``DataConfig``, with that split's transforms.

    Training drops images without usable boxes (as detectron2 does); evaluation keeps every image.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ensure_synthetic(cfg)
    if split == "train":
        transform = train_transform(cfg.min_sizes, cfg.max_size, cfg.hflip_prob, cfg.color_jitter, seed=seed)
        dataset = CocoDetection(cfg.train_images, cfg.train_ann, transform, cfg.skip_corrupt, remove_empty=True)
        if not dataset.ids:
            raise DyheadError(f"training annotation file {cfg.train_ann} has no usable boxes")
        return dataset
    transform = test_transform(cfg.test_min_size, cfg.max_size)
    return CocoDetection(cfg.val_images, cfg.val_ann, transform, cfg.skip_corrupt)


def build_dataloader(
    cfg: Any,
    split: str,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``build_dataset(cfg, split)`` that yields ``collate`` batches.

    ``seed`` fixes the shuffling order and the augmentations (per worker), so a run can be repeated.
    """
    dataset = build_dataset(cfg, split, seed=seed)
    workers = cfg.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=partial(collate, size_divisibility=cfg.size_divisibility),
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )

