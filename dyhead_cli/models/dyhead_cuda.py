"""One DyHead block without autograd on CUDA: the deformable convs as one fused Triton kernel each.

``block_forward_fused(block, features)`` is ``DyHeadBlock.forward`` with torchvision's ``deform_conv2d``
replaced by ``deform_triton.deform_conv3x3_triton`` (bilinear sampling inside the GEMM, no column buffer);
offset conv, offset fitting, GroupNorm and the attention weights are the reference code itself, the weighted
mean of the maps and DyReLU are computed in place with fewer passes (as ``forward_fast``), so the two agree
to float32 rounding. Off the "modules" end (``EPILOGUE``) the block's end is ``fold_triton``'s passes.

Precision: the convs compute in the autocast dtype under autocast (bf16 / fp16 columns and weights, float32
sample points and accumulation), else in the features' dtype (float32: an IEEE float32 dot, equal to
torchvision's op to float32 rounding). torchvision's op runs in float32 under autocast instead; the fused
kernel's bf16 columns are the price of its speed, measured against the float32 reference by
``benchmarks/gpu_tower.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dyhead_cli.models import deform_triton, fold_triton
from dyhead_cli.models.dyhead_cpu import fold_attention

if TYPE_CHECKING:  # dyhead.py imports this module
    from dyhead_cli.models.dyhead import DeformConvNorm, DyHeadBlock

# Off CPU, "fast" uses grid_sample + GEMM (models/deform_export.deform_conv2d_sampled) from this batch size
# on where the convs compute in float32: with autograd (the fused kernel has none) and without it. On an H100
# (benchmarks/gpu_tower.py, 800x1333, 6 x 256, fp32) at batch 8: grid_sample + GEMM 86 ms (81 ms as a CUDA
# graph), the fused kernel 123-140 ms, torchvision's op 102 ms; at batch 1 grid_sample + GEMM took 123 ms
# eagerly (launch-bound), the fused kernel 50 ms, torchvision's op 67 ms. In bf16 / fp16 the fused kernel won
# at both batch sizes (66 ms vs 90-122 ms at batch 8).
SAMPLED_MIN_BATCH = 8
# After the convs: "inline", two Triton passes per conv output with GroupNorm and the attentions folded into
# per-channel numbers and the "high" map upsampled inside them (models/fold_triton.py; no upsampled map, no
# layout copies), "folded", the same with the upsampled map made first (upsample_aligned), or "modules",
# GroupNorm modules and the reference's attention code. Chosen by ``benchmarks/tower_choice.py`` from
# ``gpu_tower.py`` (CUDA graphs, 6 x 256 at 800x1333) on an H100, 2026-11-27
# (benchmarks/results/h100-inline/tower.json): inline took 0.66x the modules' time, folded 0.74x (geometric
# means of five cases; bf16 8.3 / 24.4 ms at batch 1 / 8 against 9.1 / 29.3 folded and 12.9 / 40.8 modules;
# fp16 alike; float32 at batch 1 12.7 against 13.4 / 15.7). Two more runs on the same machine gave the same
# (h100-inline-rerun/, h100-default/).
# Like deform_triton.METHOD / CONFIG, set it before a tower's first call: captured CUDA graphs replay what they
# captured (``DyHead.set_impl`` drops them).
EPILOGUES = ("modules", "folded", "inline")
EPILOGUE = "inline"


def upsample_aligned(y: Tensor, size: tuple[int, int], channels_last: bool | None = None) -> Tensor:
    """``F.interpolate(y, size, mode="bilinear", align_corners=True)``, the "high" map's upsampling: (B, C, h, w)
    -> (B, C, *size), contiguous NCHW like the input.

    On CUDA (``channels_last`` None: where y is) it runs on a channels-last copy: PyTorch's NCHW bilinear
    kernel gives each thread one output position and loops over all B x C channels, which took 12.5 of the
    50.8 ms of GPU time of the bf16 tower at batch 8 on an H100 (``gpu_tower.py --profile``); its NHWC kernel
    has a thread per output element. Both compute each element with the same formula; the two layout copies
    are one pass over y and one over the output.
    """
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()  # export: the plain op in the graph
    if tracing or not (y.is_cuda if channels_last is None else channels_last):
        return F.interpolate(y, size=size, mode="bilinear", align_corners=True)
    y = y.contiguous(memory_format=torch.channels_last)
    return F.interpolate(y, size=size, mode="bilinear", align_corners=True).contiguous()


def compute_dtype(features: list[Tensor]) -> torch.dtype:
    """The dtype the fused convs run in: the autocast dtype under autocast, else the features' own."""
    device = features[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return features[0].dtype


def fused_path_applies(features: list[Tensor]) -> bool:
    """True where ``block_forward_fused`` can run: no autograd, Triton on the features' device, a dtype the
    kernel takes (float32, float16, bfloat16)."""
    return (
        not torch.is_grad_enabled()
        and deform_triton.available(features[0].device)
        and compute_dtype(features) in deform_triton.DTYPES
    )


def sampled_path_applies(features: list[Tensor]) -> bool:
    """True where "fast" off CPU runs grid_sample + GEMM: float32 convs from ``SAMPLED_MIN_BATCH`` images on."""
    return features[0].shape[0] >= SAMPLED_MIN_BATCH and compute_dtype(features) == torch.float32


def inference_path(features: list[Tensor]) -> str | None:
    """What "fast" runs on CUDA without autograd, by the H100 measurements above: "sampled" (grid_sample +
    GEMM), "fused" (the Triton kernel), or None (autograd, CPU, no working Triton for this dtype): the
    reference code. Both named paths can be captured in CUDA graphs; torchvision's op cannot."""
    if torch.is_grad_enabled() or not features[0].is_cuda:
        return None
    if sampled_path_applies(features):
        return "sampled"
    return "fused" if fused_path_applies(features) else None


def raw_conv(conv: DeformConvNorm, x_cl: Tensor, offset: Tensor, mask: Tensor, offset_mode: str, weight_mat: Tensor) -> Tensor:
    """The deformable conv of ``conv`` without its GroupNorm: (B, C, H, W) channels-last -> (B, C_out, h, w)."""
    offset, mask = conv.fit_offset(offset, mask, tuple(x_cl.shape[-2:]), offset_mode)
    return deform_triton.deform_conv3x3_triton(x_cl, offset, mask, weight_mat, conv.bias, conv.stride)


def conv_norm(conv: DeformConvNorm, x_cl: Tensor, offset: Tensor, mask: Tensor, offset_mode: str, weight_mat: Tensor) -> Tensor:
    """``DeformConvNorm.forward`` on a channels-last x already in the compute dtype: (B, C, H, W) ->
    (B, C_out, h, w), GroupNorm applied (float32 under autocast, as the reference)."""
    return conv.norm(raw_conv(conv, x_cl, offset, mask, offset_mode, weight_mat))


def folded_level(
    block: DyHeadBlock, convs: list[DeformConvNorm], ys: list[Tensor], size: tuple[int, int], has_high: bool
) -> Tensor:
    """One level's output from its 2-3 raw conv outputs ``ys`` (mid, [low], [high at level l+1's size, when
    ``has_high``]) -> (B, C, *size),
    with GroupNorm, the scale-aware weights and DyReLU folded into per-(image, channel) numbers.

    GroupNorm is ``y * scale + shift`` from y's channel statistics (``dyhead_cpu.fold_attention``, shared with
    the CPU path); it is
    affine per channel, so it commutes with the "high" map's bilinear upsampling, which therefore runs on the
    raw conv output; the scale-aware weights need each normalised map's mean, DyReLU's coefficients the mean
    of their weighted sum; one kernel then sums the raw maps and applies DyReLU (``fold_triton``).
    """
    norms = [conv.norm for conv in convs]
    stats = [fold_triton.channel_stats(y) for y in ys]
    maps, pooled = list(ys), [mean for mean, _ in stats]
    inline = has_high and EPILOGUE == "inline"
    if inline:  # the upsampled map's mean from the small one; the sum kernel samples it
        pooled[-1] = fold_triton.upsampled_mean(ys[-1], size)
    elif has_high:
        maps[-1] = upsample_aligned(ys[-1], size)
        pooled[-1] = torch.mean(maps[-1], dim=(2, 3), dtype=torch.float32)
    scales, shift, coefficients = fold_attention(block, norms, stats, pooled)  # float32 (the statistics')
    out_dtype = torch.promote_types(ys[0].dtype, norms[0].weight.dtype)  # float32 under autocast, as GroupNorm
    return fold_triton.scaled_sum_dyrelu(maps, scales, shift, list(coefficients), out_dtype, upsample_last=inline)


def block_forward_fused(block: DyHeadBlock, features: list[Tensor]) -> list[Tensor]:
    """levels (B, C_in, H_l, W_l), P3 first -> the same levels with C channels (NCHW), as ``block.forward``.

    Each level is converted once to channels-last in the compute dtype and read by the 2-3 convs that sample
    it; each conv's (9 C_in, C) weight matrix is made once per call.
    """
    dtype = compute_dtype(features)
    mid, low, high = block.spatial_mid, block.spatial_low, block.spatial_high
    mats = {conv: deform_triton.weight_rows(conv.weight, dtype) for conv in (mid, low, high)}
    xs = [x.to(dtype).contiguous(memory_format=torch.channels_last) for x in features]
    mode = block.offset_mode
    outs = []
    for level, x in enumerate(features):
        offset, mask = block.offset_and_mask(x)
        if EPILOGUE in ("folded", "inline"):
            convs = [(mid, level)] + [(low, level - 1)] * (level > 0) + [(high, level + 1)] * (level + 1 < len(features))
            ys = [raw_conv(conv, xs[i], offset, mask, mode, mats[conv]) for conv, i in convs]
            size, has_high = tuple(x.shape[-2:]), level + 1 < len(features)
            outs.append(folded_level(block, [conv for conv, _ in convs], ys, size, has_high))
            continue
        maps = [conv_norm(mid, xs[level], offset, mask, mode, mats[mid])]
        if level > 0:
            maps.append(conv_norm(low, xs[level - 1], offset, mask, mode, mats[low]))
        if level < len(features) - 1:
            y = conv_norm(high, xs[level + 1], offset, mask, mode, mats[high])
            maps.append(upsample_aligned(y, tuple(x.shape[-2:])))
        # the mean of pi_L(f) * f over the maps as one product and 1-2 in-place multiply-adds, DyReLU in place
        # (as forward_fast): 4 + 7 passes over a level's maps instead of 13 + 11
        n = len(maps)
        fused = maps[0].mul_(block.scale_weight(maps[0]) / n)
        for f in maps[1:]:
            fused.addcmul_(f, block.scale_weight(f) / n)
        outs.append(block.task_attn.forward_fused(fused))
    return outs
