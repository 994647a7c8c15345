"""Detector heads by name; each builder is ``build_x(cfg: ModelConfig, in_channels, strides) -> nn.Module``.

The interface every head follows (forward / loss / postprocess) is described in ``heads/common.py``.
"""
from __future__ import annotations

from dyhead_cli.models.heads.atss import build_atss
from dyhead_cli.models.heads.faster_rcnn import build_faster_rcnn
from dyhead_cli.models.heads.fcos import build_fcos
from dyhead_cli.models.heads.retinanet import build_retinanet

HEADS = {"atss": build_atss, "fcos": build_fcos, "retinanet": build_retinanet, "faster_rcnn": build_faster_rcnn}
