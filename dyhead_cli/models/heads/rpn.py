"""Region proposal network of the two-stage detector, as detectron2 builds it (the official DyHead R-CNN).

Per level (P2..P6, strides 4..64): one 3x3 conv + ReLU shared by all levels, then 1x1 convs for an
objectness logit and (dx, dy, dw, dh) deltas per anchor. Anchors: one size per level (``anchor_scale *
stride``, 32..512 with the default 8) at aspect ratios (h/w) 0.5, 1, 2, centred at (j * s, i * s).
Training: IoU >= 0.7 positive, < 0.3 negative (each GT also keeps its best anchors), 256 anchors sampled
per image with at most half positives; BCE objectness + L1 deltas, both summed and divided by 256 x images.
Proposals: per level the top ``pre_nms_top_n`` by objectness, decoded, clipped, empty ones dropped, NMS 0.7
within each level, then the ``post_nms_top_n`` best of the image.

torchvision provides the matcher, the sampler and the box coder as detectron2 has them; where torchvision's
own RPN differs from detectron2 we follow detectron2: its anchor generator rounds the anchor corners to
integers (detectron2 does not), its losses use smooth-L1 (beta 1/9) over the sampled count and a mean BCE
(detectron2: L1 and BCE summed over 256 x images), and it drops boxes under 1e-3 px (detectron2: empty ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from dyhead_cli.models.heads.boxes import anchors_from_centers, grid_centers
from dyhead_cli.models.heads.layers import flatten_level


def cell_anchor_sizes(size: float, aspect_ratios: tuple[float, ...]) -> Tensor:
    """(A, 2) anchor (w, h) of area ``size``^2 and h / w = ratio, in ``aspect_ratios`` order (detectron2's)."""
    sizes = []
    for ratio in aspect_ratios:
        w = math.sqrt(size * size / ratio)
        sizes.append((w, ratio * w))
    return torch.tensor(sizes, dtype=torch.float32)


def level_anchors(shape: tuple[int, int], stride: int, sizes_wh: Tensor, device: torch.device) -> Tensor:
    """(H*W*A, 4) xyxy anchors of one level: rows ordered (y, x, anchor), centres at (j * s, i * s)."""
    return anchors_from_centers(grid_centers(shape, stride, 0.0, device), sizes_wh)


class RPNHead(nn.Module):
    """detectron2's ``StandardRPNHead``: names ``conv``, ``objectness_logits``, ``anchor_deltas`` are its keys."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Levels (B, C, H, W) -> objectness logits (B, A, H, W) and deltas (B, A*4, H, W) per level."""
        objectness, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            objectness.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return objectness, deltas


def flatten_rpn_outputs(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per level (B, A, H, W), (B, A*4, H, W) -> (B, H*W*A), (B, H*W*A, 4), rows in the anchors' order."""
    return [flatten_level(o, 1)[..., 0] for o in objectness], [flatten_level(d, 4) for d in deltas]


@torch.no_grad()
def label_anchors(
    anchors: Tensor, gt_boxes: Tensor, matcher: Matcher, sampler: BalancedPositiveNegativeSampler
) -> tuple[Tensor, Tensor]:
    """Sampled training labels of one image's anchors (N, 4) for GT boxes (G, 4).

    Returns labels (N,): 1 = sampled positive, 0 = sampled negative, -1 = not used; and the matched GT
    box of every anchor (N, 4) (zeros when the image has no boxes: only negatives then).
    """
    if gt_boxes.shape[0] == 0:
        full = torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device)
        matched_boxes = torch.zeros_like(anchors)
    else:
        matches = matcher(box_iou(gt_boxes, anchors))  # (N,): GT index, -1 below 0.3, -2 between 0.3 and 0.7
        full = torch.where(matches >= 0, 1, torch.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
        matched_boxes = gt_boxes[matches.clamp(min=0)]
    (pos,), (neg,) = sampler([full])
    labels = torch.full_like(full, -1)
    labels[neg.bool()] = 0
    labels[pos.bool()] = 1
    return labels, matched_boxes


def rpn_losses(
    objectness: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor, batch_size_per_image: int
) -> dict[str, Tensor]:
    """detectron2's RPN losses over the batch: objectness (B, N), deltas (B, N, 4), labels (B, N) in {1, 0, -1},
    target_deltas (B, N, 4). BCE over sampled anchors and L1 (smooth-L1 with beta 0) over positives, both
    summed and divided by ``batch_size_per_image`` x B (a constant: an image with few anchors weighs less)."""
    normalizer = batch_size_per_image * labels.shape[0]
    pos, valid = labels == 1, labels >= 0
    loss_loc = F.l1_loss(deltas[pos].float(), target_deltas[pos], reduction="sum")
    loss_cls = F.binary_cross_entropy_with_logits(objectness[valid].float(), labels[valid].float(), reduction="sum")
    return {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}


@torch.no_grad()
def find_top_proposals(
    anchors: list[Tensor],
    objectness: list[Tensor],
    deltas: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
) -> list[Tensor]:
    """Per image (R, 4) proposals, best first (detectron2's ``find_top_rpn_proposals``).

    Per level: anchors (N_l, 4), objectness (B, N_l) logits, deltas (B, N_l, 4). Per level the top
    ``pre_nms_top_n`` logits; decoded boxes are clipped to the image (h, w); non-finite and empty boxes go;
    NMS within each level; the image keeps its ``post_nms_top_n`` best.
    """
    top_scores, top_boxes, top_levels = [], [], []
    for level, (a, logits, d) in enumerate(zip(anchors, objectness, deltas)):
        k = min(pre_nms_top_n, logits.shape[1])
        scores, index = logits.float().topk(k, dim=1)  # (B, k)
        boxes = box_coder.decode_single(d.float().gather(1, index[..., None].expand(-1, -1, 4)).flatten(0, 1), a[index.flatten()])
        top_scores.append(scores)
        top_boxes.append(boxes.view(*index.shape, 4))  # (B, k, 4)
        top_levels.append(torch.full((k,), level, dtype=torch.long, device=logits.device))
    scores, boxes, levels = torch.cat(top_scores, 1), torch.cat(top_boxes, 1), torch.cat(top_levels)
    proposals = []
    for i, size in enumerate(image_sizes):
        s, b, lv = scores[i], boxes[i], levels
        finite = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
        s, b, lv = s[finite], clip_boxes_to_image(b[finite], size), lv[finite]
        nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        s, b, lv = s[nonempty], b[nonempty], lv[nonempty]
        keep = batched_nms(b, s, lv, nms_thresh)[:post_nms_top_n]  # sorted by score
        proposals.append(b[keep])
    return proposals
