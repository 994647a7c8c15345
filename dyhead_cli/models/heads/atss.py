"""ATSS head as the official DyHead code uses it (microsoft/DynamicHead ``extra/atss.py``).

One square anchor of ``anchor_scale * stride`` per location (centres at (i + 0.5) * stride); adaptive
training sample selection picks positives; (dx, dy, dw, dh) deltas with weights (10, 10, 5, 5), decoded
and trained with a centerness-weighted GIoU loss (weight 2, the official REG_LOSS_WEIGHT). Predictors
are 1x1 convs as in the official head (MMDetection's port uses 3x3: ``pred_kernel_size``); with DyHead
there is no extra tower (``num_convs = 0``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from dyhead_cli.models.heads.common import (
    BoxCoder,
    Scale,
    anchors_from_centers,
    centerness_target,
    check_targets,
    conv_tower,
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


class ATSSHead(nn.Module):
    """Class logits, box deltas and centerness per location, one anchor each (official ATSS/DyHead head)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        num_convs: int = 0,
        prior_prob: float = 0.01,
        anchor_scale: float = 8.0,
        anchor_offset: float = 0.5,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss_weight: float = 2.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        pred_kernel_size: int = 1,
        tower_norm: str = "gn",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.anchor_scale, self.anchor_offset = anchor_scale, anchor_offset
        self.topk = topk
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss_weight = box_loss_weight
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_n, self.detections_per_img = pre_nms_top_n, detections_per_img
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

        self.cls_tower = conv_tower(in_channels, num_convs, tower_norm)
        self.bbox_tower = conv_tower(in_channels, num_convs, tower_norm)
        k = pred_kernel_size
        self.cls_logits = predictor(in_channels, num_classes, k, bias=-math.log((1 - prior_prob) / prior_prob))
        self.bbox_pred = predictor(in_channels, 4, k)
        self.centerness = predictor(in_channels, 1, k)
        self.scales = nn.ModuleList(Scale() for _ in self.strides)

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """Levels (B, C, H, W) -> {"cls_logits": (B, K, H, W), "bbox_reg": (B, 4, H, W), "centerness": (B, 1, H, W)}."""
        out: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_reg": [], "centerness": []}
        for x, scale in zip(features, self.scales):
            box_feat = self.bbox_tower(x)
            out["cls_logits"].append(self.cls_logits(self.cls_tower(x)))
            out["bbox_reg"].append(scale(self.bbox_pred(box_feat)))
            out["centerness"].append(self.centerness(box_feat))
        return out

    def anchors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W, 4) anchors of side ``anchor_scale * stride`` centred at ((j + offset) s, (i + offset) s)."""
        anchors = []
        for x, stride in zip(outputs["cls_logits"], self.strides):
            centers = grid_centers(x.shape[-2:], stride, self.anchor_offset, x.device)
            anchors.append(anchors_from_centers(centers, torch.full((1, 2), self.anchor_scale * stride)))
        return anchors

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box", "loss_centerness"}; ``image_sizes`` is unused (as in the official code)."""
        check_targets(targets, self.num_classes)
        level_anchors = self.anchors(outputs)
        anchors = torch.cat(level_anchors)  # (N, 4)
        num_per_level = [len(a) for a in level_anchors]
        cls_logits = torch.cat([flatten_level(x, self.num_classes) for x in outputs["cls_logits"]], 1).float()
        bbox_reg = torch.cat([flatten_level(x, 4) for x in outputs["bbox_reg"]], 1).float()  # (B, N, 4)
        ctr_logits = torch.cat([flatten_level(x, 1) for x in outputs["centerness"]], 1).float()[..., 0]  # (B, N)

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

    @torch.no_grad()
    def postprocess(
        self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """score = sqrt(sigmoid(cls) * sigmoid(centerness)), candidates sigmoid(cls) > score_thresh."""
        scores, candidates, boxes = [], [], []
        for logits, reg, ctr, anchors in zip(
            outputs["cls_logits"], outputs["bbox_reg"], outputs["centerness"], self.anchors(outputs)
        ):
            cls = flatten_level(logits, self.num_classes).float().sigmoid()  # (B, P, K)
            centerness = flatten_level(ctr, 1).float().sigmoid()  # (B, P, 1)
            deltas = flatten_level(reg, 4)  # (B, P, 4)
            scores.append((cls * centerness).sqrt())
            candidates.append(cls > self.score_thresh)
            decoded = self.box_coder.decode(deltas.flatten(0, 1), anchors.repeat(len(deltas), 1))
            boxes.append(decoded.view_as(deltas))
        return postprocess_dense(
            scores, candidates, boxes, image_sizes, self.pre_nms_top_n, self.nms_thresh, self.detections_per_img
        )


def build_atss(cfg: ModelConfig, in_channels: int, strides: tuple[int, ...]) -> ATSSHead:
    o = cfg.head_options
    return ATSSHead(
        in_channels,
        cfg.num_classes,
        strides,
        anchor_scale=o.anchor_scale,
        topk=o.atss_topk,
        box_loss_weight=o.box_loss_weight,
        **common_head_kwargs(o),
        **head_defaults_overridden(o, "anchor_offset", "pred_kernel_size"),
    )
