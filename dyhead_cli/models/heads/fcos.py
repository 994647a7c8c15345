"""FCOS head with the usual improvements (centre sampling, GIoU, stride-normalised ltrb, centerness on the box branch).

Points sit at ((j + 0.5) * stride, (i + 0.5) * stride), like the ATSS anchor centres. A point is positive for
a GT when it lies within ``center_sampling_radius * stride`` of the GT centre (and inside the box) and the
GT's largest ltrb distance falls in the level's size range; an ambiguous point takes the smallest GT.
Regression: ltrb / stride = ReLU(Scale(conv)), so boxes are points -+ distances * stride.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.heads.common import (
    Scale,
    centerness_target,
    check_targets,
    conv_tower,
    decode_ltrb,
    flatten_level,
    focal_giou_centerness_losses,
    grid_centers,
    common_head_kwargs,
    head_defaults_overridden,
    one_hot_targets,
    postprocess_dense,
    predictor,
)
from dyhead_cli.recipe import ModelConfig

INF = float("inf")
# Regression size ranges for P3..P7: the largest of (l, t, r, b) must fall in [low, high] (the official
# inclusive bounds: a distance of exactly 64 is a candidate on P3 and P4).
SIZE_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))


@torch.no_grad()
def fcos_assign(
    points: Tensor, strides: Tensor, size_ranges: Tensor, gt_boxes: Tensor, center_sampling_radius: float
) -> Tensor:
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


class FCOSHead(nn.Module):
    """Anchor-free: class logits, ltrb distances and centerness per location."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        num_convs: int = 4,
        prior_prob: float = 0.01,
        center_sampling_radius: float = 1.5,
        size_ranges: tuple[tuple[float, float], ...] = SIZE_RANGES,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        pred_kernel_size: int = 3,
        tower_norm: str = "gn",
    ) -> None:
        super().__init__()
        if len(size_ranges) != len(strides):
            raise DyheadError(f"FCOS needs one size range per level: {len(strides)} levels, {len(size_ranges)} ranges")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.size_ranges = tuple(size_ranges)
        self.center_sampling_radius = center_sampling_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_n, self.detections_per_img = pre_nms_top_n, detections_per_img

        self.cls_tower = conv_tower(in_channels, num_convs, tower_norm)
        self.bbox_tower = conv_tower(in_channels, num_convs, tower_norm)
        k = pred_kernel_size
        self.cls_logits = predictor(in_channels, num_classes, k, bias=-math.log((1 - prior_prob) / prior_prob))
        self.bbox_pred = predictor(in_channels, 4, k)
        self.centerness = predictor(in_channels, 1, k)
        self.scales = nn.ModuleList(Scale() for _ in self.strides)

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """Levels (B, C, H, W) -> {"cls_logits": (B, K, H, W), "bbox_reg": (B, 4, H, W), "centerness": (B, 1, H, W)}.

        bbox_reg holds (l, t, r, b) / stride >= 0.
        """
        out: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_reg": [], "centerness": []}
        for x, scale in zip(features, self.scales):
            box_feat = self.bbox_tower(x)
            out["cls_logits"].append(self.cls_logits(self.cls_tower(x)))
            out["bbox_reg"].append(F.relu(scale(self.bbox_pred(box_feat))))
            out["centerness"].append(self.centerness(box_feat))
        return out

    def points(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W, 2) points ((j + 0.5) * stride, (i + 0.5) * stride)."""
        return [grid_centers(x.shape[-2:], s, 0.5, x.device) for x, s in zip(outputs["cls_logits"], self.strides)]

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
        cls_logits = torch.cat([flatten_level(x, self.num_classes) for x in outputs["cls_logits"]], 1).float()
        bbox_reg = torch.cat([flatten_level(x, 4) for x in outputs["bbox_reg"]], 1).float()  # (B, N, 4)
        ctr_logits = torch.cat([flatten_level(x, 1) for x in outputs["centerness"]], 1).float()[..., 0]  # (B, N)

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

    @torch.no_grad()
    def postprocess(
        self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """score = sqrt(sigmoid(cls) * sigmoid(centerness)), candidates sigmoid(cls) > score_thresh."""
        scores, candidates, boxes = [], [], []
        for logits, reg, ctr, points, stride in zip(
            outputs["cls_logits"], outputs["bbox_reg"], outputs["centerness"], self.points(outputs), self.strides
        ):
            cls = flatten_level(logits, self.num_classes).float().sigmoid()  # (B, P, K)
            centerness = flatten_level(ctr, 1).float().sigmoid()  # (B, P, 1)
            distances = flatten_level(reg, 4)  # (B, P, 4)
            scores.append((cls * centerness).sqrt())
            candidates.append(cls > self.score_thresh)
            decoded = decode_ltrb(points.repeat(len(distances), 1), distances.flatten(0, 1), stride)
            boxes.append(decoded.view_as(distances))
        return postprocess_dense(
            scores, candidates, boxes, image_sizes, self.pre_nms_top_n, self.nms_thresh, self.detections_per_img
        )


def build_fcos(cfg: ModelConfig, in_channels: int, strides: tuple[int, ...]) -> FCOSHead:
    o = cfg.head_options
    if len(strides) != len(SIZE_RANGES):
        raise DyheadError(f"FCOS is set up for {len(SIZE_RANGES)} levels (P3-P7), got strides {strides}")
    return FCOSHead(
        in_channels,
        cfg.num_classes,
        strides,
        center_sampling_radius=o.center_sampling_radius,
        **common_head_kwargs(o),
        **head_defaults_overridden(o, "pred_kernel_size"),
    )
