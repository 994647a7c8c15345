"""The model factory: recipe dataclasses in, modules out (backbone -> FPN -> DyHead -> head).

``resolve_model_config`` is the one place a ``ModelConfig`` gets its per-head defaults and its choice keys
checked, each against the tuple declared where that choice is implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dyhead_cli.errors import DyheadError, suggest
from dyhead_cli.models.backbone import TimmBackbone
from dyhead_cli.models.detector import INPUT_FORMATS, Detector
from dyhead_cli.models.dyhead import IMPLS, OFFSET_MODES, DyHead
from dyhead_cli.models.fpn import EXTRA_FROM, FPN, TOP_BLOCK_LEVELS
from dyhead_cli.models.heads import HEADS
from dyhead_cli.models.heads.layers import TOWER_NORMS
from dyhead_cli.models.heads.postprocess import POSTPROCESS_MODES
from dyhead_cli.models.heads.retinanet import BOX_LOSSES
from dyhead_cli.recipe import BackboneConfig, ModelConfig


def model_choices(cfg: ModelConfig) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Every model key with a fixed set of values: dotted recipe key -> (its value, the allowed values)."""
    o = cfg.head_options
    return {
        "model.head": (cfg.head, tuple(HEADS)),
        "model.input_format": (cfg.input_format, INPUT_FORMATS),
        "model.dyhead.offset_mode": (cfg.dyhead.offset_mode, OFFSET_MODES),
        "model.dyhead.impl": (cfg.dyhead.impl, IMPLS),
        "model.head_options.box_loss": (o.box_loss, BOX_LOSSES),
        "model.head_options.tower_norm": (o.tower_norm, TOWER_NORMS),
        "model.head_options.postprocess": (o.postprocess, POSTPROCESS_MODES),
        "model.fpn.extra_from": (cfg.fpn.extra_from, EXTRA_FROM),
        "model.fpn.top_block": (cfg.fpn.top_block, tuple(TOP_BLOCK_LEVELS)),
    }


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every choice key checked and the head's defaults in its ``None`` head_options.

    Idempotent (a resolved config comes back equal). Raises ``DyheadError`` with one line naming the key.
    """
    for key, (value, choices) in model_choices(cfg).items():
        if value not in choices:
            raise DyheadError(f"recipe key '{key}' = {value!r} is not one of {', '.join(choices)}{suggest(str(value), choices)}")
    top = 5 + TOP_BLOCK_LEVELS[cfg.fpn.top_block]
    if cfg.fpn.levels not in (list(range(3, top + 1)), list(range(2, top + 1))):
        raise DyheadError(
            f"model.fpn.levels = {cfg.fpn.levels} does not fit top_block = {cfg.fpn.top_block!r}: the levels run from "
            f'P2 or P3 to P{top} ([3, 4, 5, 6, 7] with "p6p7", [2, 3, 4, 5, 6] with "maxpool")'
        )
    if cfg.head == "faster_rcnn" and cfg.fpn.levels[0] != 2:
        raise DyheadError('model.head = "faster_rcnn" pools RoIs from P2..P5: set model.fpn.levels = [2, 3, 4, 5, 6]')
    o = cfg.head_options
    filled = {k: v for k, v in HEADS[cfg.head].defaults.items() if getattr(o, k, 0) is None}
    o = dataclasses.replace(o, **filled)
    if o.pred_kernel_size < 1 or o.pred_kernel_size % 2 == 0:
        raise DyheadError(
            f"recipe key 'model.head_options.pred_kernel_size' must be a positive odd number, got {o.pred_kernel_size}"
        )
    if not 0.0 <= o.anchor_offset < 1.0:
        raise DyheadError(f"recipe key 'model.head_options.anchor_offset' must be in [0, 1), got {o.anchor_offset}")
    return dataclasses.replace(cfg, head_options=o)


def build_backbone(cfg: BackboneConfig, out_strides: tuple[int, ...] = (8, 16, 32)) -> TimmBackbone:
    """The recipe's ``[model.backbone]`` fields are ``TimmBackbone``'s keyword arguments, one for one."""
    return TimmBackbone(**dataclasses.asdict(cfg), out_strides=out_strides)


def build_dyhead(cfg: ModelConfig) -> DyHead:
    d = cfg.dyhead
    return DyHead(cfg.fpn.channels, d.num_blocks, offset_mode=d.offset_mode, zero_init_offset=d.zero_init_offset, impl=d.impl)


def build_model(model_config: ModelConfig) -> Detector:
    """Assemble a ``Detector`` from a ``ModelConfig`` (the ``[model]`` table of a recipe), resolved first."""
    cfg = resolve_model_config(model_config)
    # The pyramid's levels (model.fpn.levels): the backbone gives C<l> for l <= 5, the FPN's top block the rest.
    first_level = cfg.fpn.levels[0]
    backbone = build_backbone(cfg.backbone, tuple(2**level for level in range(first_level, 6)))
    fpn = FPN(
        backbone.out_channels,
        cfg.fpn.channels,
        cfg.fpn.extra_from,
        p7_relu=cfg.fpn.p7_relu,
        top_block=cfg.fpn.top_block,
        first_level=first_level,
    )
    dyhead = build_dyhead(cfg)
    head = HEADS[cfg.head].build(cfg, cfg.fpn.channels, fpn.strides)
    return Detector(backbone, fpn, dyhead, head, cfg.pixel_mean, cfg.pixel_std, cfg.input_format)
