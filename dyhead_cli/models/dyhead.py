"""The Dynamic Head tower (Dai et al., CVPR 2021), faithful to the official code.

One block applies, per pyramid level l (P3 first, the largest map):
  spatial-aware:  three modulated deformable 3x3 convs (DCNv2) + GroupNorm(16), sharing one offset/mask
                  map computed from level l: on x[l] (mid), on x[l-1] with stride 2 (low), on x[l+1]
                  then bilinear upsampling with align_corners=True (high);
  scale-aware:    each of those maps f is weighted by hsig(ReLU(conv1x1(avgpool(f)))), then averaged;
  task-aware:     DyReLU-B (K=2): max(x * a1 + b1, x * a2 + b2) with per-channel coefficients.

The official code, its hard sigmoid (ReLU6(x + 3) / 6) and its quirks win over the paper where they
differ; see docs/dyhead-design.md. The "high" conv's offsets come from level l's larger map and must be
fitted to level l+1's output size: ``offset_mode`` says how (each set of published weights needs its own).

Two implementations (the ``impl`` constructor argument): "reference" calls torchvision's ``deform_conv2d``
per conv (the test oracle); "fast" (the default) runs a block's deformable convs on CPU with
``models/deform.py`` (one channels-last sampling table of all levels, weighted row gathers, GEMMs), ~4x
faster on 2 cores and equal to the reference to float32 rounding. On CUDA without autograd "fast" runs
each deformable conv as one Triton kernel with the bilinear sampling fused into the GEMM
(``models/dyhead_cuda.py``, ``models/deform_triton.py``; float32 from batch 8 on: grid_sample + GEMM, faster
there on an H100) and ``DyHead`` replays the tower from CUDA graphs (``models/cuda_graph.py``); with autograd
on CUDA it is grid_sample + GEMM from batch 8 on, torchvision's op below. ``DyHeadBlock.forward_fast``
(gather + GEMM) also runs on CUDA when called directly, measured by benchmarks/gpu_tower.py.

Initialisation follows the official code: the DCN weights keep the DCN's own init (uniform in
+-1/sqrt(9 C_in), bias 0), the offset conv keeps PyTorch's default, the scale branch's 1x1 conv is
N(0, 0.01); ``zero_init_offset=True`` is MMDetection's zero-initialised offset conv.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from dyhead_cli.errors import check_choice
from dyhead_cli.models import dyhead_cuda
from dyhead_cli.models.cuda_graph import GraphCache
from dyhead_cli.models.deform import (
    GemmWeight,
    cpu_gemm_dtype,
    deform_conv2d_from_table,
    gemm_weight,
    sampling_table,
)
from dyhead_cli.models.deform_export import deform_conv2d_export, deform_conv2d_sampled
from dyhead_cli.models.deform_triton import KernelFailed
from dyhead_cli.models.dyhead_cpu import SLAB_FLOATS, block_forward_cpu
from dyhead_cli.models.dyhead_cuda import block_forward_fused

OFFSET_MODES = ("official", "mmdet", "aligned")
IMPLS = ("fast", "reference", "export")  # "export": grid_sample + matmul (models/deform_export.py), for ONNX


def hard_sigmoid(x: Tensor) -> Tensor:
    """The official code's h_sigmoid: ReLU6(x + 3) / 6 (the paper's (x + 1) / 2 is not what was trained)."""
    return F.relu6(x + 3.0) / 6.0


def fit_offset_to_output(offset: Tensor, mask: Tensor, size: tuple[int, int], mode: str) -> tuple[Tensor, Tensor]:
    """Fit an offset (B, 18, H, W) and mask (B, 9, H, W) to a convolution's output size (h, w) <= (H, W).

    official: the official CUDA kernel and mmcv's kernel (every MMDetection release up to 3.3.0) read each
              image's map as a flat buffer laid out for (h, w): the first 18*h*w offset values and the
              first 9*h*w mask values (microsoft/DynamicHead issue #25).
    mmdet:    MMDetection's main branch after PR #11150 slices ``[:, :, :h, :w]``; the mask is a new,
              truly cropped tensor, but the sliced offset stays a view that mmcv does not make contiguous,
              so its kernel still reads the offset as the same flat prefix. Flat offset, cropped mask.
    aligned:  the map resampled to (h, w), offsets rescaled to the coarser grid (what the paper describes).
    """
    b, _, big_h, big_w = offset.shape
    h, w = size
    if (big_h, big_w) == (h, w):
        return offset, mask
    if mode in ("official", "mmdet"):
        # (B, 18, H, W) -> (B, 18*H*W) -> first 18*h*w values -> (B, 18, h, w)
        offset = offset.reshape(b, -1)[:, : 18 * h * w].reshape(b, 18, h, w)
        if mode == "official":
            mask = mask.reshape(b, -1)[:, : 9 * h * w].reshape(b, 9, h, w)
        else:
            mask = mask[:, :, :h, :w]
    elif mode == "aligned":
        offset = F.interpolate(offset, size=(h, w), mode="bilinear", align_corners=False)
        # (B, 18, h, w) -> (B, 9, 2, h, w): (dy, dx) per tap, each in the coarser grid's pixels
        # (the scales as Python scalars, not a tensor of them: torch.export keeps them symbolic then)
        off = offset.reshape(b, 9, 2, h, w)
        offset = torch.stack([off[:, :, 0] * (h / big_h), off[:, :, 1] * (w / big_w)], dim=2).reshape(b, 18, h, w)
        mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    else:
        check_choice("offset_mode", mode, OFFSET_MODES)
    return offset.contiguous(), mask.contiguous()


@dataclass
class BlockTrace:
    """What one DyHead block did, per level (P3 first); tensors are (B, C, H, W) unless noted.

    Filled by ``DyHead.forward(features, traces=[])`` for ``dyhead visualize --attention``.
    """

    inputs: list[Tensor] = field(default_factory=list)
    offsets: list[Tensor] = field(default_factory=list)  # (B, 18, H, W): (dy, dx) per tap, in feature cells
    masks: list[Tensor] = field(default_factory=list)  # (B, 9, H, W) in 0..1
    scale: list[dict[str, float]] = field(default_factory=list)  # pi_L of the "low" / "mid" / "high" map (image 0)
    fused: list[Tensor] = field(default_factory=list)  # mean of pi_L(f) * f over the 2-3 maps
    outputs: list[Tensor] = field(default_factory=list)  # after DyReLU: the block's output


class DeformConvNorm(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2, torchvision's op) followed by GroupNorm(16)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.norm = nn.GroupNorm(16, out_channels)
        # the official ModulatedDeformConv's own init: uniform in +-1/sqrt(fan_in), bias 0
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def output_size(self, x: Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        return (h - 1) // self.stride + 1, (w - 1) // self.stride + 1

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor, offset_mode: str, exportable: bool = False) -> Tensor:
        """``exportable``: standard ops only (``deform_export``) instead of torchvision's op; same result.
        Off CPU, ``impl="fast"`` blocks pass ``exportable="sampled"``: the same ops, the GEMM in the
        autocast dtype (``deform_conv2d_sampled``)."""
        offset, mask = fit_offset_to_output(offset, mask, self.output_size(x), offset_mode)
        conv = {False: deform_conv2d, True: deform_conv2d_export, "sampled": deform_conv2d_sampled}[exportable]
        y = conv(x, offset, self.weight, self.bias, stride=self.stride, padding=1, mask=mask)
        return self.norm(y)

    def fit_offset(self, offset: Tensor, mask: Tensor, in_size: tuple[int, int], offset_mode: str) -> tuple[Tensor, Tensor]:
        """The block's offset and mask fitted to this conv's output size on an input of ``in_size``."""
        h, w = (in_size[0] - 1) // self.stride + 1, (in_size[1] - 1) // self.stride + 1
        return fit_offset_to_output(offset, mask, (h, w), offset_mode)

    def forward_from_table(
        self,
        table: Tensor,
        row_start: int,
        in_size: tuple[int, int],
        offset: Tensor,
        mask: Tensor,
        offset_mode: str,
        weight_mat: GemmWeight,
        channels_last: bool = False,
    ) -> Tensor:
        """``forward`` for an x stored in a sampling table (see ``deform.sampling_table``).

        ``weight_mat``: this conv's ``deform.weight_matrix`` in the table's dtype, as a ``GemmWeight``
        (made once per block call); ``channels_last`` (CUDA only): the conv's output in channels-last memory.
        """
        offset, mask = self.fit_offset(offset, mask, in_size, offset_mode)
        bias = self.bias.to(weight_mat.matrix.dtype)
        y = deform_conv2d_from_table(
            table, row_start, in_size, offset, mask, weight_mat, bias, (self.stride,) * 2, channels_last=channels_last
        )
        return self.norm(y.to(self.norm.weight.dtype))  # GroupNorm in float32 after a low-precision GEMM, as autocast


def make_divisible(v: float, divisor: int = 4) -> int:
    """The official DyReLU's rounding of its squeeze width (MobileNet's _make_divisible)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def dyrelu_whole_map_(x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """max(x * a1 + b1, x * a2 + b2) written into x (B, C, H, W), coefficients (B, C, 1, 1): four kernels
    over the whole map (``DyReLU.forward_fused`` off CPU)."""
    first = torch.addcmul(b1, x, a1)
    return torch.maximum(first, x.mul_(a2).add_(b2), out=x)


class DyReLU(nn.Module):
    """Task-aware attention, DyReLU-B with K=2: two per-channel linear pieces, take the max."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, 4 * channels)

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> a1, b1, a2, b2, each (B, C, 1, 1)."""
        return self.coefficients_from_mean(x.mean(dim=(2, 3)))  # pooled per image and per level

    def coefficients_from_mean(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``coefficients`` from the map's mean over (H, W), y (B, C)."""
        y = hard_sigmoid(self.fc2(F.relu(self.fc1(y))))
        a1, b1, a2, b2 = y[:, :, None, None].split(self.channels, dim=1)
        return (a1 - 0.5) * 2.0 + 1.0, b1 - 0.5, (a2 - 0.5) * 2.0, b2 - 0.5

    def forward(self, x: Tensor) -> Tensor:
        a1, b1, a2, b2 = self.coefficients(x)
        return torch.maximum(x * a1 + b1, x * a2 + b2)

    def forward_fused(self, x: Tensor) -> Tensor:
        """``forward`` in 3 passes over x instead of 5 (b + x * a fused by addcmul). Without autograd it
        overwrites x: on CPU a slab of channels at a time (the slab's first piece goes to a small buffer that
        stays in cache, so a large map is read and written once from memory instead of three times), on other
        devices in four whole-map kernels (a slab loop would be hundreds of tiny launches there)."""
        a1, b1, a2, b2 = self.coefficients(x)
        if torch.is_grad_enabled() and (x.requires_grad or a2.requires_grad):  # autograd: nothing in place
            return torch.maximum(torch.addcmul(b1, x, a1), torch.addcmul(b2, x, a2))
        if x.device.type != "cpu":
            return dyrelu_whole_map_(x, a1, b1, a2, b2)
        step = max(1, SLAB_FLOATS // (x.shape[0] * x.shape[2] * x.shape[3]))  # channels per slab
        buf = x.new_empty(x.shape[0], min(step, x.shape[1]), *x.shape[2:])
        for c in range(0, x.shape[1], step):
            xs, cs = x[:, c : c + step], slice(c, c + step)
            first = torch.addcmul(b1[:, cs], xs, a1[:, cs], out=buf[:, : xs.shape[1]])
            torch.maximum(first, xs.mul_(a2[:, cs]).add_(b2[:, cs]), out=xs)
        return x


class DyHeadBlock(nn.Module):
    """One block: spatial-, scale- and task-aware attention over a list of levels (largest first)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        offset_mode: str = "official",
        zero_init_offset: bool = False,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        check_choice("offset_mode", offset_mode, OFFSET_MODES)
        check_choice("impl", impl, IMPLS)
        self.offset_mode = offset_mode
        self.impl = impl
        # forward_fast on CUDA under autocast: gather and GEMM in the autocast dtype instead of float32
        # (sample points stay float32). Off by default: torchvision's op runs in float32 under autocast.
        self.fast_low_precision = False
        # forward_fast on CUDA: deformable conv outputs in channels-last memory (a GEMM without transpose)
        self.fast_channels_last = False
        # "fast" off CPU without autograd: the fused Triton convs (False: the autograd path's choice instead;
        # benchmarks/gpu_tower.py compares them)
        self.fast_fused = True
        self.offset = nn.Conv2d(in_channels, 27, 3, padding=1)
        self.spatial_high = DeformConvNorm(in_channels, channels, stride=1)
        self.spatial_mid = DeformConvNorm(in_channels, channels, stride=1)
        self.spatial_low = DeformConvNorm(in_channels, channels, stride=2)
        self.scale_attn = nn.Conv2d(channels, 1, 1)
        # The official DyReLU rounds C/4 to a multiple of 4, MMDetection takes int(C/4): the same for every
        # C that GroupNorm(16) allows.
        self.task_attn = DyReLU(channels, make_divisible(channels // 4, 4))
        nn.init.normal_(self.scale_attn.weight, 0.0, 0.01)
        nn.init.zeros_(self.scale_attn.bias)
        if zero_init_offset:
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)

    def scale_weight(self, f: Tensor) -> Tensor:
        """pi_L(f) = hsig(ReLU(conv1x1(avgpool(f)))): (B, C, H, W) -> (B, 1, 1, 1)."""
        return hard_sigmoid(F.relu(self.scale_attn(f.mean(dim=(2, 3), keepdim=True))))

    def offset_and_mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        om = self.offset(x)  # (B, 27, H, W): 9 (dy, dx) pairs, then 9 mask logits
        return om[:, :18], om[:, 18:].sigmoid()

    def forward(self, features: list[Tensor], trace: BlockTrace | None = None, workspace: dict | None = None) -> list[Tensor]:
        """levels (B, C_in, H_l, W_l), P3 first -> the same levels with C channels.

        ``trace``: record the block's intermediates into it (runs the reference convs). ``workspace``: a
        dict shared by the blocks of one tower call, in which the fast path keeps buffers for the next block.
        """
        on_cpu = features[0].device.type == "cpu"
        if trace is None and self.impl == "fast" and on_cpu:
            return self.forward_fast(features, workspace)
        if trace is None and self.impl == "fast" and self.fast_fused and dyhead_cuda.inference_path(features) == "fused":
            try:
                return block_forward_fused(self, features)  # CUDA inference: fused Triton convs
            except KernelFailed as e:  # an old Triton or GPU: torchvision's op from now on, said once
                warnings.warn(f"fused deformable conv kernel unavailable, using torchvision's op: {e}", stacklevel=2)
        outs = []
        # Off CPU, "fast" is one grid_sample + one GEMM per conv (models/deform_export.py) where the convs
        # compute in float32 from dyhead_cuda.SAMPLED_MIN_BATCH images on (and with autograd in any dtype from
        # there: autocast runs it in the autocast dtype), torchvision's op otherwise (see dyhead_cuda).
        sampled = self.impl == "fast" and not on_cpu and features[0].shape[0] >= dyhead_cuda.SAMPLED_MIN_BATCH
        exportable: bool | str = self.impl == "export" or ("sampled" if sampled else False)
        mode = self.offset_mode
        for level, x in enumerate(features):
            offset, mask = self.offset_and_mask(x)
            maps = {"mid": self.spatial_mid(x, offset, mask, mode, exportable)}
            if level > 0:
                maps["low"] = self.spatial_low(features[level - 1], offset, mask, mode, exportable)
            if level < len(features) - 1:
                high = self.spatial_high(features[level + 1], offset, mask, mode, exportable)
                maps["high"] = dyhead_cuda.upsample_aligned(high, tuple(x.shape[-2:]))
            weights = {name: self.scale_weight(f) for name, f in maps.items()}  # (B, 1, 1, 1) each
            fused = torch.stack([f * weights[name] for name, f in maps.items()]).mean(dim=0)
            outs.append(self.task_attn(fused))
            if trace is not None:
                trace.inputs.append(x)
                trace.offsets.append(offset)
                trace.masks.append(mask)
                trace.scale.append({name: float(w.flatten()[0]) for name, w in weights.items()})
                trace.fused.append(fused)
                trace.outputs.append(outs[-1])
        return outs

    def forward_fast(self, features: list[Tensor], workspace: dict | None = None) -> list[Tensor]:
        """``forward`` with ``deform.py``'s deformable convs; the same result to float32 rounding.

        All levels go into one sampling table, built once and read by the 2-3 convs that sample each
        level. The deformable convs run in float32 (float64 if the features are) with autocast off, as
        torchvision's kernels do (its CUDA op is autocast to float32 too), except under a bfloat16 CPU
        autocast (``deform.cpu_gemm_dtype``, the user's opt-in: table, gathers and GEMMs in bfloat16, outputs
        float32, about 1.7x faster); with ``fast_low_precision`` on CUDA under autocast the gather and GEMM
        use the autocast dtype, with ``fast_channels_last`` on CUDA the convs return channels-last maps.
        Dispatched by ``forward`` on CPU; also runs on CUDA when called directly.
        """
        device = features[0].device.type
        if device == "cpu" and not torch.is_grad_enabled():
            return self.forward_cpu_inference(features, workspace)
        dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32  # sample points
        table_dtype = dtype
        if self.fast_low_precision and device != "cpu" and torch.is_autocast_enabled(device):
            table_dtype = torch.get_autocast_dtype(device)
        channels_last = self.fast_channels_last and device != "cpu"
        gemm_dtype = cpu_gemm_dtype(table_dtype) if device == "cpu" else table_dtype
        if device == "cpu":
            # bfloat16 GEMMs (the opt-in): gather bfloat16 rows too, 3x faster than gathering float32 ones
            # and rounding the columns, for about twice a plain rounding's error (sample points stay float32)
            table_dtype = gemm_dtype
        # Without autograd the previous block's sampling table is refilled (autograd may still need it).
        reusable = workspace is not None and not torch.is_grad_enabled()
        key = ("sampling_table", features[0].device, table_dtype, tuple(tuple(x.shape) for x in features))
        with torch.autocast(device, enabled=False):
            table, starts = sampling_table(features, workspace.get(key) if reusable else None, table_dtype)
            mid, low, high = self.spatial_mid, self.spatial_low, self.spatial_high
            mats = {conv: gemm_weight(conv.weight, gemm_dtype) for conv in (mid, low, high)}
        if reusable:
            workspace[key] = table
        sizes = [tuple(x.shape[-2:]) for x in features]
        mode, cl = self.offset_mode, channels_last
        outs = []
        for level, x in enumerate(features):
            offset, mask = self.offset_and_mask(x)
            with torch.autocast(device, enabled=False):
                offset, mask = offset.to(dtype), mask.to(dtype)
                maps = [mid.forward_from_table(table, starts[level], sizes[level], offset, mask, mode, mats[mid], cl)]
                if level > 0:
                    i = level - 1
                    maps.append(low.forward_from_table(table, starts[i], sizes[i], offset, mask, mode, mats[low], cl))
                if level < len(features) - 1:
                    i = level + 1
                    y = high.forward_from_table(table, starts[i], sizes[i], offset, mask, mode, mats[high], cl)
                    maps.append(dyhead_cuda.upsample_aligned(y, tuple(x.shape[-2:])))
            # as in forward, with fewer passes over the maps: sum of f * (pi_L(f) / n), then fused DyReLU
            weight = self.scale_weight(maps[0]) / len(maps)
            fused = maps[0].mul_(weight) if not torch.is_grad_enabled() else maps[0] * weight
            for f in maps[1:]:
                fused.addcmul_(f, self.scale_weight(f) / len(maps))
            outs.append(self.task_attn.forward_fused(fused))
        return outs

    def forward_cpu_inference(self, features: list[Tensor], workspace: dict | None = None) -> list[Tensor]:
        """``forward_fast`` on CPU without autograd: channels-last maps, GroupNorm, the scale-aware weighting
        and DyReLU folded into two passes over each conv output (``dyhead_cpu.block_forward_cpu``).

        levels (B, C_in, H_l, W_l), any memory layout -> (B, C, H_l, W_l) in channels-last memory (``DyHead``
        hands NCHW maps on). The same numbers as ``forward`` to float32 rounding.
        """
        return block_forward_cpu(self, features, workspace)

    def scale_weight_from_mean(self, pooled: Tensor) -> Tensor:
        """``scale_weight`` from the map's mean over (H, W): (..., C) -> (..., 1)."""
        return hard_sigmoid(F.relu(F.linear(pooled, self.scale_attn.weight.flatten(1), self.scale_attn.bias)))


class DyHead(nn.Module):
    """A tower of ``num_blocks`` DyHead blocks; takes and returns a list of levels (largest first).

    ``num_blocks = 0`` is the identity, which gives the paper's "without DyHead" baseline.

    On CUDA without autograd (impl "fast", the fused Triton path) the tower is replayed from CUDA graphs,
    one per input signature, captured the second time a signature comes (``cuda_graph.GraphCache``; set
    ``cuda_graphs = False`` to run eagerly). ``train()``, ``.to()`` and ``.half()`` drop the graphs.
    """

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        offset_mode: str = "official",
        in_channels: int | None = None,
        zero_init_offset: bool = False,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        in_channels = channels if in_channels is None else in_channels
        self.channels = channels
        self.offset_mode = offset_mode
        self.impl = impl
        self.blocks = nn.ModuleList(
            DyHeadBlock(in_channels if i == 0 else channels, channels, offset_mode, zero_init_offset, impl)
            for i in range(num_blocks)
        )
        self.cuda_graphs = True
        self.graphs = GraphCache()

    def train(self, mode: bool = True) -> DyHead:
        self.graphs.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): parameters move, graphs go stale
        self.graphs.clear()
        return super()._apply(fn, recurse)

    def set_impl(self, impl: str) -> DyHead:
        """Switch the deformable conv implementation of a built tower (tests and benchmarks compare both
        on the same weights); models are built with the ``impl`` constructor argument."""
        check_choice("impl", impl, IMPLS)
        self.impl = impl
        self.graphs.clear()
        for block in self.blocks:
            block.impl = impl
        return self

    def forward(self, features: list[Tensor], traces: list[BlockTrace] | None = None) -> list[Tensor]:
        """levels P3 first, (B, C_in, H_l, W_l) -> (B, C, H_l, W_l); ``traces``: a list to append one
        ``BlockTrace`` per block to (``dyhead visualize --attention``)."""
        features = list(features)
        # only the fused path is graphed (torchvision's CUDA op gave wrong outputs under capture on an H100);
        # its kernel is compiled by the first, eager call of a signature, before any capture
        graphable = traces is None and self.cuda_graphs and self.impl == "fast" and len(self.blocks) > 0
        graphable = graphable and all(block.fast_fused and block.impl == "fast" for block in self.blocks)
        if graphable and dyhead_cuda.inference_path(features) is not None:
            return self.graphs(self._forward_blocks, features)
        return self._forward_blocks(features, traces)

    def _forward_blocks(self, features: list[Tensor], traces: list[BlockTrace] | None = None) -> list[Tensor]:
        workspace: dict = {}  # buffers the blocks pass on (see DyHeadBlock.forward)
        for block in self.blocks:
            trace = None
            if traces is not None:
                trace = BlockTrace()
                traces.append(trace)
            features = block(features, trace, workspace)
        return [f.contiguous() for f in features]  # NCHW (the fast CPU path works channels-last)
