"""torchvision's ``deform_conv2d`` signature, written once for our drop-in implementations.

``deform.py`` (CPU gather + GEMM) and ``deform_export.py`` (``grid_sample`` + GEMM, for export and CUDA)
each compute ``fn(input, offset, weight, bias, stride, padding, mask)`` with ``stride`` and ``padding``
as (y, x) pairs; ``torchvision_signature`` turns such a function into a drop-in for
``torchvision.ops.deform_conv2d(input, offset, weight, bias=None, stride=1, padding=1, mask=None)``
(3x3 kernels, dilation 1, one offset group: what DyHead uses).

Shapes: input (B, C, H, W), offset (B, 18, h, w) as (dy, dx) per tap, weight (C_out, C, 3, 3),
bias (C_out,), mask (B, 9, h, w) -> (B, C_out, h, w).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from torch import Tensor

Pair = tuple[int, int]


class DeformConv2d(Protocol):
    """What every drop-in is called with (torchvision's order and defaults)."""

    def __call__(
        self,
        input: Tensor,
        offset: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: int | Pair = 1,
        padding: int | Pair = 1,
        mask: Tensor | None = None,
    ) -> Tensor: ...


def pair(v: int | Pair) -> Pair:
    """``3`` -> ``(3, 3)``; a pair stays a pair of ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_size(in_size: Pair, stride: Pair, padding: Pair) -> Pair:
    """(h, w) of a 3x3, dilation-1 convolution's output."""
    return tuple((s + 2 * p - 3) // st + 1 for s, st, p in zip(in_size, stride, padding))  # type: ignore[return-value]


Impl = Callable[[Tensor, Tensor, Tensor, "Tensor | None", Pair, Pair, "Tensor | None"], Tensor]


def torchvision_signature(fn: Impl) -> DeformConv2d:
    """Wrap ``fn(input, offset, weight, bias, stride_pair, padding_pair, mask)`` as a drop-in."""

    @functools.wraps(fn)
    def drop_in(input, offset, weight, bias=None, stride=1, padding=1, mask=None):  # noqa: ANN001, ANN202
        return fn(input, offset, weight, bias, pair(stride), pair(padding), mask)

    return drop_in  # type: ignore[return-value]
