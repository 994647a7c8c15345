"""Modulated deformable 3x3 convolution (DCNv2) from standard ops only, for ONNX and torch.export.

Why this exists: torchvision's ``deform_conv2d`` has no ONNX symbolic, the official DyHead code and mmcv
ship their own CUDA ops, and ``deform.py``'s CPU fast path uses ``embedding_bag`` (no ONNX export either).
This version is ``grid_sample`` (ONNX ``GridSample``, opset >= 16) plus a batched matmul, so the exported
graph runs on onnxruntime's default CPU provider with no custom op, and under torch.export with
dynamic image sizes.

Semantics are torchvision's (and the official kernel's): tap k = 3*i + j of output pixel (y, x) samples
the input at (y*stride - pad + i + offset[2k], x*stride - pad + j + offset[2k+1]) (integer = pixel centre),
bilinearly, with neighbours outside the image contributing 0, times mask[k]. ``grid_sample`` with
``padding_mode="zeros"`` does exactly that zero-padded bilinear read (a point at or beyond -1 / size gets
0, as in torchvision); ``align_corners=False`` maps normalised g to pixel ((g + 1) * size - 1) / 2, so we
pass g = (2 * p + 1) / size - 1, which is defined for maps of width or height 1 too. The round trip
through normalised coordinates costs ~1e-6 pixel of float32 rounding, far below the 1e-4 tolerance.

Shapes: input (B, C, H, W), offset (B, 18, h, w) as (dy, dx) per tap, mask (B, 9, h, w), weight
(C_out, C, 3, 3) -> (B, C_out, h, w). Only 3x3 kernels, dilation 1, one offset group and one weight group
(what DyHead uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dyhead_cli.models.deform_signature import Pair, torchvision_signature


def sample_grid(
    offset: Tensor, in_size: tuple[int, int] | tuple[Tensor, Tensor], stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """The ``grid_sample`` grid of every tap: (B, 18, h, w) offsets -> (B, 9*h, w, 2) normalised (x, y),
    rows ordered (tap, y).

    ``in_size`` is the sampled map's (H, W) (ints, or symbolic sizes under export). Written with slices and
    broadcasting rather than reshapes of symbolic sizes, which keeps torch.export's shape reasoning cheap.
    """
    h, w = offset.shape[-2:]
    in_h, in_w = in_size
    sy, sx = stride
    pad_y, pad_x = padding
    # base sampling point of tap (i, j) at output (y, x): (y*stride - pad + i, x*stride - pad + j)
    taps = torch.arange(3, dtype=offset.dtype, device=offset.device)
    ty = taps.repeat_interleave(3).view(9, 1, 1)  # i of tap 3i + j
    tx = taps.repeat(3).view(9, 1, 1)  # j
    ys = (torch.arange(h, device=offset.device).to(offset.dtype) * sy - pad_y).view(1, h, 1)
    xs = (torch.arange(w, device=offset.device).to(offset.dtype) * sx - pad_x).view(1, 1, w)
    py = offset[:, 0::2] + (ys + ty)  # (B, 9, h, w) in input pixels
    px = offset[:, 1::2] + (xs + tx)
    gy = (2.0 * py + 1.0) / in_h - 1.0
    gx = (2.0 * px + 1.0) / in_w - 1.0
    return torch.stack([gx, gy], dim=-1).flatten(1, 2)


@torchvision_signature
def deform_conv2d_export(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair, mask: Tensor | None
) -> Tensor:
    """Drop-in for ``torchvision.ops.deform_conv2d`` (3x3, dilation 1, one offset group) from exportable ops.

    input (B, C, H, W), offset (B, 18, h, w), weight (C_out, C, 3, 3), bias (C_out,), mask (B, 9, h, w)
    -> (B, C_out, h, w), with (h, w) = ((H + 2 pad - 3) // stride + 1, ...) taken from ``offset``.
    Steps: one ``grid_sample`` reads all 9 taps of every output position, (B, C, 9*h, w); the mask
    multiplies it; viewed as (B, C*9, h, w) columns (channel outer, tap inner: the weight's own layout)
    they meet the weight as a 1x1 convolution, i.e. one GEMM per image.
    """
    if tuple(weight.shape[-2:]) != (3, 3) or weight.shape[1] != input.shape[1] or offset.shape[1] != 18:
        raise ValueError(
            "deform_conv2d_export supports 3x3 kernels with one weight group and one offset group, got weight "
            f"{tuple(weight.shape)}, input channels {input.shape[1]}, offset channels {offset.shape[1]}"
        )
    cols = sampled_columns(input, offset, mask, stride, padding)
    weight_1x1 = weight.reshape(weight.shape[0], -1, 1, 1).to(cols.dtype)
    return F.conv2d(cols, weight_1x1, None if bias is None else bias.to(cols.dtype))


def sampled_columns(
    input: Tensor, offset: Tensor, mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """The modulated deformable conv's columns: input (B, C, H, W), offset (B, 18, h, w), mask (B, 9, h, w)
    -> (B, C*9, h, w), channel outer and tap inner (the weight's own layout), by one ``grid_sample``."""
    c, in_h, in_w = input.shape[1:]
    h = offset.shape[-2]
    grid = sample_grid(offset, (in_h, in_w), stride, padding).to(input.dtype)
    cols = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, 9h, w)
    cols = cols.unflatten(2, (9, h))  # (B, C, 9, h, w)
    if mask is not None:
        cols = cols * mask.unsqueeze(1).to(cols.dtype)
    return cols.flatten(1, 2)


@torchvision_signature
def deform_conv2d_sampled(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair, mask: Tensor | None
) -> Tensor:
    """The CUDA fast path (``impl="fast"`` off CPU): ``deform_conv2d_export``'s computation with the
    sampling in float32 and the GEMM in the autocast dtype.

    Sample points and bilinear reads stay float32 (a bfloat16 coordinate is off by up to half a pixel on a
    200-pixel map); the 1x1 conv over the (B, C*9, h, w) columns runs in bfloat16/float16 when autocast is
    on (tensor cores), else in float32 (TF32 where the user allows it for convs, as for every other conv).
    One ``grid_sample`` and one GEMM per conv, where torchvision's op runs an im2col and a GEMM per image.
    Shapes as ``deform_conv2d_export``.
    """
    device = input.device.type
    wide = torch.float64 if input.dtype == torch.float64 else torch.float32
    gemm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else wide
    with torch.autocast(device, enabled=False):
        mask = None if mask is None else mask.to(wide)
        cols = sampled_columns(input.to(wide), offset.to(wide), mask, stride, padding).to(gemm_dtype)
        weight_1x1 = weight.reshape(weight.shape[0], -1, 1, 1).to(gemm_dtype)
        return F.conv2d(cols, weight_1x1, None if bias is None else bias.to(gemm_dtype))
