"""What makes a dense head (ATSS, FCOS, RetinaNet): two branches, priors, box decoding, one post-processing.

The interface every head follows, so the ``Detector`` never needs to know which head it runs:

    forward(features: list[Tensor]) -> dict[str, list[Tensor]]
        raw per-level outputs, P3 first: {"cls_logits": [(B, A*K, H, W)...], "bbox_reg": [(B, A*4, H, W)...],
        "centerness": [(B, A, H, W)...] (heads with a centerness branch only)}
    loss(outputs, targets: list[dict], image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]
        targets[i] = {"boxes": (N, 4) float xyxy in input pixels, "labels": (N,) int64 in 0..K-1}
    postprocess(outputs, image_sizes) -> list[dict]
        per image {"boxes": (M, 4) xyxy inside image_sizes[i], "scores": (M,), "labels": (M,) int64}

``DenseHead`` holds the classification branch (``cls_tower`` -> ``cls_logits``) and the regression branch
(``bbox_tower`` -> ``bbox_pred`` [x per-level ``scales``], ``centerness`` on the same features) under the
module names checkpoints and ``dyhead convert`` use, runs them, and post-processes for every head
(``heads/postprocess.py``). A head adds only what is its own: priors (``priors``), how predictions become
boxes (``decode``), assignment and loss targets (``loss``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.models.heads.boxes import BoxCoder, anchors_from_centers, grid_centers
from dyhead_cli.models.heads.layers import Scale, conv_tower, flatten_level, predictor, prior_bias
from dyhead_cli.models.heads.postprocess import PostprocessOptions, postprocess_dense
from dyhead_cli.recipe import HeadOptions, ModelConfig


@dataclass(frozen=True)
class HeadSpec:
    """A head in the ``HEADS`` registry: its class, whose ``DEFAULTS`` fill the recipe's ``None``
    (= "the head's default") ``head_options`` in ``resolve_model_config``, and ``options``, which reads
    the head's own constructor keyword arguments from the recipe (every head takes ``in_channels``,
    ``num_classes`` and ``strides`` first)."""

    head: type[nn.Module]
    options: Callable[[ModelConfig, tuple[int, ...]], dict[str, Any]]
    exportable: bool = True  # ``dyhead export`` traces it (engine/export.py: raw outputs and padded detections)

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.head.DEFAULTS)

    def build(self, cfg: ModelConfig, in_channels: int, strides: tuple[int, ...]) -> nn.Module:
        """The head for the (resolved) model config, on ``in_channels``-wide levels of these strides."""
        return self.head(in_channels, cfg.num_classes, strides, **self.options(cfg, strides))


def dense_head_kwargs(options: HeadOptions) -> dict[str, Any]:
    """The ``head_options`` every head takes (towers, predictors, focal loss, post-processing) as constructor
    kwargs; ``None`` ones (the head's default, when the config was not resolved) are left to the constructor."""
    values = {
        "anchor_offset": options.anchor_offset,
        "num_convs": options.num_convs,
        "prior_prob": options.prior_prob,
        "pred_kernel_size": options.pred_kernel_size,
        "tower_norm": options.tower_norm,
        "focal_alpha": options.focal_alpha,
        "focal_gamma": options.focal_gamma,
        "score_thresh": options.score_thresh,
        "nms_thresh": options.nms_thresh,
        "pre_nms_top_n": options.pre_nms_top_n,
        "detections_per_img": options.detections_per_img,
        "postprocess": options.postprocess,
    }
    return {k: v for k, v in values.items() if v is not None}


class DenseHead(nn.Module):
    """Classification and regression branches over every level, shared weights across levels.

    ``num_anchors`` priors per location (A), centred at ((j + ``anchor_offset``) * stride, (i + ...) * stride);
    ``centerness``: a 1-channel centerness predictor on the box features; ``scales``: a learnable scalar
    per level on the box predictions; ``nonnegative_reg``: ReLU on them (FCOS distances). The arguments a
    head decides itself default to ``None``, which means the head class's ``DEFAULTS``: declared there once,
    for the constructor and for the recipe (``resolve_model_config``) alike.
    """

    DEFAULTS: dict[str, Any] = {"anchor_offset": 0.5, "pred_kernel_size": 3, "num_convs": 0, "nms_thresh": 0.6}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        *,
        num_anchors: int = 1,
        centerness: bool = False,
        scales: bool = False,
        nonnegative_reg: bool = False,
        anchor_offset: float | None = None,
        pred_kernel_size: int | None = None,
        num_convs: int | None = None,
        nms_thresh: float | None = None,
        prior_prob: float = 0.01,
        tower_norm: str = "gn",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        postprocess: str = "official",
    ) -> None:
        super().__init__()
        given = {
            "anchor_offset": anchor_offset,
            "pred_kernel_size": pred_kernel_size,
            "num_convs": num_convs,
            "nms_thresh": nms_thresh,
        }
        own = {k: self.DEFAULTS.get(k, DenseHead.DEFAULTS[k]) if v is None else v for k, v in given.items()}
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.anchor_offset = own["anchor_offset"]
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.post = PostprocessOptions(postprocess, score_thresh, pre_nms_top_n, own["nms_thresh"], detections_per_img)
        self.nonnegative_reg = nonnegative_reg

        # registration order = state-dict order of the checkpoints we read and write
        self.cls_tower = conv_tower(in_channels, own["num_convs"], tower_norm)
        self.bbox_tower = conv_tower(in_channels, own["num_convs"], tower_norm)
        k, a = own["pred_kernel_size"], num_anchors
        self.cls_logits = predictor(in_channels, a * num_classes, k, bias=prior_bias(prior_prob))
        self.bbox_pred = predictor(in_channels, a * 4, k)
        self.centerness = predictor(in_channels, a, k) if centerness else None
        self.scales = nn.ModuleList(Scale() for _ in self.strides) if scales else None

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """Levels (B, C, H, W) -> {"cls_logits": (B, A*K, H, W), "bbox_reg": (B, A*4, H, W)[, "centerness": (B, A, H, W)]}."""
        out: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_reg": []}
        if self.centerness is not None:
            out["centerness"] = []
        for level, x in enumerate(features):
            out["cls_logits"].append(self.cls_logits(self.cls_tower(x)))
            box_feat = self.bbox_tower(x)
            reg = self.bbox_pred(box_feat)
            if self.scales is not None:
                reg = self.scales[level](reg)
            out["bbox_reg"].append(reg.relu() if self.nonnegative_reg else reg)
            if self.centerness is not None:
                out["centerness"].append(self.centerness(box_feat))
        return out

    # --- what each head defines -------------------------------------------------------------------

    def priors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W*A, D) priors, rows ordered (y, x, anchor): anchors (D = 4) or points (D = 2)."""
        raise NotImplementedError

    def decode(self, deltas: Tensor, priors: Tensor, level: int) -> Tensor:
        """(M, 4) box predictions and their (M, D) priors on ``level`` -> (M, 4) boxes xyxy."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------

    def flat_outputs(self, outputs: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor, Tensor | None]:
        """All levels concatenated in float32: cls logits (B, N, K), box predictions (B, N, 4), centerness
        logits (B, N) or None; N = every prior of every level, in ``priors`` order."""
        cls = torch.cat([flatten_level(x, self.num_classes) for x in outputs["cls_logits"]], 1).float()
        reg = torch.cat([flatten_level(x, 4) for x in outputs["bbox_reg"]], 1).float()
        if "centerness" not in outputs:
            return cls, reg, None
        return cls, reg, torch.cat([flatten_level(x, 1) for x in outputs["centerness"]], 1).float()[..., 0]

    def keep_only(self, labels: list[int] | None) -> None:
        """Detect only these labels (None: all): filtered before the top-k, NMS and ``detections_per_img``."""
        self.post = dataclasses.replace(self.post, labels=tuple(labels) if labels is not None else None)

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, list[Tensor]], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections per image; scores and thresholds as ``heads/postprocess.py`` describes."""
        priors = self.priors(outputs)
        cls = [flatten_level(x, self.num_classes).float().sigmoid() for x in outputs["cls_logits"]]  # (B, P, K)
        ctr = None
        if "centerness" in outputs:
            ctr = [flatten_level(x, 1).float().sigmoid()[..., 0] for x in outputs["centerness"]]  # (B, P)
        deltas = [flatten_level(x, 4) for x in outputs["bbox_reg"]]  # (B, P, 4)

        def decode(level: int, image: int, loc: Tensor) -> Tensor:
            return self.decode(deltas[level][image][loc], priors[level][loc], level)

        return postprocess_dense(cls, ctr, decode, image_sizes, self.post)


class AnchorHead(DenseHead):
    """A dense head whose priors are anchors (``cell_sizes`` around each grid centre) and whose box
    predictions are ``BoxCoder`` deltas (``box_coder``, set by the head)."""

    box_coder: BoxCoder

    def cell_sizes(self, stride: int) -> Tensor:
        """(A, 2) anchor widths and heights at one location of a level with this stride."""
        raise NotImplementedError

    def anchors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per level (H*W*A, 4) anchors centred at ((j + offset) * stride, (i + offset) * stride), rows (y, x, anchor)."""
        anchors = []
        for x, stride in zip(outputs["cls_logits"], self.strides):
            centers = grid_centers(x.shape[-2:], stride, self.anchor_offset, x.device)
            anchors.append(anchors_from_centers(centers, self.cell_sizes(stride).to(x.device)))
        return anchors

    def priors(self, outputs: dict[str, list[Tensor]]) -> list[Tensor]:
        return self.anchors(outputs)

    def decode(self, deltas: Tensor, priors: Tensor, level: int) -> Tensor:
        # inference decoding: MMDetection's coder also clamps dw/dh from below (BoxCoder's docstring)
        return self.box_coder.decode(deltas, priors, clamp_below=self.post.mode == "mmdet")
