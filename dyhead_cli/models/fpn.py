"""Feature pyramid: P3..P5 from C3..C5, then P6/P7 by stride-2 3x3 convs (RetinaNet style).

torchvision's FPN pieces do exactly this (nearest upsampling, 1x1 lateral + 3x3 output convs, P7 from
ReLU(P6)); we reuse them so their key names (``inner_blocks``, ``layer_blocks``, ``extra_blocks.p6``) hold.
MMDetection computes P7 from P6 without the ReLU (``relu_before_extra_convs=False``): ``p7_relu=False``.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """torchvision's ``LastLevelP6P7`` (same modules and keys) with P7 = conv(P6), no ReLU (MMDetection)."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class FPN(nn.Module):
    """[C3, C4, C5] -> [P3, P4, P5, P6, P7], each with ``channels`` channels (largest first)."""

    strides = (8, 16, 32, 64, 128)

    def __init__(self, in_channels: list[int], channels: int = 256, extra_from: str = "p5", p7_relu: bool = True) -> None:
        super().__init__()
        # LastLevelP6P7 builds P6 from P5 when its in_channels equals its out_channels, else from C5.
        extra_in = channels if extra_from == "p5" else in_channels[-1]
        extra = (LastLevelP6P7 if p7_relu else LastLevelP6P7NoReLU)(extra_in, channels)
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels, extra_blocks=extra)
        if extra_from == "c5" and extra_in == channels:
            self.fpn.extra_blocks.use_P5 = False
        self.channels = channels

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())
