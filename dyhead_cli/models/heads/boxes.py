"""Where boxes come from and go to: priors (anchors, points) and the coders between boxes and predictions.

Priors come from the feature shapes and the strides, so a head has no input-size state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grid_centers(size: tuple[int, int], stride: int, offset: float, device: torch.device | None = None) -> Tensor:
    """Centres (x, y) = ((j + offset) * stride, (i + offset) * stride) of an (H, W) map -> (H*W, 2), row-major."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32, device=device) + offset) * stride
    xs = (torch.arange(w, dtype=torch.float32, device=device) + offset) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def anchors_from_centers(centers: Tensor, sizes_wh: Tensor) -> Tensor:
    """Boxes of widths/heights ``sizes_wh`` (A, 2) around every centre (P, 2) -> (P*A, 4) xyxy, anchor fastest."""
    half = sizes_wh.to(centers) / 2  # (A, 2)
    lo = centers[:, None, :] - half[None]  # (P, A, 2)
    hi = centers[:, None, :] + half[None]
    return torch.cat([lo, hi], dim=2).reshape(-1, 4)


class BoxCoder:
    """Anchor-relative deltas (dx, dy, dw, dh), detectron2's ``Box2BoxTransform`` (widths = x2 - x1).

    ``weights`` scale the deltas ((10, 10, 5, 5) in ATSS, (1, 1, 1, 1) in detectron2's RetinaNet);
    dw/dh are clamped at log(1000/16) when decoding so exp() cannot blow up early in training (the official
    code and detectron2 clamp from above only; MMDetection's ``delta2bbox`` clamps to +-log(1000/16), so a
    box is never under 1.6% of its anchor: ``decode(..., clamp_below=True)``).
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """(N, 4) anchors, (N, 4) target boxes -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
        return torch.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=1)

    def decode(self, deltas: Tensor, anchors: Tensor, clamp_below: bool = False) -> Tensor:
        """(N, 4) deltas, (N, 4) anchors -> (N, 4) boxes xyxy (always x2 >= x1, y2 >= y1); ``clamp_below``:
        dw/dh also at least -log(1000/16), as MMDetection decodes."""
        deltas = deltas.float()
        anchors = anchors.to(deltas)
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        low = -self.scale_clamp if clamp_below else None
        dw = (deltas[:, 2] / ww).clamp(min=low, max=self.scale_clamp)
        dh = (deltas[:, 3] / wh).clamp(min=low, max=self.scale_clamp)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def encode_ltrb(points: Tensor, boxes: Tensor, norm: Tensor | float = 1.0) -> Tensor:
    """FCOS targets: distances (l, t, r, b) from points (N, 2) to boxes (N, 4), divided by ``norm`` (the stride)."""
    if isinstance(norm, Tensor):
        norm = norm[:, None]
    lt = points - boxes[:, :2]
    rb = boxes[:, 2:] - points
    return torch.cat([lt, rb], dim=1) / norm


def decode_ltrb(points: Tensor, distances: Tensor, norm: Tensor | float = 1.0) -> Tensor:
    """Inverse of ``encode_ltrb``: (N, 2) points and (N, 4) distances -> (N, 4) boxes xyxy."""
    if isinstance(norm, Tensor):
        norm = norm[:, None]
    d = distances.float() * norm
    points = points.to(d)
    return torch.cat([points - d[:, :2], points + d[:, 2:]], dim=1)


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for points (N, 2) strictly inside boxes (N, 4)."""
    ltrb = encode_ltrb(points, boxes)
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return ratio.clamp(min=0).sqrt()
