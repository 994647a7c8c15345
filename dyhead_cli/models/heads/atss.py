"""ATSS head as the official DyHead code uses it (microsoft/DynamicHead ``extra/atss.py``).

One square anchor of ``anchor_scale * stride`` per location (centres at (i + 0.5) * stride); adaptive
training sample selection picks positives; (dx, dy, dw, dh) deltas with weights (10, 10, 5, 5), decoded
and trained with a centerness-weighted GIoU loss (weight 2, the official REG_LOSS_WEIGHT). Predictors
are 1x1 convs as in the official head (MMDetection's port uses 3x3: ``pred_kernel_size``); with DyHead
there is no extra tower (``num_convs = 0``). Branches, losses and post-processing: ``heads/dense.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from dyhead_cli.models.heads.boxes import BoxCoder, centerness_target
from dyhead_cli.models.heads.dense import AnchorHead, HeadSpec, dense_head_kwargs
from dyhead_cli.models.heads.losses import check_targets, focal_giou_centerness_losses, one_hot_targets
from dyhead_cli.recipe import ModelConfig


@torch.no_grad()
def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int) -> Tensor:
    """Adaptive training sample selection for one image: the matched GT index per anchor, -1 = background.

    anchors (N, 4) xyxy with levels concatenated (``num_per_level`` anchors each); gt_boxes (G, 4).
    1. candidates: per level the ``topk`` anchors whose centres are closest (L2) to each GT centre;
    2. threshold per GT: mean + std (unbiased) of the candidates' IoUs;
    3. positives: candidate IoU >= threshold and anchor centre inside the GT (min distance > 0.01);
    4. an anchor positive for several GTs takes the one with the highest IoU.
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0:
        return matched
    ious = box_iou(anchors, gt_boxes)  # (N, G)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
    distances = (centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(-1).sqrt()  # (N, G)

    candidates = []
    start = 0
    for count in num_per_level:
        k = min(topk, count)
        closest = distances[start : start + count].topk(k, dim=0, largest=False).indices  # (k, G)
        candidates.append(closest + start)
        start += count
    candidates = torch.cat(candidates)  # (C, G): anchor indices per GT
    candidate_ious = ious.gather(0, candidates)  # (C, G)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)  # (G,)

    cxy = centers[candidates]  # (C, G, 2)
    inside = torch.cat([cxy - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - cxy], dim=2).amin(dim=2) > 0.01
    is_pos = (candidate_ious >= threshold[None]) & inside  # (C, G)

    # IoU of each (anchor, GT) positive pair, -1 elsewhere; the best GT per anchor wins.
    pos_ious = torch.full_like(ious, -1.0)
    gt_index = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
    pos_ious[candidates[is_pos], gt_index[is_pos]] = candidate_ious[is_pos]
    best_iou, best_gt = pos_ious.max(dim=1)
    return torch.where(best_iou > -1.0, best_gt, matched)


class ATSSHead(AnchorHead):
    """Class logits, box deltas and centerness per location, one anchor each (official ATSS/DyHead head).

    ``options``: the ``DenseHead`` keyword arguments (towers, predictors, focal loss, post-processing).
    """

    # configs/dyhead_*_atss_*.yaml: ANCHOR_GENERATOR.OFFSET 0.5; extra/atss.py: 1x1 predictors, no tower
    DEFAULTS = {"anchor_offset": 0.5, "pred_kernel_size": 1, "num_convs": 0, "nms_thresh": 0.6}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        anchor_scale: float = 8.0,
        topk: int = 9,
        box_loss_weight: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(in_channels, num_classes, strides, centerness=True, scales=True, **options)
        self.anchor_scale = anchor_scale
        self.topk = topk
        self.box_loss_weight = box_loss_weight
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def cell_sizes(self, stride: int) -> Tensor:
        """One square anchor of side ``anchor_scale * stride``."""
        return torch.full((1, 2), self.anchor_scale * stride)

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box", "loss_centerness"}; ``image_sizes`` is unused (as in the official code)."""
        check_targets(targets, self.num_classes)
        level_anchors = self.anchors(outputs)
        anchors = torch.cat(level_anchors)  # (N, 4)
        num_per_level = [len(a) for a in level_anchors]
        cls_logits, bbox_reg, ctr_logits = self.flat_outputs(outputs)  # (B, N, K), (B, N, 4), (B, N)

        matches = [atss_assign(anchors, num_per_level, t["boxes"].to(anchors), self.topk) for t in targets]
        cls_targets, img, idx, gt = one_hot_targets(matches, targets, self.num_classes)
        anchors_pos = anchors[idx]
        return focal_giou_centerness_losses(
            cls_logits.flatten(0, 1),
            cls_targets.flatten(0, 1),
            self.box_coder.decode(bbox_reg[img, idx], anchors_pos),
            gt,
            ctr_logits[img, idx],
            centerness_target((anchors_pos[:, :2] + anchors_pos[:, 2:]) / 2, gt),
            self.focal_alpha,
            self.focal_gamma,
            self.box_loss_weight,
        )


def atss_options(cfg: ModelConfig, strides: tuple[int, ...]) -> dict[str, Any]:
    o = cfg.head_options
    return {"anchor_scale": o.anchor_scale, "topk": o.atss_topk, "box_loss_weight": o.box_loss_weight, **dense_head_kwargs(o)}


SPEC = HeadSpec(ATSSHead, atss_options)
