"""Faster R-CNN as a head: the official DyHead R-CNN (``configs/dyhead_r50_rcnn_fpn_1x.yaml``, detectron2).

It follows the interface of the dense heads (heads/dense.py), so the ``Detector`` runs it unchanged:
``forward`` runs the RPN's convs over the DyHead levels and passes the levels on; the rest of a two-stage
detector needs the targets (training) or the image sizes, so the RPN's proposals and the RoI heads run in
``loss`` and ``postprocess``. Levels: the RPN sees every level (P2..P6), the RoI heads P2..P5 (strides up
to 32, the backbone's levels). Losses: ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``.

Module names follow detectron2's keys, so converting the published checkpoint is a renaming:
``rpn.{conv, objectness_logits, anchor_deltas}`` (``proposal_generator.rpn_head.*``),
``box_head.{fc1, fc2}`` and ``box_predictor.{cls_score, bbox_pred}`` (``roi_heads.*``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)

from dyhead_cli.models.heads.dense import HeadSpec
from dyhead_cli.models.heads.losses import check_targets
from dyhead_cli.models.heads.roi_heads import (
    BoxHead,
    BoxPredictor,
    fast_rcnn_inference,
    fast_rcnn_losses,
    pool_rois,
    sample_proposals,
)
from dyhead_cli.models.heads.rpn import (
    RPNHead,
    cell_anchor_sizes,
    find_top_proposals,
    flatten_rpn_outputs,
    label_anchors,
    level_anchors,
    rpn_losses,
)
from dyhead_cli.recipe import ModelConfig

POOLER_RESOLUTION = 7


class FasterRCNNHead(nn.Module):
    """RPN over all levels + box head over the levels of stride <= 32 (see the module docstring)."""

    # head options the recipe may leave unset: anchors sit at (i + 0) * stride as in detectron2; the box
    # NMS of the official R-CNN config is 0.5 (pred_kernel_size is not used by this head)
    DEFAULTS = {"anchor_offset": 0.0, "pred_kernel_size": 1, "nms_thresh": 0.5}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        anchor_scale: float = 8.0,
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        fc_dim: int = 1024,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.box_strides = tuple(s for s in self.strides if s <= 32)  # the RoI heads' levels (P2..P5)
        self.anchor_sizes = [cell_anchor_sizes(anchor_scale * s, aspect_ratios) for s in self.strides]
        self.rpn_pre_nms_top_n = {True: rpn_pre_nms_top_n_train, False: rpn_pre_nms_top_n_test}
        self.rpn_post_nms_top_n, self.rpn_nms_thresh = rpn_post_nms_top_n, rpn_nms_thresh
        self.rpn_batch_size_per_image = rpn_batch_size_per_image
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.labels: tuple[int, ...] | None = None  # only these are detected (``keep_only``)

        # detectron2's RPN and RoI matchers and samplers, as torchvision has them
        self.rpn_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
        self.rpn_sampler = BalancedPositiveNegativeSampler(rpn_batch_size_per_image, 0.5)
        self.roi_matcher = Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.roi_sampler = BalancedPositiveNegativeSampler(roi_batch_size_per_image, roi_positive_fraction)
        self.rpn_box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.roi_box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

        self.rpn = RPNHead(in_channels, len(aspect_ratios))
        self.box_head = BoxHead(in_channels * POOLER_RESOLUTION**2, fc_dim)
        self.box_predictor = BoxPredictor(fc_dim, num_classes)

    def keep_only(self, labels: list[int] | None) -> None:
        """Detect only these labels (None: all): filtered before NMS and the ``detections_per_img`` cut."""
        self.labels = tuple(labels) if labels is not None else None

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """Levels (B, C, H, W), finest first -> {"features": the levels, "objectness": (B, A, H, W) per level,
        "anchor_deltas": (B, A*4, H, W) per level}."""
        objectness, deltas = self.rpn(features)
        return {"features": list(features), "objectness": objectness, "anchor_deltas": deltas}

    def anchors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W*A, 4) anchors, rows ordered (y, x, anchor) like the flattened RPN outputs."""
        return [
            level_anchors(o.shape[-2:], s, sizes, o.device)
            for o, s, sizes in zip(outputs["objectness"], self.strides, self.anchor_sizes)
        ]

    def proposals(self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Per image (R, 4) RPN proposals (training or test top-n by ``self.training``), no gradient."""
        objectness, deltas = flatten_rpn_outputs(outputs["objectness"], outputs["anchor_deltas"])
        return find_top_proposals(
            self.anchors(outputs),
            objectness,
            deltas,
            image_sizes,
            self.rpn_box_coder,
            self.rpn_pre_nms_top_n[self.training],
            self.rpn_post_nms_top_n,
            self.rpn_nms_thresh,
        )

    def box_outputs(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RoIs per image (R_i, 4) -> class logits (R, K+1) and class-specific deltas (R, 4K)."""
        pooled = pool_rois(features[: len(self.box_strides)], boxes, self.box_strides, POOLER_RESOLUTION)
        return self.box_predictor(self.box_head(pooled))

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} (detectron2's names and weights, 1 each)."""
        check_targets(targets, self.num_classes)
        anchors = torch.cat(self.anchors(outputs))  # (N, 4)
        objectness, deltas = flatten_rpn_outputs(outputs["objectness"], outputs["anchor_deltas"])
        labels, target_deltas = [], []
        for t in targets:
            lab, matched = label_anchors(anchors, t["boxes"].to(anchors), self.rpn_matcher, self.rpn_sampler)
            labels.append(lab)
            target_deltas.append(self.rpn_box_coder.encode_single(matched, anchors))
        losses = rpn_losses(
            torch.cat(objectness, 1),
            torch.cat(deltas, 1),
            torch.stack(labels),
            torch.stack(target_deltas),
            self.rpn_batch_size_per_image,
        )

        proposals = self.proposals(outputs, image_sizes)
        rois, classes, roi_targets = [], [], []
        for p, t in zip(proposals, targets):
            boxes, cls, matched = sample_proposals(
                p, t["boxes"].to(p), t["labels"].to(p.device), self.num_classes, self.roi_matcher, self.roi_sampler
            )
            rois.append(boxes)
            classes.append(cls)
            roi_targets.append(self.roi_box_coder.encode_single(matched, boxes))
        cls_logits, box_deltas = self.box_outputs(outputs["features"], rois)
        losses.update(fast_rcnn_losses(cls_logits, box_deltas, torch.cat(classes), torch.cat(roi_targets), self.num_classes))
        return losses

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Proposals -> box head -> per image {"boxes", "scores", "labels"} (see ``fast_rcnn_inference``)."""
        proposals = self.proposals(outputs, image_sizes)
        cls_logits, box_deltas = self.box_outputs(outputs["features"], proposals)
        counts = [len(p) for p in proposals]
        return [
            fast_rcnn_inference(
                logits,
                deltas,
                p,
                size,
                self.roi_box_coder,
                self.score_thresh,
                self.nms_thresh,
                self.detections_per_img,
                self.labels,
            )
            for logits, deltas, p, size in zip(cls_logits.split(counts), box_deltas.split(counts), proposals, image_sizes)
        ]


def faster_rcnn_options(cfg: ModelConfig, strides: tuple[int, ...]) -> dict[str, Any]:
    """The recipe's ``[model.rcnn]`` fields are ``FasterRCNNHead``'s keyword arguments, one for one."""
    o = cfg.head_options
    return {
        "anchor_scale": o.anchor_scale,
        "score_thresh": o.score_thresh,
        "nms_thresh": o.nms_thresh,
        "detections_per_img": o.detections_per_img,
        **dataclasses.asdict(cfg.rcnn),
    }


SPEC = HeadSpec(FasterRCNNHead, faster_rcnn_options, exportable=False)  # proposals and RoIs: not traced yet
