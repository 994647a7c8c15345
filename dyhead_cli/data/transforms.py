"""Albumentations pipelines for training (multi-scale, flip, colour jitter) and testing (one size).

The resize is detectron2's ResizeShortestEdge, so recipes carried over from detectron2/DyHead give the
same image sizes: shorter side = s, unless the longer side would then exceed ``max_size``, in which case
the longer side = ``max_size``. Boxes are pascal_voc (x1, y1, x2, y2 in pixels) with a ``labels`` field;
boxes that become degenerate are dropped with their labels.

A pipeline is called as ``t(image=HxWx3 uint8, bboxes=(N, 4) float, labels=(N,) int)`` and returns a
dict with the same keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# albumentations asks PyPI for a newer version of itself on import, unless this is set: a request on every
# run (a warning offline, a 2-second wait where the network drops packets). Users may still set it to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402  (after the line above)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dyhead_cli.errors import DyheadError, check_choice  # noqa: E402

MIN_BOX_SIDE = 1e-3  # px; narrower boxes after a transform carry no signal and break box encodings
# How images are resized (the recipe key data.resize_backend): "cv2", OpenCV's bilinear (MMDetection's
# default and its DyHead "simple" config); "pillow", Pillow's bilinear, which smooths when it shrinks
# (detectron2, so the official DyHead, resizes uint8 images so; MMDetection's reproduction and Swin-L
# configs set backend='pillow'). Shrinking, the two differ by 1.7 grey levels on average (up to 18).
RESIZE_BACKENDS = ("cv2", "pillow")


def resize_image(img: np.ndarray, new_h: int, new_w: int, backend: str = "cv2") -> np.ndarray:
    """(H, W, C) uint8 -> (new_h, new_w, C), bilinear with ``backend`` (see ``RESIZE_BACKENDS``)."""
    if backend == "pillow":
        return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BILINEAR))
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) for resizing the shorter side to ``short`` with the longer side capped at ``max_size``.

    Same arithmetic (and rounding) as detectron2's ``ResizeShortestEdge.get_output_shape``: the shorter side
    is set to ``short`` itself, not ``side * (short / side)``, which is a hair under it for some sides (151 x
    302 -> 666 x 1333 in detectron2, 667 x 1333 so computed: 58 of a million (h, w) pairs at 800 / 1333).
    MMDetection's ``rescale_size`` (``int(side * min(long / max, short / min) + 0.5)`` for both sides)
    differs from detectron2 in 186 of those pairs; this follows the official code.
    """
    scale = short / min(height, width)
    new_h, new_w = (float(short), width * scale) if height < width else (height * scale, float(short))
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class ResizeShortestEdge(A.DualTransform):
    """Resize so the shorter side is one of ``min_sizes`` (drawn per image), the longer side <= ``max_size``."""

    def __init__(self, min_sizes: Sequence[int], max_size: int, backend: str = "cv2", p: float = 1.0):
        super().__init__(p=p)
        check_choice("data.resize_backend", backend, RESIZE_BACKENDS)
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.backend = backend

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.min_sizes[0] if len(self.min_sizes) == 1 else self.py_random.choice(self.min_sizes)
        new_h, new_w = shortest_edge_size(height, width, short, self.max_size)
        return {"new_h": new_h, "new_w": new_w}

    def apply(self, img: np.ndarray, new_h: int, new_w: int, **params: Any) -> np.ndarray:
        if img.shape[:2] == (new_h, new_w):
            return img
        return resize_image(img, new_h, new_w, self.backend)

    def apply_to_mask(self, mask: np.ndarray, new_h: int, new_w: int, **params: Any) -> np.ndarray:
        return cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # albumentations keeps boxes normalised to the image size, so a resize leaves them be

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_sizes", "max_size", "backend")


def _check_sizes(min_sizes: Sequence[int], max_size: int) -> None:
    if not min_sizes or any(int(s) < 1 for s in min_sizes):
        raise DyheadError(f"data.min_sizes must be a non-empty list of positive sizes, got {list(min_sizes)}")
    if max_size < 1:
        raise DyheadError(f"data.max_size must be positive, got {max_size}")


def _bbox_params() -> A.BboxParams:
    # clip + filter_invalid: boxes a hair outside the image are clipped instead of raising inside albumentations
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_width=MIN_BOX_SIDE,
        min_height=MIN_BOX_SIDE,
        clip=True,
        filter_invalid_bboxes=True,
    )


def train_transform(
    min_sizes: Sequence[int],
    max_size: int,
    hflip_prob: float,
    color_jitter: float,
    seed: int | None = None,
    backend: str = "cv2",
) -> A.Compose:
    """Multi-scale resize (with ``backend``), horizontal flip with ``hflip_prob``, colour jitter of strength
    ``color_jitter``.

    ``seed`` fixes the augmentation stream in this process; DataLoader workers reseed it (see coco.py).
    """
    _check_sizes(min_sizes, max_size)
    steps: list[Any] = [ResizeShortestEdge(min_sizes, max_size, backend)]
    if hflip_prob > 0:
        steps.append(A.HorizontalFlip(p=hflip_prob))
    if color_jitter > 0:
        j = float(color_jitter)
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0))
    return A.Compose(steps, bbox_params=_bbox_params(), seed=seed)


def test_transform(min_size: int, max_size: int, backend: str = "cv2") -> A.Compose:
    """The deterministic evaluation resize (one short-side size, with ``backend``)."""
    _check_sizes([min_size], max_size)
    return A.Compose([ResizeShortestEdge([min_size], max_size, backend)], bbox_params=_bbox_params(), seed=0)


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when a test module imports it
