"""COCO-format detection data: the Dataset and the data set of a recipe split.

Category ids in COCO files have gaps (COCO itself uses 1..90 for 80 classes); the model wants labels
0..K-1, so the dataset keeps both mappings. Every mistake in the user's files (bad JSON, missing keys,
missing or corrupt images) is a ``DyheadError`` that names the file, because that is what the user
has to go and fix.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from dyhead_cli.data.annotations import read_annotation_file
from dyhead_cli.data.images import load_rgb
from dyhead_cli.data.synthetic import ensure_synthetic
from dyhead_cli.data.transforms import MIN_BOX_SIDE, test_transform, train_transform
from dyhead_cli.errors import DyheadError


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
        return {i: (np.asarray(boxes[i], np.float32).reshape(-1, 4), np.asarray(labels[i], np.int64)) for i in boxes}

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def _check_size(self, index: int, width: int, height: int) -> None:
        """The image as loaded (EXIF orientation applied) must be as large as the file says, else its boxes
        land elsewhere: refused, as detectron2's ``check_image_size`` does (``dyhead data check`` lists all)."""
        record = self.coco.imgs[self.ids[index]]
        said = record.get("width"), record.get("height")
        if None in said or said == (width, height):
            return
        turned = " (the size before its EXIF rotation: give the size as shown)" if said == (height, width) else ""
        raise DyheadError(
            f"image {self.image_path(index)} is {width}x{height} but {self.ann_file} says {said[0]}x{said[1]}{turned}; "
            f"its boxes would not fit it (dyhead data check lists every such image)"
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image_id = self.ids[index]
        try:
            image = load_rgb(self.image_path(index))
        except DyheadError as e:
            if not self.skip_corrupt:
                raise DyheadError(
                    f"{e}, listed in {self.ann_file} (data.skip_corrupt = true skips unreadable images; "
                    "dyhead data check lists every problem of the data set)"
                ) from None
            self.num_skipped += 1
            return None
        width, height = image.size
        self._check_size(index, width, height)
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


def build_dataset(cfg: Any, split: str, seed: int = 0) -> CocoDetection:
    """The ``split`` ("train" | "val") data set of a ``DataConfig``, with that split's transforms.

    Training drops images without usable boxes (as detectron2 does); evaluation keeps every image.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ensure_synthetic(cfg)
    if split == "train":
        transform = train_transform(
            cfg.min_sizes, cfg.max_size, cfg.hflip_prob, cfg.color_jitter, seed=seed, backend=cfg.resize_backend
        )
        dataset = CocoDetection(cfg.train_images, cfg.train_ann, transform, cfg.skip_corrupt, remove_empty=True)
        if not dataset.ids:
            raise DyheadError(f"training annotation file {cfg.train_ann} has no usable boxes")
        return dataset
    transform = test_transform(cfg.test_min_size, cfg.max_size, cfg.resize_backend)
    return CocoDetection(cfg.val_images, cfg.val_ann, transform, cfg.skip_corrupt)
