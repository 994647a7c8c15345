"""The layers every dense head is made of: conv towers, prediction convs, per-level scales, flattening.

A head's classification branch is ``conv_tower`` + ``predictor`` (class logits); its regression branch is
another ``conv_tower`` + ``predictor`` (box deltas, optionally times a per-level ``Scale``) with an optional
centerness ``predictor`` on the same features. ``heads/dense.py`` assembles them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dyhead_cli.errors import DyheadError, check_choice

TOWER_NORMS = ("gn", "none")  # the recipe key model.head_options.tower_norm is checked against this


def init_conv(conv: nn.Conv2d, bias: float = 0.0) -> None:
    """N(0, 0.01) weights and a constant bias: the init of every head conv in ATSS/FCOS/RetinaNet."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)


def conv_tower(channels: int, num_convs: int, norm: str = "gn") -> nn.Sequential:
    """``num_convs`` x [3x3 conv, GroupNorm(32) (``norm="gn"``; ``"none"`` for detectron2's RetinaNet), ReLU].

    Empty (the identity) when ``num_convs`` is 0: with DyHead the official ATSS has no tower, the DyHead
    blocks are the tower; the plain detectors use 4. Module indices (0, 1, 3, 4, ... with GroupNorm; 0, 2, ...
    without) are the state-dict names checkpoints and ``dyhead convert`` use.
    """
    check_choice("head tower norm", norm, TOWER_NORMS)
    if num_convs > 0 and norm == "gn" and channels % 32 != 0:
        raise DyheadError(f"head_options.num_convs > 0 needs fpn.channels divisible by 32 (GroupNorm), got {channels}")
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        init_conv(conv)
        layers += [conv, nn.GroupNorm(32, channels), nn.ReLU()] if norm == "gn" else [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def predictor(in_channels: int, out_channels: int, kernel_size: int, bias: float = 0.0) -> nn.Conv2d:
    """A prediction conv (1x1 in the official ATSS/DyHead head, 3x3 elsewhere), N(0, 0.01) init."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    init_conv(conv, bias)
    return conv


def prior_bias(prior_prob: float) -> float:
    """The class-logit bias that makes every sigmoid start at ``prior_prob`` (focal loss paper, 0.01)."""
    return -math.log((1 - prior_prob) / prior_prob)


class Scale(nn.Module):
    """A learnable scalar per pyramid level: lets one shared regressor output different ranges per level."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def flatten_level(x: Tensor, per_anchor: int) -> Tensor:
    """(B, A*C, H, W) -> (B, H*W*A, C) with C = ``per_anchor``; rows ordered (y, x, anchor).

    A level's prediction is anchor-major (channel = a * C + c, as in the official code), so the rows come
    out in the order the anchor generators use.
    """
    b, _, h, w = x.shape
    x = x.view(b, -1, per_anchor, h, w)  # (B, A, C, H, W)
    return x.permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)
