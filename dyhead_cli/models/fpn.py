"""Feature pyramid: P3..P5 from C3..C5, then P6/P7 by stride-2 3x3 convs (RetinaNet style), or, for the
two-stage detector, P2..P5 from C2..C5 and P6 by max-pooling P5 (``top_block="maxpool"``).

torchvision's FPN pieces do exactly this (nearest upsampling, 1x1 lateral + 3x3 output convs, P7 from
ReLU(P6); ``LastLevelMaxPool`` = detectron2's, a 1x1 max-pool with stride 2); we reuse them so their key
names (``inner_blocks``, ``layer_blocks``, ``extra_blocks.p6``) hold. MMDetection computes P7 from P6
without the ReLU (``relu_before_extra_convs=False``): ``p7_relu=False``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from dyhead_cli.errors import DyheadError, check_choice

# How many levels each top block adds above P5.
TOP_BLOCK_LEVELS = {"p6p7": 2, "maxpool": 1}  # top block -> how many levels it adds above P5
EXTRA_FROM = ("p5", "c5")  # what P6 of "p6p7" is computed from


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """torchvision's ``LastLevelP6P7`` (same modules and keys) with P7 = conv(P6), no ReLU (MMDetection)."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


def pyramid_levels(first_level: int, top_block: str) -> tuple[int, ...]:
    """The levels an FPN produces: ``first_level``..5 from the backbone, then the top block's (P6[, P7])."""
    check_choice("fpn.top_block", top_block, TOP_BLOCK_LEVELS)
    if first_level not in (2, 3):
        raise DyheadError(f"the pyramid must start at P2 or P3, got P{first_level}")
    return tuple(range(first_level, 6 + TOP_BLOCK_LEVELS[top_block]))


class FPN(nn.Module):
    """[C3, C4, C5] -> [P3, P4, P5, P6, P7] (or [C2..C5] -> [P2..P6]), ``channels`` each, largest first.

    ``in_channels`` has one entry per backbone map, finest first; the first one is level ``first_level``.
    ``strides`` (instance attribute) are the output levels' strides, e.g. (8, 16, 32, 64, 128).
    """

    strides = (8, 16, 32, 64, 128)  # the default pyramid's; instances carry their own

    def __init__(
        self,
        in_channels: list[int],
        channels: int = 256,
        extra_from: str = "p5",
        p7_relu: bool = True,
        top_block: str = "p6p7",
        first_level: int = 3,
    ) -> None:
        super().__init__()
        levels = pyramid_levels(first_level, top_block)
        if len(in_channels) != 6 - first_level:
            raise DyheadError(f"an FPN from C{first_level} to C5 needs {6 - first_level} input maps, got {len(in_channels)}")
        if top_block == "p6p7":
            # LastLevelP6P7 builds P6 from P5 when its in_channels equals its out_channels, else from C5.
            extra_in = channels if extra_from == "p5" else in_channels[-1]
            extra: nn.Module = (LastLevelP6P7 if p7_relu else LastLevelP6P7NoReLU)(extra_in, channels)
        else:
            extra_in, extra = channels, LastLevelMaxPool()  # detectron2's P6 = max_pool2d(P5, 1, stride 2)
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels, extra_blocks=extra)
        if top_block == "p6p7" and extra_from == "c5" and extra_in == channels:
            self.fpn.extra_blocks.use_P5 = False
        self.channels = channels
        self.levels = levels
        self.strides = tuple(2**level for level in levels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())
