"""Run the fused Triton deformable conv on CPU through Triton's interpreter; print the errors as JSON.

Run as a script with ``TRITON_INTERPRET=1`` set (tests/models/test_deform_triton.py does): the variable must
be set before Triton compiles anything, so it cannot be switched on inside the test process. Prints
{"convs": {method: [[case, max abs diff, max abs reference], ...]}, "fp16": {method: [...]}, "blocks":
{epilogue: {mode: [diff, scale]}} (each block end of ``dyhead_cuda.EPILOGUES``), "fold": {kernel: [diff,
scale]}}, for each method of ``deform_triton.METHODS``.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from dyhead_cli.models import deform_triton, dyhead_cuda, fold_triton
from dyhead_cli.models.deform_triton import deform_conv3x3_triton, weight_rows
from dyhead_cli.models.dyhead import OFFSET_MODES, DyHeadBlock
from dyhead_cli.models.dyhead_cuda import block_forward_fused

# (batch, C, C_out, H, W, stride, bias): odd sizes, stride 2, 1-pixel maps, more channels than one
# BLOCK_K slice and than one BLOCK_N tile, more positions than one BLOCK_M tile
CASES = [
    (2, 8, 16, 9, 11, 1, True),
    (1, 8, 16, 9, 11, 2, True),
    (2, 40, 24, 5, 7, 1, False),
    (1, 4, 3, 1, 1, 1, True),
    (1, 4, 3, 1, 1, 2, True),
    (1, 36, 130, 10, 9, 1, True),
]


def conv_case(b, c, c_out, in_h, in_w, stride, with_bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = (in_h - 1) // stride + 1, (in_w - 1) // stride + 1
    x = torch.randn(b, c, in_h, in_w, generator=g).to(dtype)
    offset = torch.randn(b, 18, h, w, generator=g) * 3
    offset[0, :, 0, 0] = torch.tensor([-1.0, 0.0] * 9)  # sample points exactly on the -1 border
    if w > 1:
        offset[0, :, 0, 1] = torch.tensor([0.5, float(in_w)] * 9)  # and beyond the right border
    mask = torch.rand(b, 9, h, w, generator=g)
    weight = torch.randn(c_out, c, 3, 3, generator=g).to(dtype)
    bias = torch.randn(c_out, generator=g) if with_bias else None
    return x, offset, mask, weight, bias


def conv_errors(dtype: torch.dtype) -> dict:
    return {method: conv_errors_with(dtype, method) for method in deform_triton.METHODS}


def conv_errors_with(dtype: torch.dtype, method: str) -> list:
    saved = deform_triton.METHOD[dtype], deform_triton.SINGLE[dtype], deform_triton.COLUMN_BYTES
    deform_triton.METHOD[dtype], deform_triton.SINGLE[dtype] = method, None  # the method at batch 1 too
    deform_triton.COLUMN_BYTES = 1  # "columns": one image per chunk, so the batch-2 cases take two chunks
    try:
        return conv_rows(dtype)
    finally:
        deform_triton.METHOD[dtype], deform_triton.SINGLE[dtype], deform_triton.COLUMN_BYTES = saved


def conv_rows(dtype: torch.dtype) -> list:
    rows = []
    for case in CASES:
        x, offset, mask, weight, bias = conv_case(*case, dtype=dtype)
        want = deform_conv2d(x.float(), offset, weight.float(), bias, stride=case[5], padding=1, mask=mask)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        got = deform_conv3x3_triton(x_cl, offset, mask, weight_rows(weight, dtype), bias, case[5])
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        rows.append([list(case), (got.float() - want).abs().max().item(), want.abs().max().item()])
    return rows


def block_errors(epilogue: str) -> dict:
    dyhead_cuda.EPILOGUE = epilogue
    out = {}
    g = torch.Generator().manual_seed(3)
    sizes = [(9, 11), (5, 6), (3, 3)]  # odd sizes: the "high" conv's offsets must be fitted
    feats = [torch.randn(2, 16, h, w, generator=g) for h, w in sizes]
    for mode in OFFSET_MODES:
        torch.manual_seed(0)
        block = DyHeadBlock(16, 16, offset_mode=mode, impl="reference").eval()
        torch.nn.init.normal_(block.offset.weight, 0.0, 0.3)  # sample points well off the grid
        with torch.no_grad():
            want = block(feats)
            got = block_forward_fused(block, feats)
        scale = max(t.abs().max().item() for t in want)
        out[mode] = [max((a - b).abs().max().item() for a, b in zip(got, want)), scale]
    return out


def fold_errors() -> dict:
    """fold_triton's kernels against the PyTorch expressions: [max abs diff, max abs value] per kernel."""
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 6, 37, 41, generator=g) * 3 + 1  # rows longer than one STATS_BLOCK step
    mean, var = fold_triton.channel_stats(y)
    want_var, want_mean = torch.var_mean(y, dim=(2, 3), correction=0)
    maps = [torch.randn(2, 6, 9, 7, generator=g) for _ in range(3)]
    per = [torch.randn(2, 6, generator=g) for _ in range(8)]  # 3 scales, shift, a1, b1, a2, b2
    out = {"stats": [max((mean - want_mean).abs().max().item(), (var - want_var).abs().max().item()), want_var.max().item()]}
    for k in (1, 2, 3):
        got = fold_triton.scaled_sum_dyrelu(maps[:k], per[:k], per[3], per[4:], torch.float32)
        f = per[3][..., None, None] + sum(m * s[..., None, None] for m, s in zip(maps[:k], per[:k]))
        a1, b1, a2, b2 = (t[..., None, None] for t in per[4:])
        want = torch.maximum(f * a1 + b1, f * a2 + b2)
        out[f"sum{k}"] = [(got - want).abs().max().item(), want.abs().max().item()]
    # the last map upsampled inside the kernel ("inline"): 9x7 from 4x3, 5x7 and 1x1, and 1x1 from 1x1
    for small, big in (((4, 3), (9, 7)), ((5, 7), (9, 7)), ((1, 1), (9, 7)), ((1, 1), (1, 1))):
        levels = [torch.randn(2, 6, *big, generator=g) for _ in range(2)]
        high = (torch.randn(2, 6, *small, generator=g) * 2).to(torch.bfloat16)  # as the raw conv outputs
        up = F.interpolate(high.float(), size=big, mode="bilinear", align_corners=True)
        name = f"{small[0]}x{small[1]}->{big[0]}x{big[1]}"
        mean = fold_triton.upsampled_mean(high, big)
        out[f"mean {name}"] = [(mean - up.mean(dim=(2, 3))).abs().max().item(), up.abs().max().item()]
        for k in (2, 3):
            got = fold_triton.scaled_sum_dyrelu([*levels[: k - 1], high], per[:k], per[3], per[4:], torch.float32, True)
            f = per[3][..., None, None] + sum(m * s[..., None, None] for m, s in zip([*levels[: k - 1], up], per[:k]))
            a1, b1, a2, b2 = (t[..., None, None] for t in per[4:])
            want = torch.maximum(f * a1 + b1, f * a2 + b2)
            out[f"sum{k} {name}"] = [(got - want).abs().max().item(), want.abs().max().item()]
    return out


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    result = {"convs": conv_errors(torch.float32), "fp16": conv_errors(torch.float16)}
    result["blocks"] = {epilogue: block_errors(epilogue) for epilogue in dyhead_cuda.EPILOGUES}
    result["fold"] = fold_errors()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
