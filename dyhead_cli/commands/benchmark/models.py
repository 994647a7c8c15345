"""The models ``dyhead benchmark`` times: ours, ours without DyHead, torchvision's references."""

from __future__ import annotations

import copy
import dataclasses
import re

from torch import nn

from dyhead_cli.commands.benchmark.settings import Candidate, Settings
from dyhead_cli.recipe import ModelConfig

# ----------------------------------------------------------------------------------------------------
# the models


def short_backbone(name: str) -> str:
    m = re.fullmatch(r"resnet(\d+)", name)
    return f"R{m[1]}" if m else name


HEAD_TITLES = {"faster_rcnn": "Faster R-CNN"}


def model_name(cfg: ModelConfig) -> str:
    base = f"{HEAD_TITLES.get(cfg.head, cfg.head.upper())}-{short_backbone(cfg.backbone.name)}"
    if cfg.dyhead.num_blocks:
        return f"{base}-DyHead"
    return f"{base}, no DyHead"


def without_dyhead(cfg: ModelConfig) -> ModelConfig:
    """The same detector without DyHead blocks and with the standard 4-conv head towers."""
    cfg = copy.deepcopy(cfg)
    cfg.dyhead.num_blocks = 0
    cfg.head_options.num_convs = 4
    return cfg


def build_detector(cfg: ModelConfig) -> nn.Module:
    from dyhead_cli.models.build import build_model

    model = build_model(cfg).eval()
    if hasattr(model.dyhead, "set_impl"):
        model.dyhead.set_impl(cfg.dyhead.impl)
    return model


def as_atss(cfg: ModelConfig) -> ModelConfig:
    """The same backbone and DyHead under the ATSS head and its P3..P7 pyramid (the ATSS recipes' settings)."""
    from dyhead_cli.recipe import FPNConfig, HeadOptions

    cfg = copy.deepcopy(cfg)
    cfg.head, cfg.head_options = "atss", HeadOptions(num_convs=0 if cfg.dyhead.num_blocks else 4)
    cfg.fpn = FPNConfig(channels=cfg.fpn.channels)
    return cfg


def build_torchvision_fcos(num_classes: int, size: tuple[int, int], builder: str = "fcos_resnet50_fpn") -> nn.Module:
    """torchvision's FCOS-R50-FPN (or another ``builder`` of torchvision.models.detection), random weights,
    its transform set to keep an (H, W) input as it is."""
    from torchvision.models import detection

    model = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    model.transform.min_size = (min(size),)  # scale = min(min_size / short side, max_size / long side) = 1
    model.transform.max_size = max(size)
    return model


def candidates_for(cfg: ModelConfig, s: Settings) -> list[Candidate]:
    cfg = copy.deepcopy(cfg)
    if s.impl is not None:
        cfg.dyhead.impl = s.impl
    out = [Candidate("dyhead", model_name(cfg), lambda: build_detector(cfg), True, dataclasses.asdict(cfg))]
    if s.compare:
        base = without_dyhead(cfg)
        out.append(Candidate("no_dyhead", model_name(base), lambda: build_detector(base), True, dataclasses.asdict(base)))
        two_stage = cfg.head == "faster_rcnn"
        if two_stage:
            atss = as_atss(cfg)
            out.append(Candidate("atss_dyhead", model_name(atss), lambda: build_detector(atss), True, dataclasses.asdict(atss)))
        builder, key, title = (
            ("fasterrcnn_resnet50_fpn", "torchvision_faster_rcnn", "Faster R-CNN-R50 (torchvision)")
            if two_stage
            else ("fcos_resnet50_fpn", "torchvision_fcos", "FCOS-R50 (torchvision)")
        )
        num_classes = cfg.num_classes + two_stage  # torchvision's Faster R-CNN counts the background class
        tv = {
            "torchvision": f"{builder}(weights=None, weights_backbone=None)",
            "num_classes": num_classes,
            "transform": {"min_size": min(s.size), "max_size": max(s.size)},
        }
        out.append(Candidate(key, title, lambda: build_torchvision_fcos(num_classes, s.size, builder), False, tv))
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
