"""Tiled inference for large images (SAHI-style): overlapping crops, each resized by the recipe as a
whole image would be, their detections shifted back and merged with the whole image's by NMS.

A small object in a large image shrinks with the image to the recipe's ``test_min_size``; inside a
crop of ``size`` pixels it shrinks far less, so the detector sees it at a scale it knows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from dyhead_cli.errors import DyheadError


def check_tiling(size: int, overlap: float) -> None:
    if size < 32:
        raise DyheadError(f"--tile must be at least 32 pixels, got {size}")
    if not 0.0 <= overlap < 1.0:
        raise DyheadError(f"--tile-overlap must be in [0, 1), got {overlap}")


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Crops (x0, y0, x1, y1) of at most ``size`` x ``size`` covering an image, neighbours overlapping by
    ``overlap`` of ``size``; the last row and column sit flush with the image's edge. None for an image
    that fits in one tile (the whole image is predicted anyway)."""
    if height <= size and width <= size:
        return []
    step = max(1, int(round(size * (1.0 - overlap))))
    ys, xs = _starts(height, size, step), _starts(width, size, step)
    return [(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs]


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    if not starts or starts[-1] != length - size:
        starts.append(length - size)
    return starts


def merge_tiles(parts: Sequence[dict], offsets: Sequence[tuple[int, int]], iou: float, max_det: int) -> dict:
    """One image's detections from its tiles': boxes (N_t, 4) in tile pixels are shifted by the tile's
    (x0, y0), then class-wise NMS at ``iou`` and the ``max_det`` best are kept (sorted by score). One tile
    (an image that fits in it) is the model's own detections: a second NMS, on boxes the head has already
    clipped, would drop some that the head's own NMS (before clipping) kept."""
    if len(parts) == 1:
        (x, y), part = offsets[0], parts[0]
        return {**part, "boxes": part["boxes"].float() + part["boxes"].new_tensor([x, y, x, y]).float()}
    boxes = torch.cat([p["boxes"].float() + p["boxes"].new_tensor([x, y, x, y]).float() for p, (x, y) in zip(parts, offsets)])
    scores = torch.cat([p["scores"].float() for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    keep = batched_nms(boxes, scores, labels, iou)[:max_det]  # indices by decreasing score
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
