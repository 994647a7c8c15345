"""RetinaNet head as detectron2 (and so the official RetinaNet + DyHead config) runs it.

9 anchors per location: sizes 4 * stride * 2^(0, 1/3, 2/3) x aspect ratios (h/w) 0.5, 1, 2, size-major,
centred at (j * stride, i * stride) (detectron2's default offset 0). IoU >= 0.5 positive, < 0.4 negative,
in between ignored, and each GT's best anchors are positive too (low-quality matches). Deltas use
weights (1, 1, 1, 1); the box loss is GIoU on decoded boxes or smooth L1 on the deltas (the official
DyHead config sets beta = 0, i.e. L1). Losses are divided by this batch's positives (detectron2 divides
by a running average of that count, a training-dynamics detail that does not change the model).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.heads.common import (
    BoxCoder,
    anchors_from_centers,
    check_targets,
    conv_tower,
    flatten_level,
    grid_centers,
    common_head_kwargs,
    head_defaults_overridden,
    num_positives,
    one_hot_targets,
    postprocess_dense,
    predictor,
)
from dyhead_cli.recipe import ModelConfig

BACKGROUND, IGNORE = -1, -2


@torch.no_grad()
def retinanet_match(
    anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.5, bg_iou: float = 0.4, low_quality: bool = True
) -> Tensor:
    """The matched GT index per anchor for one image; -1 = background, -2 = ignored.

    Each anchor takes its highest-IoU GT. With ``low_quality``, the anchors that reach a GT's highest IoU
    (ties included, IoU > 0) are positive for their own best GT even below ``fg_iou`` (detectron2's Matcher).
    """
    matched = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.long, device=anchors.device)
    if gt_boxes.shape[0] == 0:
        return matched
    ious = box_iou(gt_boxes, anchors)  # (G, N)
    best_iou, best_gt = ious.max(dim=0)  # (N,)
    matched = torch.where(best_iou >= fg_iou, best_gt, matched)
    matched[(best_iou >= bg_iou) & (best_iou < fg_iou)] = IGNORE
    if low_quality:
        highest = ious.max(dim=1, keepdim=True).values  # (G, 1)
        is_best = ((ious == highest) & (highest > 0)).any(dim=0)  # (N,)
        matched[is_best] = best_gt[is_best]
    return matched


def cell_anchor_sizes(base_size: float, scales: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """(A, 2) widths and heights: area (base * scale)^2 and h / w = ratio, scale-major (detectron2's order)."""
    sizes = []
    for scale in scales:
        area = (base_size * scale) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            sizes.append((w, ratio * w))
    return torch.tensor(sizes)


class RetinaNetHead(nn.Module):
    """Class logits (A*K) and box deltas (A*4) per location, A = len(scales) * len(aspect_ratios)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        num_convs: int = 4,
        prior_prob: float = 0.01,
        anchor_scale: float = 4.0,
        anchor_offset: float = 0.0,
        scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        fg_iou: float = 0.5,
        bg_iou: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "giou",
        smooth_l1_beta: float = 0.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        pred_kernel_size: int = 3,
        tower_norm: str = "gn",
    ) -> None:
        super().__init__()
        if box_loss not in ("giou", "smooth_l1"):
            raise DyheadError(f"RetinaNet box_loss must be 'giou' or 'smooth_l1', got {box_loss!r}")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.anchor_scale, self.anchor_offset = anchor_scale, anchor_offset
        self.scales, self.aspect_ratios = tuple(scales), tuple(aspect_ratios)
        self.num_anchors = len(self.scales) * len(self.aspect_ratios)
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_n, self.detections_per_img = pre_nms_top_n, detections_per_img
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

        self.cls_tower = conv_tower(in_channels, num_convs, tower_norm)
        self.bbox_tower = conv_tower(in_channels, num_convs, tower_norm)
        k, a = pred_kernel_size, self.num_anchors
        self.cls_logits = predictor(in_channels, a * num_classes, k, bias=-math.log((1 - prior_prob) / prior_prob))
        self.bbox_pred = predictor(in_channels, a * 4, k)

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """Levels (B, C, H, W) -> {"cls_logits": (B, A*K, H, W), "bbox_reg": (B, A*4, H, W)}."""
        return {
            "cls_logits": [self.cls_logits(self.cls_tower(x)) for x in features],
            "bbox_reg": [self.bbox_pred(self.bbox_tower(x)) for x in features],
        }

    def anchors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W*A, 4) anchors, rows ordered (y, x, anchor)."""
        anchors = []
        for x, stride in zip(outputs["cls_logits"], self.strides):
            sizes = cell_anchor_sizes(self.anchor_scale * stride, self.scales, self.aspect_ratios).to(x.device)
            centers = grid_centers(x.shape[-2:], stride, self.anchor_offset, x.device)
            anchors.append(anchors_from_centers(centers, sizes))
        return anchors

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box"}, both divided by the number of positives; ``image_sizes`` is unused."""
        check_targets(targets, self.num_classes)
        anchors = torch.cat(self.anchors(outputs))  # (N, 4)
        cls_logits = torch.cat([flatten_level(x, self.num_classes) for x in outputs["cls_logits"]], 1).float()
        bbox_reg = torch.cat([flatten_level(x, 4) for x in outputs["bbox_reg"]], 1).float()  # (B, N, 4)

        matches = [retinanet_match(anchors, t["boxes"].to(anchors), self.fg_iou, self.bg_iou) for t in targets]
        cls_targets, img, idx, gt = one_hot_targets(matches, targets, self.num_classes)
        valid = torch.stack(matches) != IGNORE  # (B, N)
        anchors_pos, deltas = anchors[idx], bbox_reg[img, idx]

        num_pos = num_positives(len(idx), cls_logits.device)
        loss_cls = sigmoid_focal_loss(
            cls_logits[valid], cls_targets[valid], self.focal_alpha, self.focal_gamma, reduction="sum"
        ) / num_pos
        if len(idx) == 0:
            loss_box = deltas.sum() * 0.0  # 0, and still part of the graph
        elif self.box_loss == "giou":
            pred_boxes = self.box_coder.decode(deltas, anchors_pos)
            loss_box = generalized_box_iou_loss(pred_boxes, gt, reduction="sum") / num_pos
        else:
            target_deltas = self.box_coder.encode(anchors_pos, gt)
            loss_box = F.smooth_l1_loss(deltas, target_deltas, beta=self.smooth_l1_beta, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    @torch.no_grad()
    def postprocess(
        self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """score = sigmoid(cls); candidates above score_thresh."""
        scores, candidates, boxes = [], [], []
        for logits, reg, anchors in zip(outputs["cls_logits"], outputs["bbox_reg"], self.anchors(outputs)):
            cls = flatten_level(logits, self.num_classes).float().sigmoid()  # (B, P*A, K)
            deltas = flatten_level(reg, 4)  # (B, P*A, 4)
            scores.append(cls)
            candidates.append(cls > self.score_thresh)
            decoded = self.box_coder.decode(deltas.flatten(0, 1), anchors.repeat(len(deltas), 1))
            boxes.append(decoded.view_as(deltas))
        return postprocess_dense(
            scores, candidates, boxes, image_sizes, self.pre_nms_top_n, self.nms_thresh, self.detections_per_img
        )


def build_retinanet(cfg: ModelConfig, in_channels: int, strides: tuple[int, ...]) -> RetinaNetHead:
    o = cfg.head_options
    return RetinaNetHead(
        in_channels,
        cfg.num_classes,
        strides,
        box_loss=o.box_loss,
        smooth_l1_beta=o.smooth_l1_beta,
        **common_head_kwargs(o),
        **head_defaults_overridden(o, "anchor_offset", "pred_kernel_size"),
    )
