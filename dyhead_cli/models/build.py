"""The model factory: recipe dataclasses in, modules out (backbone -> FPN -> DyHead -> head)."""
from __future__ import annotations

from dyhead_cli.errors import DyheadError, suggest
from dyhead_cli.models.backbone import TimmBackbone
from dyhead_cli.models.dyhead import DyHead
from dyhead_cli.models.fpn import FPN
from dyhead_cli.recipe import BackboneConfig, ModelConfig


def build_backbone(cfg: BackboneConfig) -> TimmBackbone:
    return TimmBackbone(
        cfg.name,
        pretrained=cfg.pretrained,
        pretrained_file=cfg.pretrained_file,
        img_size=cfg.img_size,
        frozen_stages=cfg.frozen_stages,
        norm_eval=cfg.norm_eval,
        stride_in_1x1=cfg.stride_in_1x1,
        out_norm=cfg.out_norm,
    )


def build_dyhead(cfg: ModelConfig) -> DyHead:
    d = cfg.dyhead
    tower = DyHead(cfg.fpn.channels, d.num_blocks, offset_mode=d.offset_mode, zero_init_offset=d.zero_init_offset)
    if hasattr(tower, "set_impl"):
        tower.set_impl(d.impl)
    return tower


def build_model(model_config: ModelConfig):
    """Assemble a ``Detector`` from a ``ModelConfig`` (the ``[model]`` table of a recipe)."""
    from dyhead_cli.models.detector import Detector
    from dyhead_cli.models.heads import HEADS

    cfg = model_config
    if cfg.head not in HEADS:
        raise DyheadError(f"unknown head '{cfg.head}'{suggest(cfg.head, HEADS)}; choose from {', '.join(HEADS)}")
    backbone = build_backbone(cfg.backbone)
    fpn = FPN(backbone.out_channels, cfg.fpn.channels, cfg.fpn.extra_from, p7_relu=cfg.fpn.p7_relu)
    dyhead = build_dyhead(cfg)
    head = HEADS[cfg.head](cfg, cfg.fpn.channels, FPN.strides)
    return Detector(backbone, fpn, dyhead, head, cfg.pixel_mean, cfg.pixel_std, cfg.input_format)
