"""Detector heads by name: ``HEADS[name]`` is a ``HeadSpec`` (its builder and the options it decides).

A builder is ``build(cfg: ModelConfig, in_channels, strides) -> DenseHead``; the interface every head
follows (forward / loss / postprocess) is described in ``heads/dense.py``, the meaning of its scores and
thresholds in ``heads/postprocess.py``.
"""

from __future__ import annotations

from dyhead_cli.models.heads import atss, faster_rcnn, fcos, retinanet
from dyhead_cli.models.heads.dense import HeadSpec

HEADS: dict[str, HeadSpec] = {
    "atss": atss.SPEC,
    "fcos": fcos.SPEC,
    "retinanet": retinanet.SPEC,
    "faster_rcnn": faster_rcnn.SPEC,
}
