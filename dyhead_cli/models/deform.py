"""Modulated deformable 3x3 convolution (DCNv2) on CPU, built from fast primitives.

Why this exists: torchvision's CPU ``deform_conv2d`` fills its column matrix with a scalar bilinear loop,
which makes a 6-block, 256-channel DyHead tower on a 640x640 image's P3..P7 take ~3.5 s on 2 cores.
Bilinear sampling is a sparse linear map (4 weighted neighbours per sample, the same for every channel),
so with the input laid out channels-last as a table of rows (one row of C values per pixel),
``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes it as a weighted gather-and-add of
whole rows, which is vectorised; the (positions, 9*C) column matrix then meets the weight in one GEMM
(per chunk of positions).
Only differentiable torch ops are used, so autograd gives the gradients w.r.t. input, offset, mask,
weight and bias.

Assumptions (what DyHead uses): 3x3 kernel, dilation 1, one offset group, one weight group.
``deform_conv2d_fast`` takes CPU tensors only; anything else (CUDA tensors included) goes to
torchvision's op, the reference. The table functions below also run on CUDA (one gather and one
batched GEMM per conv there), which ``DyHeadBlock.forward_fast`` uses when called on CUDA tensors.

Sampling semantics are torchvision's: tap k = 3*i + j of output pixel (y, x) samples the input at
(y*stride - pad + i + offset[2k], x*stride - pad + j + offset[2k+1]) (integer = pixel centre),
bilinearly, with neighbours outside the image contributing 0, times mask[k]. Zero padding of the
table (1 pixel before, 2 after, each side) plus clamping the sample point to [-1, size] makes every
neighbour a valid row, so no bounds masks are needed.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from dyhead_cli.models.deform_signature import Pair, output_size, torchvision_signature

PAD_BEFORE, PAD_AFTER = 1, 2  # zero rows/columns around each image in the sampling table
# table rows as int32: half the memory of int64 indices, and gathers as fast in a 640-px tower (a table
# holds far fewer than 2**31 rows: 2**31 rows of 256 float32 would be 2 TiB)
INDEX_DTYPE = torch.int32
CHUNK_POSITIONS = 512  # output positions per gather + GEMM step (512*9*256 floats = 4.7 MB of columns)


def padded_rows(height: int, width: int) -> int:
    """Rows one image of size (height, width) takes in a sampling table."""
    return (height + PAD_BEFORE + PAD_AFTER) * (width + PAD_BEFORE + PAD_AFTER)


def sampling_table(maps: list[Tensor], reuse: Tensor | None = None, dtype: torch.dtype | None = None) -> tuple[Tensor, list[int]]:
    """Lay (B, C, H, W) maps out as one (R, C) table of rows, one row of C values per pixel.

    Each image is stored channels-last and zero-padded (1 before, 2 after, in H and W), i.e.
    (B, H+3, W+3, C) flattened; returns the table and each map's first row. ``dtype``: the table's (the
    maps' by default; the copy converts). ``reuse``: a table this function returned for maps of the same
    shapes and dtype, no longer needed: its padding is still zero, so only the interiors are written (a
    fresh 10 MB table costs page faults and a pass over memory).
    """
    starts, rows = [], 0
    for x in maps:
        starts.append(rows)
        rows += x.shape[0] * padded_rows(*x.shape[-2:])
    fresh = reuse is None
    # Only the padding is zeroed: filling the whole table first would be a second pass over it (1.5% of
    # a 640-px tower's time); the interior is written once by the copy.
    table = maps[0].new_empty(rows, maps[0].shape[1], dtype=dtype or maps[0].dtype) if fresh else reuse
    for x, start in zip(maps, starts):
        b, c, h, w = x.shape
        # (R, C) rows of this map -> (B, H+3, W+3, C); its interior <- (B, C, H, W) as (B, H, W, C)
        top, left = PAD_BEFORE, PAD_BEFORE
        part = table[start : start + b * padded_rows(h, w)].view(b, h + PAD_BEFORE + PAD_AFTER, -1, c)
        if fresh:
            part[:, :top].zero_()
            part[:, top + h :].zero_()
            part[:, top : top + h, :left].zero_()
            part[:, top : top + h, left + w :].zero_()
        part[:, top : top + h, left : left + w].copy_(x.permute(0, 2, 3, 1))
    return table, starts


def tap_grid(h: int, w: int, sy: int, sx: int, py: int, px: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2, h, w, 9): the y and x input pixel each 3x3 tap of each output pixel reads, before its offset."""
    tap = torch.arange(9, device=device)
    ys = (torch.arange(h, device=device) * sy - py).view(h, 1, 1) + tap.div(3, rounding_mode="floor")
    xs = (torch.arange(w, device=device) * sx - px).view(1, w, 1) + tap.remainder(3)
    return torch.stack(torch.broadcast_tensors(ys, xs)).to(dtype)


def _point_limits(in_h: int, in_w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2, 1, 1, 1): the largest sample point worth reading, (H, W) (filled on the device: no copy)."""
    limits = torch.empty(2, 1, 1, 1, dtype=dtype, device=device)
    limits[0], limits[1] = in_h, in_w
    return limits


def neighbour_rows(b: int, in_h: int, in_w: int, row_start: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, 1, 1, 1, 4): what to add to a tap's top-left pixel (y * (W+3) + x) to get the table rows of its
    4 neighbours: the image's first row, the padding, and the steps 0, 1, W+3, W+4 (dtype unused)."""
    wp = in_w + PAD_BEFORE + PAD_AFTER
    image_start = torch.arange(b, device=device, dtype=INDEX_DTYPE).view(b, 1, 1, 1, 1) * padded_rows(in_h, in_w)
    corner = torch.arange(4, device=device, dtype=INDEX_DTYPE)
    steps = corner.remainder(2) + corner.div(2, rounding_mode="floor") * wp
    return image_start + (row_start + PAD_BEFORE * wp + PAD_BEFORE) + steps


def cached(make, *args: int, like: Tensor) -> Tensor:
    """``make(*args, like.dtype, like.device)``, memoised on CPU, where the 13 convs of each of a tower's blocks
    ask for the same few. Made afresh elsewhere: on the device, with no host-to-device copy (CUDA-graph
    safe), and not cached (a tensor made during graph capture lives in the graph's pool)."""
    if like.device.type != "cpu":
        return make(*args, like.dtype, like.device)
    return _CPU_CACHE[make](*args, like.dtype, like.device)


_CPU_CACHE = {make: functools.lru_cache(maxsize=128)(make) for make in (tap_grid, _point_limits, neighbour_rows)}


def bilinear_taps(
    offset: Tensor,
    mask: Tensor | None,
    in_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    row_start: int = 0,
) -> tuple[Tensor, Tensor]:
    """Table rows and weights of the 4 bilinear neighbours of every 3x3 tap.

    offset (B, 18, h, w) as (dy, dx) per tap, mask (B, 9, h, w) or None; ``in_size`` the sampled map's
    (H, W), whose part of the table starts at ``row_start`` (see ``sampling_table``). Returns index
    and weight tensors of shape (B*h*w*9, 4), rows ordered (b, y, x, tap), neighbours (y0x0, y0x1,
    y1x0, y1x1); the mask is folded into the weights. Few whole-tensor ops on contiguous y and x planes:
    a tower call makes 78 calls, mostly on small maps, where each op's fixed cost counts.
    """
    b, _, h, w = offset.shape
    in_h, in_w = in_size
    wp = in_w + PAD_BEFORE + PAD_AFTER
    # (B, 18, h, w) -> (B, 2, h, w, 9): sample points, y and x planes, in input pixels
    pts = offset.view(b, 9, 2, h, w).permute(0, 2, 3, 4, 1) + cached(tap_grid, h, w, *stride, *padding, like=offset)
    # Outside [-1, size] every neighbour is padding, so clamp there. At exactly -1 torchvision's gradient
    # w.r.t. the point is the right derivative, which `clamp` would zero: hence `where` (which also sends
    # NaN to -1, a zero sample, rather than to an undefined row).
    pts = torch.where(pts >= -1.0, pts, -1.0)
    pts = torch.clamp(pts, max=cached(_point_limits, in_h, in_w, like=offset))
    floor = pts.floor()
    high = pts - floor  # (B, 2, h, w, 9): weight of the higher neighbour along y, x
    low = 1.0 - high
    hy, hx, ly, lx = low[:, 0], low[:, 1], high[:, 0], high[:, 1]
    if mask is not None:
        m = mask.permute(0, 2, 3, 1)  # (B, h, w, 9)
        hy, ly = hy * m, ly * m
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)  # (B, h, w, 9, 4)
    corner = floor.to(INDEX_DTYPE)
    top_left = corner[:, 0] * wp + corner[:, 1]  # (B, h, w, 9): y * (W+3) + x
    index = top_left.unsqueeze(-1) + cached(neighbour_rows, b, in_h, in_w, row_start, like=offset)
    return index.reshape(-1, 4), weights.reshape(-1, 4)


def gather_columns(table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of table rows: (R, C), (S, 4), (S, 4) -> (S, C)."""
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


def weight_matrix(weight: Tensor) -> Tensor:
    """(C_out, C, 3, 3) -> (C_out, 9*C), taps outer, matching columns laid out (tap, channel)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv_all_at_once(
    table: Tensor,
    index: Tensor,
    weights: Tensor,
    weight_mat: Tensor,
    bias: Tensor | None,
    out_shape: tuple[int, int, int],
    channels_last: bool = False,
) -> Tensor:
    """One gather of all (B*h*w*9, C) columns, one GEMM: what ``deform_conv2d_from_table`` does off CPU.

    index, weights (B*h*w*9, 4) from ``bilinear_taps``; out_shape (B, h, w) -> (B, C_out, h, w), NCHW-
    contiguous, or channels-last-contiguous with ``channels_last``.
    """
    b, h, w = out_shape
    cols = gather_columns(table, index, weights).view(b * h * w, -1)  # (B*h*w, 9*C)
    if channels_last:
        # (B*h*w, 9*C) @ (9*C, C_out) -> (B, h, w, C_out), seen as (B, C_out, h, w)
        out = torch.mm(cols, weight_mat.t()) if bias is None else torch.addmm(bias, cols, weight_mat.t())
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)
    # (B, C_out, 9*C) @ (B, 9*C, h*w) -> (B, C_out, h*w); the weight is expanded, not copied
    out = torch.bmm(weight_mat.expand(b, -1, -1), cols.view(b, h * w, -1).transpose(1, 2))
    if bias is not None:
        out.add_(bias[:, None])
    return out.view(b, -1, h, w)


def onednn_gemm_available(dtype: torch.dtype) -> bool:
    """True where the inference GEMMs can go to oneDNN: a float32 GEMM on a torch built with it, or a
    bfloat16 one on a CPU with native bfloat16 dot products (AVX512-BF16 / AMX)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_bf16_gemm())


def cpu_bf16_gemm() -> bool:
    """True where oneDNN runs bfloat16 GEMMs natively on this CPU (about twice its float32 rate)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def cpu_gemm_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fast path's GEMMs on CPU: bfloat16 under a bfloat16 CPU autocast (the user's opt-in,
    e.g. ``dyhead predict --bf16``) where the CPU has native bfloat16 GEMMs, else the table's dtype.

    The sampling table and the gathers follow (``DyHeadBlock.forward_fast``): sample points stay float32,
    the bilinear weights and gathered columns are bfloat16, and the outputs are float32 again.
    """
    if (
        table_dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and cpu_bf16_gemm()
    ):
        return torch.bfloat16
    return table_dtype


class GemmWeight:
    """A conv's weight matrix (C_out, 9*C), plus oneDNN's packed copy of it for inference GEMMs.

    Why oneDNN: torch's float32 ``mm`` calls MKL, which on AMD CPUs runs its AVX2 kernels, while the
    convolutions it is compared with run oneDNN's AVX-512 kernels; on a Zen 5 core (full-width AVX-512)
    that left the deformable convs at a third of the convolutions' throughput. oneDNN's inner product
    on a weight packed once per block call is as fast as MKL or faster everywhere we measured. Packing is
    inference-only (no autograd), so with autograd the plain matrix and ``addmm`` are used.
    """

    def __init__(self, matrix: Tensor, pack: bool = True) -> None:
        self.matrix = matrix
        self.packed: Tensor | None = None
        if pack and not matrix.requires_grad and onednn_gemm_available(matrix.dtype) and matrix.device.type == "cpu":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), CHUNK_POSITIONS)

    def linear(self, cols: Tensor, bias: Tensor | None) -> Tensor:
        """(n, 9*C) columns -> (n, C_out) = cols @ matrix^T + bias."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(cols, self.packed, bias, "none", [], "")
        return F.linear(cols, self.matrix, bias)


# id(weight) -> (weak reference to weight, (version, dtype), GemmWeight); a tensor's == is elementwise, so
# no WeakKeyDictionary
_PACKED: dict[int, tuple[weakref.ref, tuple[int, torch.dtype], GemmWeight]] = {}


def gemm_weight(weight: Tensor, dtype: torch.dtype) -> GemmWeight:
    """``GemmWeight(weight_matrix(weight.to(dtype)))``; without autograd, packed once per weight version.

    A DyHead block call would otherwise re-pack its three (C, 9*C) weights every time (~1.5% of it).
    The cache holds a weak reference to the parameter and checks its version counter, so in-place
    updates (optimizer steps, ``load_state_dict``) are seen and the module itself stays picklable.
    """
    if torch.is_grad_enabled() and weight.requires_grad:
        return GemmWeight(weight_matrix(weight.to(dtype)))
    if torch.is_inference(weight):  # made under inference_mode: no version counter, so no cache
        return GemmWeight(weight_matrix(weight.to(dtype)))
    key = (weight._version, dtype)
    hit = _PACKED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        gemm = GemmWeight(weight_matrix(weight.to(dtype)))
    ident = id(weight)
    _PACKED[ident] = (weakref.ref(weight, lambda _: _PACKED.pop(ident, None)), key, gemm)
    return gemm


def deform_conv2d_from_table(
    table: Tensor,
    row_start: int,
    in_size: tuple[int, int],
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor | GemmWeight,
    bias: Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (1, 1),
    chunk: int = CHUNK_POSITIONS,
    channels_last: bool = False,
) -> Tensor:
    """The deformable conv of a map stored in a sampling table (from ``row_start``, size ``in_size``).

    offset (B, 18, h, w), mask (B, 9, h, w) or None, weight (C_out, 9*C) from ``weight_matrix`` (or a
    ``GemmWeight`` of it) -> (B, C_out, h, w), contiguous. Sample points are computed in the offset's dtype;
    the gather and the GEMM in the table's (which may be lower, e.g. bfloat16 on CUDA).
    On CPU, without autograd, it works ``chunk`` output positions at a time: gather their (chunk*9, C)
    columns, view them as (chunk, 9*C), one GEMM gives their (chunk, C_out) outputs, copied transposed into
    the output. Chunks keep the columns in cache between gather and GEMM, and keep buffers small enough for
    malloc to recycle (a fresh large buffer costs a page fault per 4 KiB). With autograd it gathers
    everything at once (see the comment there); on another device (CUDA: few large kernels beat many small
    ones) too, and there ``channels_last`` returns the result in channels-last memory. (The CPU inference
    tower works channels-last with ``conv_rows``, see ``dyhead_cpu``.)
    """
    gemm = weight if isinstance(weight, GemmWeight) else GemmWeight(weight, pack=False)
    b, _, h, w = offset.shape
    n_out = gemm.matrix.shape[0]
    index, weights = bilinear_taps(offset, mask, in_size, stride, padding, row_start)
    weights = weights.to(table.dtype)
    if table.device.type != "cpu":
        return conv_all_at_once(table, index, weights, gemm.matrix, bias, (b, h, w), channels_last)

    def piece(start: int, stop: int) -> Tensor:
        """Outputs (stop - start, C_out) of positions [start, stop) (counted over the whole batch)."""
        cols = gather_columns(table, index[9 * start : 9 * stop], weights[9 * start : 9 * stop])
        return gemm.linear(cols.view(stop - start, -1).to(gemm.matrix.dtype), bias)

    hw = h * w
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (table, weights, gemm.matrix, bias)):
        # Training: one gather and one GEMM over all positions. The backward of every embedding_bag call
        # zero-fills a gradient as large as the whole table, so per-chunk calls would pay that once per
        # chunk (70% of a small tower's backward); autograd keeps every chunk's columns anyway.
        # (B*h*w, C_out) -> (B, C_out, h, w)
        # contiguous: a channels-last view here sends GroupNorm to its CPU channels-last kernel, 50x less exact
        return piece(0, b * hw).view(b, hw, n_out).transpose(1, 2).reshape(b, n_out, h, w).contiguous()
    out = table.new_empty(b, n_out, hw, dtype=torch.promote_types(table.dtype, offset.dtype))  # bf16 table: fp32 out
    for i in range(b):
        for a in range(0, hw, chunk):
            stop = min(a + chunk, hw)
            # (n, C_out) rows, still in cache, transposed into the NCHW output
            out[i, :, a:stop] = piece(i * hw + a, i * hw + stop).t()
    return out.view(b, n_out, h, w)


def conv_rows(
    table: Tensor,
    index: Tensor,
    weights: Tensor,
    gemm: GemmWeight,
    bias: Tensor | None,
    out: Tensor,
    chunk: int = CHUNK_POSITIONS,
) -> Tensor:
    """A deformable conv's output rows from its taps, on CPU without autograd: index, weights (n*9, 4) from
    ``bilinear_taps`` -> out (n, C_out), one row per output position (a channels-last map).

    ``chunk`` positions at a time (chunks may span images): gather their columns, one GEMM, the rows copied
    in as they are. Views made by split (one call) rather than by slicing per chunk: a 640-px tower makes
    200 chunks, mostly small.
    """
    for rows_index, rows_weights, dest in zip(index.split(9 * chunk), weights.split(9 * chunk), out.split(chunk)):
        cols = gather_columns(table, rows_index, rows_weights).view(dest.shape[0], -1)
        dest.copy_(gemm.linear(cols if cols.dtype == gemm.matrix.dtype else cols.to(gemm.matrix.dtype), bias))
    return out


def fast_path_applies(input: Tensor, offset: Tensor, weight: Tensor) -> bool:
    """True where ``deform_conv2d_fast`` computes itself rather than calling torchvision's op: a CPU
    input, a 3x3 kernel, one weight group and one offset group."""
    return (
        input.device.type == "cpu"
        and tuple(weight.shape[-2:]) == (3, 3)
        and weight.shape[1] == input.shape[1]
        and offset.shape[1] == 18
    )


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


@torchvision_signature
def deform_conv2d_fast(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair, mask: Tensor | None
) -> Tensor:
    """Drop-in for ``torchvision.ops.deform_conv2d`` (3x3 kernel, dilation 1, offset_groups 1).

    input (B, C, H, W), offset (B, 18, h, w), weight (C_out, C, 3, 3), bias (C_out,), mask (B, 9, h, w)
    -> (B, C_out, h, w). On CPU it computes in float32 (float64 if any input is) with autocast off, like
    torchvision's CPU kernel; elsewhere, or for other kernel sizes, it calls torchvision's op.
    """
    if not fast_path_applies(input, offset, weight):
        return tv_deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding, mask=mask)
    _, _, in_h, in_w = input.shape
    h, w = output_size((in_h, in_w), stride, padding)
    if offset.shape[-2:] != (h, w) or (mask is not None and mask.shape[-2:] != (h, w)):
        got = tuple(offset.shape[-2:]) if mask is None else (tuple(offset.shape[-2:]), tuple(mask.shape[-2:]))
        raise ValueError(f"offset and mask must be {(h, w)} for this input, stride and padding, got {got}")
    dtype = _compute_dtype(input, offset, weight, bias, mask)
    with torch.autocast("cpu", enabled=False):
        input, offset, weight = input.to(dtype), offset.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        mask = None if mask is None else mask.to(dtype)
        table, starts = sampling_table([input])
        gemm = GemmWeight(weight_matrix(weight))
        return deform_conv2d_from_table(table, starts[0], (in_h, in_w), offset, mask, gemm, bias, stride, padding)
