"""The pieces of a DyHead block's CPU inference path that work on channels-last maps without extra passes.

Why: on CPU the block's deformable convs produce their outputs as rows (one row of C values per pixel,
``deform.conv_rows``). Keeping the block channels-last spares a
transposing copy of every conv output, and the rest of the block is per-channel affine maps and means,
which can be folded together: GroupNorm is ``y * scale + shift`` per image and channel, the scale-aware
attention needs only the mean of each normalised map, which follows from the per-channel means of ``y``,
and DyReLU's coefficients need only the mean of their sum. So each conv output is read twice (statistics,
then the scaled sum) instead of five times, and no mean is taken over a map after GroupNorm.

Used by ``DyHeadBlock.forward_cpu_inference``; tested against the reference block (``impl="reference"``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyhead_cli.models.deform import conv_rows, cpu_gemm_dtype, gemm_weight, sampling_table
from dyhead_cli.models.deform_batch import Segment, bilinear_taps_many

if TYPE_CHECKING:
    from dyhead_cli.models.dyhead import DyHeadBlock

SLAB_FLOATS = 1 << 17  # DyReLU in place works on slabs of about this many floats (512 KiB: stays in L2)


def channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and (biased) variance of y (B, C, h, w) over (h, w): two (B, C).

    From ``batch_norm_update_stats``: on channels-last input a vectorised two-pass kernel, as accurate as
    GroupNorm's NCHW kernel to a few units in the last place (GroupNorm's own channels-last kernel is
    several times less accurate).
    """
    stats = [torch.batch_norm_update_stats(y[i : i + 1], None, None, 0.0) for i in range(y.shape[0])]
    if len(stats) == 1:
        return stats[0][0][None], stats[0][1][None]
    return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


def group_norm_affine(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm as a per-channel affine map ``norm(y) = y * scale + shift``, from y's channel statistics.

    mean, var (..., B, C) from ``channel_stats`` (several maps may be stacked in front); weight, bias the
    norms' affine parameters, (..., 1, C). Returns scale and shift, (..., B, C). The group variance is the
    mean of the channels' variances plus the variance of their means (exact).
    """
    shape = mean.shape
    channel_mean = mean.unflatten(-1, (groups, -1))  # (..., B, G, C/G)
    group_mean = channel_mean.mean(-1, keepdim=True)
    group_var = (var.unflatten(-1, (groups, -1)) + (channel_mean - group_mean).square()).mean(-1, keepdim=True)
    scale = weight.unflatten(-1, (groups, -1)) * torch.rsqrt(group_var + eps)  # (..., B, G, C/G)
    shift = bias - (group_mean * scale).reshape(shape)
    return scale.reshape(shape), shift


def fold_attention(
    block: DyHeadBlock, norms: list[nn.GroupNorm], stats: list[tuple[Tensor, Tensor]], pooled: list[Tensor]
) -> tuple[list[Tensor], Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """A level's GroupNorms, scale-aware weights and DyReLU coefficients as per-(image, channel) numbers.

    norms: the 2-3 maps' GroupNorms; stats: each map's (mean, var) from ``channel_stats``, (B, C) each;
    pooled: each map's mean as the level sees it, (B, C) (for an upsampled map the mean after upsampling).
    Returns the maps' scales (B, C) and one shift (B, C) such that the scale-aware weighted mean of the
    normalised maps is ``shift + sum_i map_i * scales[i]``, and DyReLU's a1, b1, a2, b2 of that sum. Numbers in
    the statistics' dtype; the attention layers run in their parameters' dtype (and the caller's autocast).
    """
    mean, var = (torch.stack(t) for t in zip(*stats))  # (k, B, C)
    dtype = mean.dtype
    weight = torch.stack([norm.weight.to(dtype) for norm in norms])[:, None]  # (k, 1, C)
    bias = torch.stack([norm.bias.to(dtype) for norm in norms])[:, None]
    scale, shift = group_norm_affine(mean, var, weight, bias, norms[0].num_groups, norms[0].eps)
    pooled = torch.stack(pooled).to(dtype) * scale + shift  # (k, B, C): the mean of each normalised map
    param = block.scale_attn.weight.dtype  # float16 for a .half() model on CUDA
    weights = block.scale_weight_from_mean(pooled.to(param)).to(dtype) / len(norms)  # (k, B, 1): pi_L / k
    coefficients = block.task_attn.coefficients_from_mean((pooled * weights).sum(0).to(param))  # of the sum
    return list((scale * weights).unbind()), (shift * weights).sum(0), coefficients


@functools.lru_cache(maxsize=64)
def _upsampled_mean_weights(src: tuple[int, int], dst: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """(h*w,): the weight of each source pixel in the mean of a bilinear (align_corners) upsampling to dst.

    Bilinear upsampling is separable and linear, so the mean of the upsampled map is a weighted sum of
    the source: the weights are the column means of the two 1-D interpolation matrices, multiplied.
    """
    (h, w), (big_h, big_w) = src, dst
    along = []
    for n, big in ((h, big_h), (w, big_w)):
        # (1, n, big): row j is the unit vector e_j upsampled to length big
        unit = F.interpolate(torch.eye(n, dtype=torch.float64)[None], size=big, mode="linear", align_corners=True)
        along.append(unit[0].mean(1))
    return torch.outer(along[0], along[1]).flatten().to(dtype)


def upsampled_mean(y: Tensor, size: tuple[int, int]) -> Tensor:
    """The per-channel mean of ``F.interpolate(y, size, mode="bilinear", align_corners=True)`` without
    upsampling: (B, C, h, w) channels-last -> (B, C), one pass over the small map."""
    b, c, h, w = y.shape
    weights = _upsampled_mean_weights((h, w), tuple(size), y.dtype)
    return torch.matmul(weights, y.permute(0, 2, 3, 1).reshape(b, h * w, c))


def scaled_sum_dyrelu_(maps: list[Tensor], scales: list[Tensor], shift: Tensor, coefficients: list[Tensor]) -> Tensor:
    """maps[0] <- DyReLU-B(shift + sum_i maps[i] * scales[i]), in place: the block's last step in one pass.

    maps: (B, C, H, W) channels-last; scales, shift and the DyReLU coefficients a1, b1, a2, b2: (B, C) each.
    DyReLU is max(f * a1 + b1, f * a2 + b2) of the sum f; its coefficients come from f's mean, which the
    caller knows without f (the means of the maps). Works a slab of rows at a time, so each map is read
    once from memory and maps[0] written once, the sum and the first piece staying in cache.
    """
    b, c, h, w = maps[0].shape
    rows = [m.permute(0, 2, 3, 1).view(b, h * w, c) for m in maps]
    scales = [s.view(b, 1, c) for s in scales]
    shift = shift.view(b, 1, c)
    a1, b1, a2, b2 = (t.view(b, 1, c) for t in coefficients)
    step = max(1, SLAB_FLOATS // (b * c))  # rows per slab
    buf = rows[0].new_empty(b, min(step, h * w), c)
    for r in range(0, h * w, step):
        stop = min(r + step, h * w)
        f = rows[0][:, r:stop]
        torch.addcmul(shift, f, scales[0], out=f)
        for m, s in zip(rows[1:], scales[1:]):
            f.addcmul_(m[:, r:stop], s)
        first = torch.addcmul(b1, f, a1, out=buf[:, : f.shape[1]])
        torch.maximum(first, torch.addcmul(b2, f, a2, out=f), out=f)
    return maps[0]


def upsample_into(y: Tensor, out: Tensor) -> Tensor:
    """``F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=True)`` written into ``out``
    (B, C, H, W), channels-last like y: a buffer kept from block to block instead of a fresh map."""
    return torch.ops.aten.upsample_bilinear2d.out(y, list(out.shape[-2:]), True, None, None, out=out)


def block_forward_cpu(block: DyHeadBlock, features: list[Tensor], workspace: dict | None) -> list[Tensor]:
    """``DyHeadBlock.forward_cpu_inference``: levels (B, C_in, H_l, W_l), P3 first -> (B, C, H_l, W_l)
    channels-last; ``workspace``: the dict the blocks of one tower call share (table and buffers).

    The offset convs of all levels; the sample points of the block's 13 deformable convs at once; then per
    level each deformable conv into a channels-last buffer, with its GroupNorm statistics (for "high" then
    the upsampling), the scale-aware weights and DyReLU's coefficients from means only, and one pass that
    sums the maps and applies DyReLU.
    """
    dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32  # sample points, maps
    table_dtype = cpu_gemm_dtype(dtype)  # bfloat16 under the user's bfloat16 autocast (see forward_fast)
    key = ("sampling_table", table_dtype, tuple(tuple(x.shape) for x in features))
    mid, low, high = block.spatial_mid, block.spatial_low, block.spatial_high
    with torch.autocast("cpu", enabled=False):
        reuse = workspace.get(key) if workspace is not None else None
        table, starts = sampling_table(features, reuse, table_dtype)
        mats = {conv: gemm_weight(conv.weight, table_dtype) for conv in (mid, low, high)}
    if workspace is not None:
        workspace[key] = table
    sizes = [tuple(x.shape[-2:]) for x in features]
    batch, channels = features[0].shape[0], mid.weight.shape[0]
    # Buffers kept in the workspace for the next blocks (a fresh large tensor costs a page fault per 4 KiB):
    # a level's conv outputs and upsampled map live until the level is done; the "mid" output becomes the
    # block's output, read by the next block, so its buffers alternate between two sets.
    parity = 0
    if workspace is not None:
        parity = workspace["blocks_done"] = workspace.get("blocks_done", -1) + 1

    def buffer(role: str, level: int, size: tuple[int, int]) -> Tensor:
        shape = (batch * size[0] * size[1], channels)
        key = ("buffer", role, level, parity % 2 if role == "mid" else 0)
        buf = None if workspace is None else workspace.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype)
            if workspace is not None:
                workspace[key] = buf
        return buf

    # The offset convs, then the sample points of all 13 convs at once (deform_batch), then per level
    convs = []  # (level, role, conv, segment)
    offsets, masks = [], []
    for level, x in enumerate(features):
        om = block.offset(x)  # (B, 27, H, W), under the caller's autocast like the reference
        with torch.autocast("cpu", enabled=False):
            om = om.to(dtype).contiguous()
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            sources = [("mid", mid, level)] + [("low", low, level - 1)] * (level > 0)
            sources += [("high", high, level + 1)] * (level + 1 < len(sizes))
            for role, conv, i in sources:
                fitted = conv.fit_offset(offset, mask, sizes[i], block.offset_mode)
                offsets.append(fitted[0])
                masks.append(fitted[1])
                h, w = fitted[0].shape[-2:]
                convs.append((level, role, conv, Segment(batch, h, w, *sizes[i], conv.stride, starts[i])))
    segments = [c[-1] for c in convs]
    index, weights = bilinear_taps_many(offsets, masks, segments)
    taps = zip(index.split([s.taps for s in segments]), weights.to(table_dtype).split([s.taps for s in segments]))
    taps_of = {(level, role): t for (level, role, *_), t in zip(convs, taps)}
    biases = {conv: conv.bias.to(table_dtype) for conv in (mid, low, high)}

    outs = []
    for level in range(len(features)):
        with torch.autocast("cpu", enabled=False):
            maps, stats, pooled, norms = [], [], [], []
            for _, role, conv, seg in (c for c in convs if c[0] == level):
                out = buffer(role, level, (seg.h, seg.w))
                y = conv_rows(table, *taps_of[level, role], mats[conv], biases[conv], out)
                y = y.view(batch, seg.h, seg.w, channels).permute(0, 3, 1, 2)  # (B, C, h, w) channels-last
                stats.append(channel_stats(y))
                pooled.append(stats[-1][0])  # the mean of y, (B, C)
                if role == "high":  # GroupNorm is affine per channel, so it commutes with the upsampling
                    pooled[-1] = upsampled_mean(y, sizes[level])
                    up = buffer("upsampled", level, sizes[level]).view(batch, *sizes[level], channels)
                    y = upsample_into(y, up.permute(0, 3, 1, 2))
                maps.append(y)
                norms.append(conv.norm)
            scales, shift, coefficients = fold_attention(block, norms, stats, pooled)
            outs.append(scaled_sum_dyrelu_(maps, scales, shift, [t.flatten(1) for t in coefficients]))
    return outs
