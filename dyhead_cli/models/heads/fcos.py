"""FCOS head with the usual improvements (centre sampling, GIoU, stride-normalised ltrb, centerness on the box branch).

Points sit at ((j + 0.5) * stride, (i + 0.5) * stride), like the ATSS anchor centres. A point is positive for
a GT when it lies within ``center_sampling_radius * stride`` of the GT centre (and inside the box) and the
GT's largest ltrb distance falls in the level's size range; an ambiguous point takes the smallest GT.
Regression: ltrb / stride = ReLU(Scale(conv)), so boxes are points -+ distances * stride.
Branches, losses and post-processing: ``heads/dense.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.heads.boxes import centerness_target, decode_ltrb, grid_centers
from dyhead_cli.models.heads.dense import DenseHead, HeadSpec, dense_head_kwargs
from dyhead_cli.models.heads.losses import check_targets, focal_giou_centerness_losses, one_hot_targets
from dyhead_cli.recipe import ModelConfig

INF = float("inf")
# Regression size ranges for P3..P7: the largest of (l, t, r, b) must fall in [low, high] (the official
# inclusive bounds: a distance of exactly 64 is a candidate on P3 and P4).
SIZE_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))


@torch.no_grad()
def fcos_assign(points: Tensor, strides: Tensor, size_ranges: Tensor, gt_boxes: Tensor, center_sampling_radius: float) -> Tensor:
    """The matched GT index per point for one image, -1 = background.

    points (P, 2) xy, strides (P,) and size_ranges (P, 2) of each point's level, gt_boxes (G, 4).
    ``center_sampling_radius`` <= 0 turns centre sampling off (every point inside the box is a candidate).
    """
    matched = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    if gt_boxes.shape[0] == 0:
        return matched
    xy = points[:, None, :]  # (P, 1, 2)
    ltrb = torch.cat([xy - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - xy], dim=2)  # (P, G, 4)
    if center_sampling_radius > 0:
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
        radius = (strides * center_sampling_radius)[:, None, None]  # (P, 1, 1)
        lo = torch.maximum(centers[None] - radius, gt_boxes[None, :, :2])  # (P, G, 2): sub-box inside the GT
        hi = torch.minimum(centers[None] + radius, gt_boxes[None, :, 2:])
        inside = torch.cat([xy - lo, hi - xy], dim=2).amin(dim=2) > 0
    else:
        inside = ltrb.amin(dim=2) > 0
    reach = ltrb.amax(dim=2)  # (P, G)
    in_range = (reach >= size_ranges[:, None, 0]) & (reach <= size_ranges[:, None, 1])

    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # (G,)
    areas = torch.where(inside & in_range, areas[None, :], torch.full_like(reach, INF))  # (P, G)
    smallest, gt_index = areas.min(dim=1)
    return torch.where(smallest < INF, gt_index, matched)


class FCOSHead(DenseHead):
    """Anchor-free: class logits, ltrb distances and centerness per location.

    ``options``: the ``DenseHead`` keyword arguments (towers, predictors, focal loss, post-processing).
    """

    DEFAULTS = {"anchor_offset": 0.5, "pred_kernel_size": 3, "num_convs": 4, "nms_thresh": 0.6}  # points mid-cell

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        center_sampling_radius: float = 1.5,
        size_ranges: tuple[tuple[float, float], ...] = SIZE_RANGES,
        **options: Any,
    ) -> None:
        if len(size_ranges) != len(strides):
            raise DyheadError(f"FCOS needs one size range per level: {len(strides)} levels, {len(size_ranges)} ranges")
        super().__init__(in_channels, num_classes, strides, centerness=True, scales=True, nonnegative_reg=True, **options)
        self.size_ranges = tuple(size_ranges)
        self.center_sampling_radius = center_sampling_radius

    def points(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W, 2) points ((j + offset) * stride, (i + offset) * stride), offset 0.5 by default."""
        return [grid_centers(x.shape[-2:], s, self.anchor_offset, x.device) for x, s in zip(outputs["cls_logits"], self.strides)]

    priors = points

    def decode(self, deltas: Tensor, priors: Tensor, level: int) -> Tensor:
        """bbox_reg holds (l, t, r, b) / stride >= 0."""
        return decode_ltrb(priors, deltas, self.strides[level])

    def locations(self, outputs: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """All levels concatenated: points (N, 2), their strides (N,) and size ranges (N, 2)."""
        level_points = self.points(outputs)
        points = torch.cat(level_points)
        strides = torch.cat([points.new_full((len(p),), float(s)) for p, s in zip(level_points, self.strides)])
        ranges = torch.cat([points.new_tensor(r).expand(len(p), 2) for p, r in zip(level_points, self.size_ranges)])
        return points, strides, ranges

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box", "loss_centerness"}; ``image_sizes`` is unused (padding points are negatives)."""
        check_targets(targets, self.num_classes)
        points, strides, ranges = self.locations(outputs)  # (N, 2), (N,), (N, 2)
        cls_logits, bbox_reg, ctr_logits = self.flat_outputs(outputs)  # (B, N, K), (B, N, 4), (B, N)

        r = self.center_sampling_radius
        matches = [fcos_assign(points, strides, ranges, t["boxes"].to(points), r) for t in targets]
        cls_targets, img, idx, gt = one_hot_targets(matches, targets, self.num_classes)
        return focal_giou_centerness_losses(
            cls_logits.flatten(0, 1),
            cls_targets.flatten(0, 1),
            decode_ltrb(points[idx], bbox_reg[img, idx], strides[idx]),
            gt,
            ctr_logits[img, idx],
            centerness_target(points[idx], gt),
            self.focal_alpha,
            self.focal_gamma,
        )


def fcos_options(cfg: ModelConfig, strides: tuple[int, ...]) -> dict[str, Any]:
    if len(strides) != len(SIZE_RANGES):
        raise DyheadError(f"FCOS is set up for {len(SIZE_RANGES)} levels (P3-P7), got strides {strides}")
    o = cfg.head_options
    return {"center_sampling_radius": o.center_sampling_radius, **dense_head_kwargs(o)}


SPEC = HeadSpec(FCOSHead, fcos_options)
