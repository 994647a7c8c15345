"""Modulated deformable 3x3 convolution on CUDA as one Triton kernel: bilinear sampling fused into the GEMM.

Why: torchvision's CUDA ``deform_conv2d`` writes a (9 C, h w) column buffer (nine times the input map),
then runs a GEMM per image; on an H100 a 6 x 256 DyHead tower at 800x1333 spends most of its time there
(``benchmarks/gpu_tower.py``). This kernel is an implicit GEMM instead: each program owns BLOCK_M output
positions x BLOCK_N output channels, and for each of the 9 taps and each slice of BLOCK_K input channels it
bilinearly samples the four neighbours of the BLOCK_M sample points straight from a channels-last input
(each neighbour a contiguous run of channels: coalesced loads), weights them as torchvision does, and feeds
the (BLOCK_M, BLOCK_K) tile to ``tl.dot`` against the (BLOCK_K, BLOCK_N) weight tile. The columns never
reach memory.

Semantics are torchvision's (and the official DCNv2 kernel's): sample point = (y * stride - 1 + ky + dy,
x * stride - 1 + kx + dx); a point at or beyond -1 / the map size samples 0; a neighbour outside the map
counts 0; the bilinear value is multiplied by the mask. Sample points, bilinear weights and accumulation are
float32; the columns are rounded to the input's dtype before the dot (float32 inputs use an IEEE float32
dot, not TF32, so a float32 call equals torchvision's op to float32 rounding).

Inference only (no autograd); tested against ``torchvision.ops.deform_conv2d`` on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, tests/models/test_deform_triton.py) and on CUDA (``-m gpu``).
Importing this module does not need Triton; ``available()`` says whether the kernel can run.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with PyTorch's CUDA wheels; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
# Per dtype: (BLOCK_M output positions, BLOCK_N output channels, BLOCK_K input channels per dot, warps, stages).
# BLOCK_K input channels are 128 bytes of a channels-last row in 16-bit types. Chosen with METHOD below by
# ``benchmarks/gpu_check.py --sweep --apply-tower-choice`` (``benchmarks/tower_choice.py``: the smallest
# geometric mean over batch 1 and 8 of the tower's time, CUDA graphs, 6 x 256 at 800x1333) on an H100,
# 2026-11-27 (benchmarks/results/h100-tuned/tower.json): bf16 (64, 256, 64, 8, 3) "flat" took 14.7 / 48.3 ms
# at batch 1 / 8 against 16.5 / 52.0 for the former (64, 256, 64, 8, 2) "taps" (eight candidates; "columns"
# (64, 256, 64, 4, 1) was fastest at batch 1, 13.0 ms, but 55.7 at batch 8); float16 takes bfloat16's
# (not swept); float32 (64, 128, 64, 4, 1) "columns" 16.3 / 94.8 ms against 26.4 / 119.7 for (32, 128, 32, 4, 2)
# "taps" (from batch 8 float32 runs grid_sample + GEMM: 81.2 ms). A second sweep on an H100 the same day
# (benchmarks/results/h100-inline/tower.json, GroupNorm modules end) kept both: bf16 14.1 / 41.0 ms, float32
# 15.7 / 87.2.
CONFIG: dict[torch.dtype, tuple[int, int, int, int, int]] = {
    torch.float32: (64, 128, 64, 4, 1),
    torch.float16: (64, 256, 64, 8, 3),
    torch.bfloat16: (64, 256, 64, 8, 3),
}
# How: "taps", the fused kernel with 9 unrolled taps, each a short loop over channel slices; "flat", the fused
# kernel with one loop over 9 x C / BLOCK_K (tap, slice) steps, software-pipelined by Triton with NUM_STAGES
# stages; "columns", a sampling kernel that writes the (h w, 9 C) columns of a few images at a time in x's
# dtype, then one cuBLAS GEMM per image straight into NCHW (the columns touch memory, but each kernel does one
# simple thing). Timed by the sweep above; ``benchmarks/tower_choice.py --write`` rewrites these lines.
METHODS = ("taps", "flat", "columns")
METHOD: dict[torch.dtype, str] = {
    torch.float32: "columns",
    torch.float16: "flat",
    torch.bfloat16: "flat",
}
# A batch of one image may take other tiles and method, (tiles, method), where the sweep's fastest at batch 1
# beat the choice above there by 3% or more (None: the same): on the H100 sweep, bf16 "columns"
# (64, 256, 64, 4, 1) took 13.0 ms at batch 1 against 14.7 for the "flat" choice (55.7 against 48.3 at batch 8);
# float16 takes bfloat16's; the second sweep confirmed it (12.8 against 14.1 ms). ``benchmarks/tower_choice.py
# --write`` rewrites these lines too.
SINGLE: dict[torch.dtype, tuple[tuple[int, int, int, int, int], str] | None] = {
    torch.float32: None,
    torch.float16: ((64, 256, 64, 4, 1), "columns"),
    torch.bfloat16: ((64, 256, 64, 4, 1), "columns"),
}
COLUMN_BYTES = 256 << 20  # "columns": at most this much column buffer (whole images; at least one)
DTYPES = tuple(CONFIG)
unavailable_reason: str | None = None if triton is not None else "Triton is not installed"


class KernelFailed(RuntimeError):
    """The kernel could not be compiled or launched here (an old Triton, an unsupported GPU); callers fall
    back to torchvision's op. Once raised, ``available()`` is False for the rest of the process."""


def kernel_choice(dtype: torch.dtype, batch: int) -> tuple[tuple[int, int, int, int, int], str]:
    """(tiles, method) for a conv over ``batch`` images in ``dtype``: ``SINGLE``'s for one image where it has
    one, else ``CONFIG`` / ``METHOD``'s."""
    single = SINGLE.get(dtype)
    if batch == 1 and single is not None:
        return single
    return CONFIG[dtype], METHOD[dtype]


def describe() -> dict:
    """What benchmark reports record: the Triton version, each dtype's method and tiles, and why the kernel
    is unavailable (None when it is not)."""
    return {
        "triton": getattr(triton, "__version__", None),
        "fused_deform_conv": {
            str(dtype).removeprefix("torch."): {
                "method": METHOD[dtype],
                "tiles": list(config),
                "single": None if SINGLE[dtype] is None else {"method": SINGLE[dtype][1], "tiles": list(SINGLE[dtype][0])},
            }
            for dtype, config in CONFIG.items()
        },
        "fused_deform_conv_unavailable": unavailable_reason,
    }


def available(device: torch.device | str) -> bool:
    """True where the kernel can run on tensors of ``device``: Triton importable and working, and a CUDA
    device (or any device under the interpreter)."""
    if unavailable_reason is not None:
        return False
    return INTERPRET or torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _tap_points(off_ptr, mask_ptr, off_base, mask_base, hw, oy, ox, m_ok, tap, stride, H, W, C, x_base):
        """One tap's sample points for BLOCK_M output positions: the top-left neighbour's element offset into
        x, the four neighbours' validity and bilinear weights, and the mask (torchvision's rules)."""
        ky = tap // 3
        kx = tap % 3
        dy = tl.load(off_ptr + off_base + (2 * tap) * hw, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.load(off_ptr + off_base + (2 * tap + 1) * hw, mask=m_ok, other=0.0).to(tl.float32)
        mk = tl.load(mask_ptr + mask_base + tap * hw, mask=m_ok, other=0.0).to(tl.float32)
        py = (oy * stride - 1 + ky).to(tl.float32) + dy
        px = (ox * stride - 1 + kx).to(tl.float32) + dx
        inside = m_ok & (py > -1.0) & (py < H) & (px > -1.0) & (px < W)
        py = tl.where(inside, py, 0.0)  # keeps the integer conversion below in range
        px = tl.where(inside, px, 0.0)
        y0f = tl.floor(py)
        x0f = tl.floor(px)
        ly = py - y0f
        lx = px - x0f
        hy = 1.0 - ly
        hx = 1.0 - lx
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        ok00 = inside & (y0 >= 0) & (x0 >= 0)
        ok01 = inside & (y0 >= 0) & (x0 + 1 <= W - 1)
        ok10 = inside & (y0 + 1 <= H - 1) & (x0 >= 0)
        ok11 = inside & (y0 + 1 <= H - 1) & (x0 + 1 <= W - 1)
        a00 = x_base + (y0 * W + x0).to(tl.int64) * C
        return a00, ok00, ok01, ok10, ok11, hy * hx, hy * lx, ly * hx, ly * lx, mk

    @triton.jit
    def _column_tile(x_ptr, a00, W, C, cc, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk):
        """(BLOCK_M, BLOCK_K) float32 columns: channels cc of the four neighbours, weighted, times the mask."""
        c_ok = cc[None, :] < C
        v00 = tl.load(x_ptr + a00[:, None] + cc[None, :], mask=ok00[:, None] & c_ok, other=0.0)
        v01 = tl.load(x_ptr + (a00 + C)[:, None] + cc[None, :], mask=ok01[:, None] & c_ok, other=0.0)
        v10 = tl.load(x_ptr + (a00 + W * C)[:, None] + cc[None, :], mask=ok10[:, None] & c_ok, other=0.0)
        v11 = tl.load(x_ptr + (a00 + W * C + C)[:, None] + cc[None, :], mask=ok11[:, None] & c_ok, other=0.0)
        val = (
            w00[:, None] * v00.to(tl.float32)
            + w01[:, None] * v01.to(tl.float32)
            + w10[:, None] * v10.to(tl.float32)
            + w11[:, None] * v11.to(tl.float32)
        )
        return val * mk[:, None]  # the official kernel's order: mask * bilinear value

    @triton.jit(do_not_specialize=["M", "H", "W", "h", "w", "stride"])  # one compiled kernel for every level
    def _deform_conv3x3_kernel(
        x_ptr,  # (B, H, W, C) channels-last input
        off_ptr,  # (B, 18, h, w): (dy, dx) per tap
        mask_ptr,  # (B, 9, h, w)
        w_ptr,  # (9 C, C_out): row tap * C + c
        bias_ptr,  # (C_out,) float32, or a dummy when HAS_BIAS is false
        out_ptr,  # (B, C_out, h, w)
        M,  # B * h * w
        H,
        W,
        C,
        h,
        w,
        C_out,
        stride,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FLAT: tl.constexpr,  # one pipelined loop over (tap, channel slice) instead of 9 unrolled short loops
        NUM_STAGES: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < C_out
        hw = h * w
        b = (rm // hw).to(tl.int64)
        p = rm % hw
        oy = p // w
        ox = p % w
        off_base = b * (18 * hw) + p
        mask_base = b * (9 * hw) + p
        x_base = b * H * W * C
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FLAT:
            slices = tl.cdiv(C, BLOCK_K)
            for i in tl.range(0, 9 * slices, num_stages=NUM_STAGES):
                tap = i // slices
                cc = (i - tap * slices) * BLOCK_K + rk
                a00, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk = _tap_points(
                    off_ptr, mask_ptr, off_base, mask_base, hw, oy, ox, m_ok, tap, stride, H, W, C, x_base
                )
                col = _column_tile(x_ptr, a00, W, C, cc, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk)
                wt = tl.load(
                    w_ptr + (tap * C + cc)[:, None] * C_out + rn[None, :], mask=(cc[:, None] < C) & n_ok[None, :], other=0.0
                )
                acc += tl.dot(col.to(wt.dtype), wt, input_precision=DOT_PRECISION)
        else:
            for tap in tl.static_range(9):
                a00, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk = _tap_points(
                    off_ptr, mask_ptr, off_base, mask_base, hw, oy, ox, m_ok, tap, stride, H, W, C, x_base
                )
                for c0 in range(0, C, BLOCK_K):
                    cc = c0 + rk
                    col = _column_tile(x_ptr, a00, W, C, cc, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk)
                    wt = tl.load(
                        w_ptr + (tap * C + cc)[:, None] * C_out + rn[None, :],
                        mask=(cc[:, None] < C) & n_ok[None, :],
                        other=0.0,
                    )
                    acc += tl.dot(col.to(wt.dtype), wt, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        out_offs = (b * C_out * hw + p)[:, None] + rn[None, :].to(tl.int64) * hw
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["M", "H", "W", "h", "w", "stride"])
    def _sample_columns_kernel(
        x_ptr,  # (B, H, W, C) channels-last input
        off_ptr,  # (B, 18, h, w)
        mask_ptr,  # (B, 9, h, w)
        cols_ptr,  # (B h w, 9 C): row b * h * w + y * w + x, column tap * C + c
        M,  # B * h * w
        H,
        W,
        C,
        h,
        w,
        stride,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (i, tap, j): the columns of BLOCK_M positions for one tap and BLOCK_C channels."""
        tap = tl.program_id(1)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_ok = rm < M
        hw = h * w
        b = (rm // hw).to(tl.int64)
        p = rm % hw
        a00, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk = _tap_points(
            off_ptr, mask_ptr, b * (18 * hw) + p, b * (9 * hw) + p, hw, p // w, p % w, m_ok, tap, stride, H, W, C,
            b * H * W * C,
        )  # fmt: skip
        col = _column_tile(x_ptr, a00, W, C, cc, ok00, ok01, ok10, ok11, w00, w01, w10, w11, mk)
        dst = cols_ptr + rm.to(tl.int64)[:, None] * (9 * C) + tap * C + cc[None, :]
        tl.store(dst, col.to(cols_ptr.dtype.element_ty), mask=m_ok[:, None] & (cc[None, :] < C))


def weight_rows(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """(C_out, C, 3, 3) -> (9 C, C_out) in ``dtype``, row tap * C + c (tap = ky * 3 + kx): the kernel's B
    operand, made once per block call."""
    c_out = weight.shape[0]
    return weight.detach().to(dtype).permute(2, 3, 1, 0).reshape(-1, c_out).contiguous()


def deform_conv3x3_triton(
    x: Tensor, offset: Tensor, mask: Tensor, weight_mat: Tensor, bias: Tensor | None, stride: int = 1
) -> Tensor:
    """Modulated deformable 3x3 conv, padding 1, dilation 1, one offset group, without autograd.

    x (B, C, H, W) in channels-last memory (``x.contiguous(memory_format=torch.channels_last)``; any other
    layout is converted), offset (B, 18, h, w), mask (B, 9, h, w) (any float dtype, read as float32),
    weight_mat (9 C, C_out) from ``weight_rows`` in x's dtype, bias (C_out,) -> (B, C_out, h, w) contiguous
    in x's dtype, h = (H - 1) // stride + 1 (likewise w).
    """
    if x.dtype not in DTYPES or weight_mat.dtype != x.dtype:
        raise ValueError(f"x and weight_mat must share one of {DTYPES}, got {x.dtype} and {weight_mat.dtype}")
    b, c, in_h, in_w = x.shape
    h, w = (in_h - 1) // stride + 1, (in_w - 1) // stride + 1
    c_out = weight_mat.shape[1]
    if weight_mat.shape[0] != 9 * c or offset.shape != (b, 18, h, w) or mask.shape != (b, 9, h, w):
        raise ValueError(
            f"for x {tuple(x.shape)} and stride {stride}: weight_mat must be (9 C, C_out), offset (B, 18, {h}, {w}) "
            f"and mask (B, 9, {h}, {w}); got {tuple(weight_mat.shape)}, {tuple(offset.shape)}, {tuple(mask.shape)}"
        )
    x = x.contiguous(memory_format=torch.channels_last)
    offset, mask = offset.contiguous(), mask.contiguous()
    out = torch.empty(b, c_out, h, w, dtype=x.dtype, device=x.device)
    m = b * h * w
    if m == 0 or c_out == 0:
        return out
    has_bias = bias is not None
    bias_arg = bias.detach().float().contiguous() if has_bias else out
    (block_m, block_n, block_k, num_warps, num_stages), method = kernel_choice(x.dtype, b)
    try:
        if method == "columns":
            _conv_by_columns(x, offset, mask, weight_mat, bias, stride, out, block_m, block_k, num_warps)
        else:
            flat = method == "flat"
            _deform_conv3x3_kernel[(triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))](
                x, offset, mask, weight_mat, bias_arg, out, m, in_h, in_w, c, h, w, c_out, stride,
                HAS_BIAS=has_bias,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # an IEEE float32 dot: no TF32
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FLAT=flat, NUM_STAGES=num_stages,
                num_warps=num_warps, num_stages=1 if flat else num_stages,
            )  # fmt: skip
    except Exception as e:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise  # inside a CUDA-graph capture: let the capture fail (GraphCache falls back to eager)
        global unavailable_reason
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        unavailable_reason = f"{type(e).__name__}: {first_line}"
        raise KernelFailed(unavailable_reason) from e
    return out


def _conv_by_columns(
    x: Tensor, offset: Tensor, mask: Tensor, weight_mat: Tensor, bias: Tensor | None, stride: int, out: Tensor,
    block_m: int, block_c: int, num_warps: int,
) -> None:  # fmt: skip
    """METHOD "columns": sample the columns of a few whole images at a time (at most ``COLUMN_BYTES``), then
    per image out (C_out, h w) = weight_mat^T (C_out, 9 C) @ columns^T (9 C, h w) [+ bias], written into
    ``out`` (B, C_out, h, w) as it is (cuBLAS reads the transposed operands in place). The GEMM accumulates
    in float32; float32 inputs give a float32 GEMM (TF32 only where the user allowed it for matmuls)."""
    b, c, in_h, in_w = x.shape
    _, c_out, h, w = out.shape
    row = h * w * 9 * c * x.element_size()  # one image's columns
    per_chunk = max(1, min(b, COLUMN_BYTES // row))
    cols = torch.empty(per_chunk * h * w, 9 * c, dtype=x.dtype, device=x.device)
    weight_t = weight_mat.t()  # (C_out, 9 C), a view
    bias_col = None if bias is None else bias.detach().to(x.dtype)[:, None]
    for b0 in range(0, b, per_chunk):
        b1 = min(b, b0 + per_chunk)
        m = (b1 - b0) * h * w
        grid = (triton.cdiv(m, block_m), 9, triton.cdiv(c, block_c))
        _sample_columns_kernel[grid](
            x[b0:b1], offset[b0:b1], mask[b0:b1], cols, m, in_h, in_w, c, h, w, stride,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
        for i in range(b0, b1):
            image_cols = cols[(i - b0) * h * w : (i - b0 + 1) * h * w].t()  # (9 C, h w), a view
            dest = out[i].view(c_out, h * w)
            if bias_col is None:
                torch.mm(weight_t, image_cols, out=dest)
            else:
                torch.addmm(bias_col, weight_t, image_cols, out=dest)
