"""Two Triton kernels for the end of a DyHead block on CUDA, with GroupNorm and the attentions folded in.

Why: after its deformable convs, a block level does GroupNorm on each of the 2-3 conv outputs, the
scale-aware weighting (a mean per map), a weighted mean of the maps and DyReLU (a mean, then a two-piece
max): in PyTorch ops that is about 13 passes over float32 maps the size of the level, about half the
tower's memory traffic at batch 8 on an H100 (benchmarks/gpu_tower.py). As on CPU
(``dyhead_cpu.block_forward_cpu``), everything but two passes folds into per-(image, channel) numbers:
GroupNorm is ``y * scale + shift`` from y's channel statistics, the attentions need only the maps' means.
So each conv output is read twice (``channel_stats``, then ``scaled_sum_dyrelu``) and the level written
once.

- ``channel_stats(y)``: per-(image, channel) mean and biased variance of a contiguous (B, C, h, w) map in any
  float dtype, two passes in float32 (the mean, then the centred squares), as accurate as GroupNorm's own
  kernel;
- ``scaled_sum_dyrelu(maps, scales, shift, coefficients)``: out = max(f * a1 + b1, f * a2 + b2) with
  f = shift + sum_i maps[i] * scales[i], per (image, channel) numbers, in float32; with ``size`` the last
  map is the "high" level's smaller conv output, upsampled (bilinear, align_corners) inside the kernel;
- ``upsampled_mean(y, size)``: per-(image, channel) mean of that upsampling, without writing it.

The in-kernel upsampling (``dyhead_cuda.EPILOGUE = "inline"``) computes each value with PyTorch's CUDA
formula (``upsample_bilinear2d``: source index ``scale * i`` with ``scale = float(h - 1) / (H - 1)`` in
float32, truncated, the neighbour clamped to the map, ``l0 * (w0 * a + w1 * b) + l1 * (w0 * c + w1 * d)``), so
the upsampled map never reaches memory: the two layout copies and the upsampling pass of ``folded`` go.

Tested against the PyTorch expressions on CPU through Triton's interpreter (tests/models/test_fold_triton.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dyhead_cli.models.deform_triton import tl, triton

STATS_BLOCK = 1024  # elements of a row per step
SUM_BLOCK = 1024  # elements of a row per program

if triton is not None:

    @triton.jit(do_not_specialize=["N"])
    def _channel_stats_kernel(y_ptr, mean_ptr, var_ptr, N, BLOCK: tl.constexpr):
        """Program r: row r of the (rows, N) view -> its mean and biased variance (float32)."""
        row = tl.program_id(0).to(tl.int64)
        base = y_ptr + row * N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            total += tl.load(base + idx, mask=idx < N, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / N
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            d = tl.where(idx < N, tl.load(base + idx, mask=idx < N, other=0.0).to(tl.float32) - mean, 0.0)
            squares += d * d
        tl.store(mean_ptr + row, mean)
        tl.store(var_ptr + row, tl.sum(squares, axis=0) / N)

    @triton.jit
    def _bilinear(base, idx, ok, W, H_IN, W_IN, RH, RW):
        """Values at output positions ``idx`` (row-major, width W) of the bilinear, align_corners upsampling
        of the (H_IN, W_IN) map at ``base``, float32, as PyTorch's CUDA kernel computes them."""
        oh = idx // W
        ow = idx - oh * W
        hr = RH * oh.to(tl.float32)
        wr = RW * ow.to(tl.float32)
        h1 = hr.to(tl.int32)  # hr >= 0: truncation is floor
        w1 = wr.to(tl.int32)
        hp = tl.where(h1 < H_IN - 1, W_IN, 0)  # the next row, or the same one at the map's edge
        wp = tl.where(w1 < W_IN - 1, 1, 0)
        hl = hr - h1.to(tl.float32)
        wl = wr - w1.to(tl.float32)
        top = base + h1 * W_IN + w1
        a = tl.load(top, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(top + wp, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(top + hp, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(top + hp + wp, mask=ok, other=0.0).to(tl.float32)
        return (1.0 - hl) * ((1.0 - wl) * a + wl * b) + hl * ((1.0 - wl) * c + wl * d)

    @triton.jit(do_not_specialize=["N", "W", "H_IN", "W_IN"])
    def _upsampled_mean_kernel(y_ptr, mean_ptr, N, W, H_IN, W_IN, RH, RW, BLOCK: tl.constexpr):
        """Program r: the mean over the N = H x W positions of row r's (H_IN, W_IN) map upsampled to H x W."""
        row = tl.program_id(0).to(tl.int64)
        base = y_ptr + row * H_IN * W_IN
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            ok = idx < N
            total += tl.where(ok, _bilinear(base, idx, ok, W, H_IN, W_IN, RH, RW), 0.0)
        tl.store(mean_ptr + row, tl.sum(total, axis=0) / N)

    @triton.jit(do_not_specialize=["N", "W", "H_IN", "W_IN"])
    def _scaled_sum_dyrelu_kernel(
        m0_ptr, m1_ptr, m2_ptr, coef_ptr, out_ptr, N, W, H_IN, W_IN, RH, RW,
        MAPS: tl.constexpr, HIGH: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (r, j): elements j * BLOCK ... of row r; coef row r = (s0, s1, s2, shift, a1, b1, a2, b2).
        With HIGH the last map is (H_IN, W_IN) per row, upsampled to the output's H x W = N here."""
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < N
        offs = row * N + idx
        coef = coef_ptr + row * 8
        f = tl.load(coef + 3) + tl.load(coef + 0) * tl.load(m0_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if MAPS > 1:
            if HIGH and MAPS == 2:
                m1 = _bilinear(m1_ptr + row * H_IN * W_IN, idx, ok, W, H_IN, W_IN, RH, RW)
            else:
                m1 = tl.load(m1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            f += tl.load(coef + 1) * m1
        if MAPS > 2:
            if HIGH:
                m2 = _bilinear(m2_ptr + row * H_IN * W_IN, idx, ok, W, H_IN, W_IN, RH, RW)
            else:
                m2 = tl.load(m2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            f += tl.load(coef + 2) * m2
        first = f * tl.load(coef + 4) + tl.load(coef + 5)
        second = f * tl.load(coef + 6) + tl.load(coef + 7)
        tl.store(out_ptr + offs, tl.maximum(first, second).to(out_ptr.dtype.element_ty), mask=ok)


def channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """y (B, C, h, w) contiguous, any float dtype -> mean and biased variance over (h, w), two (B, C) float32."""
    b, c, h, w = y.shape
    y = y.contiguous()
    mean = torch.empty(b, c, dtype=torch.float32, device=y.device)
    var = torch.empty_like(mean)
    _channel_stats_kernel[(b * c,)](y, mean, var, h * w, BLOCK=STATS_BLOCK)
    return mean, var


def scaled_sum_dyrelu(
    maps: list[Tensor],
    scales: list[Tensor],
    shift: Tensor,
    coefficients: list[Tensor],
    out_dtype: torch.dtype,
    upsample_last: bool = False,
) -> Tensor:
    """max(f * a1 + b1, f * a2 + b2), f = shift + sum_i maps[i] * scales[i]: the block level's output.

    maps: 1-3 contiguous (B, C, H, W) in any float dtype; with ``upsample_last`` the last of 2-3 maps is
    (B, C, h, w) and enters the sum upsampled to H x W (bilinear, align_corners, in the kernel); scales (one
    per map), shift and the DyReLU coefficients a1, b1, a2, b2: (B, C) each (any shape with B * C elements).
    Returns (B, C, H, W) in ``out_dtype``; the arithmetic is float32.
    """
    if not 1 <= len(maps) <= 3 or len(scales) != len(maps) or len(coefficients) != 4:
        raise ValueError(f"1-3 maps with a scale each and 4 coefficients, got {len(maps)}, {len(scales)}, {len(coefficients)}")
    if upsample_last and len(maps) < 2:
        raise ValueError("upsample_last needs 2-3 maps: the level's own, then the one to upsample")
    b, c, h, w = maps[0].shape
    maps = [m.contiguous() for m in maps]
    small = tuple(maps[-1].shape[-2:]) if upsample_last else (h, w)
    rh, rw = align_corners_scale(small[0], h), align_corners_scale(small[1], w)
    padding = [torch.zeros_like(shift)] * (3 - len(scales))
    columns = [*scales, *padding, shift, *coefficients]
    coef = torch.stack([t.reshape(b * c).float() for t in columns], dim=1).contiguous()  # (B C, 8)
    out = torch.empty(b, c, h, w, dtype=out_dtype, device=maps[0].device)
    m1 = maps[1] if len(maps) > 1 else maps[0]
    m2 = maps[2] if len(maps) > 2 else maps[0]
    grid = (b * c, triton.cdiv(h * w, SUM_BLOCK))
    _scaled_sum_dyrelu_kernel[grid](
        maps[0], m1, m2, coef, out, h * w, w, small[0], small[1], rh, rw,
        MAPS=len(maps), HIGH=upsample_last, BLOCK=SUM_BLOCK,
    )  # fmt: skip
    return out


@functools.lru_cache(maxsize=256)
def align_corners_scale(small: int, big: int) -> float:
    """PyTorch's source-index scale of an align_corners upsampling from ``small`` to ``big`` pixels, the
    float32 quotient ``float(small - 1) / (big - 1)`` (0 for a 1-pixel output), as a Python float."""
    if big <= 1:
        return 0.0
    return (torch.tensor(float(small - 1), dtype=torch.float32) / (big - 1)).item()


def upsampled_mean(y: Tensor, size: tuple[int, int]) -> Tensor:
    """The per-(image, channel) mean of ``F.interpolate(y, size, mode="bilinear", align_corners=True)``
    without writing the upsampled map: y (B, C, h, w) contiguous, any float dtype -> (B, C) float32."""
    b, c, h, w = y.shape
    big_h, big_w = size
    y = y.contiguous()
    mean = torch.empty(b, c, dtype=torch.float32, device=y.device)
    rh, rw = align_corners_scale(h, big_h), align_corners_scale(w, big_w)
    _upsampled_mean_kernel[(b * c,)](y, mean, big_h * big_w, big_w, h, w, rh, rw, BLOCK=STATS_BLOCK)
    return mean
