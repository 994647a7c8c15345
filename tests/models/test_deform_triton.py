"""The fused Triton deformable conv (models/deform_triton.py) against torchvision's op, and the folded block
end (models/fold_triton.py) against the reference block, on CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before Triton compiles). The same kernel on
CUDA: tests/test_gpu.py (``-m gpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyhead_cli.models import deform_triton
from dyhead_cli.models.dyhead_cuda import EPILOGUES

TESTS = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(deform_triton.triton is None, reason="Triton is not installed (CPU-only PyTorch)")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(TESTS / "helpers_triton_interpret.py")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_triton
def test_fused_conv_float32_equals_torchvision(interpreted):
    assert set(interpreted["convs"]) == set(deform_triton.METHODS)
    for loop, rows in interpreted["convs"].items():
        assert len(rows) == 6
        for case, diff, scale in rows:
            assert diff <= 2e-6 * max(1.0, scale), (loop, case)  # float32 rounding of a 9 C-term sum


@needs_triton
def test_fused_conv_float16_within_its_rounding(interpreted):
    for loop, rows in interpreted["fp16"].items():
        for case, diff, scale in rows:
            # inputs rounded alike; the columns and the output are rounded to float16 (2^-11 relative)
            assert 0 < diff <= 1e-3 * max(1.0, scale), (loop, case)


@needs_triton
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_fused_block_equals_reference_block_in_every_offset_mode(interpreted, epilogue):
    blocks = interpreted["blocks"][epilogue]
    assert set(blocks) == {"official", "mmdet", "aligned"}
    for mode, (diff, scale) in blocks.items():
        assert diff < 2e-6 * max(1.0, scale), mode


@needs_triton
def test_folded_epilogue_kernels_equal_their_pytorch_expressions(interpreted):
    # statistics; sums of 1, 2, 3 maps; with the last one upsampled in the kernel (and its mean) from 4 sizes
    assert {"stats", "sum1", "sum2", "sum3"} < set(interpreted["fold"])
    assert sum(name.startswith(("sum2 ", "sum3 ", "mean ")) for name in interpreted["fold"]) == 12
    for kernel, (diff, scale) in interpreted["fold"].items():
        assert diff < 1e-6 * max(1.0, scale), kernel


def test_fused_path_not_taken_on_cpu_or_with_autograd():
    from dyhead_cli.models.dyhead_cuda import fused_path_applies

    feats = [torch.randn(1, 8, 4, 4)]
    if not deform_triton.INTERPRET:
        assert not fused_path_applies(feats)  # CPU tensors: the channels-last CPU path instead
    with torch.enable_grad():
        assert not fused_path_applies([f.requires_grad_() for f in feats])


def test_conv_rejects_mismatched_shapes_and_dtypes():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    mat = deform_triton.weight_rows(torch.randn(3, 4, 3, 3), torch.float32)
    assert mat.shape == (36, 3)
    with pytest.raises(ValueError, match=r"offset \(B, 18, 3, 3\)"):
        deform_triton.deform_conv3x3_triton(x, torch.zeros(1, 18, 5, 5), torch.zeros(1, 9, 5, 5), mat, None, stride=2)
    with pytest.raises(ValueError, match="must share one of"):
        deform_triton.deform_conv3x3_triton(x.double(), torch.zeros(1, 18, 5, 5), torch.zeros(1, 9, 5, 5), mat, None)


def test_weight_rows_layout():
    weight = torch.randn(5, 4, 3, 3)
    mat = deform_triton.weight_rows(weight, torch.float32)
    for tap in range(9):
        ky, kx = divmod(tap, 3)
        assert torch.equal(mat[tap * 4 : (tap + 1) * 4], weight[:, :, ky, kx].T)


def test_dyrelu_whole_map_in_place_equals_dyrelu():
    from dyhead_cli.models.dyhead import DyReLU, dyrelu_whole_map_

    torch.manual_seed(0)
    act = DyReLU(16, 4)
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        want = act(x)
        coeffs = act.coefficients(x)
        y = x.clone()
        got = dyrelu_whole_map_(y, *coeffs)
    assert got.data_ptr() == y.data_ptr()  # in place: the GPU path's memory stays flat
    assert (got - want).abs().max().item() < 1e-6


def test_upsample_through_channels_last_equals_interpolate():
    """The "high" map's upsampling as CUDA runs it (a channels-last copy) against F.interpolate: the same
    values and gradients, a contiguous NCHW result."""
    import torch.nn.functional as F

    from dyhead_cli.models.dyhead_cuda import upsample_aligned

    y = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    out = upsample_aligned(y, (9, 13), channels_last=True)
    want = F.interpolate(y, size=(9, 13), mode="bilinear", align_corners=True)
    assert out.shape == (2, 8, 9, 13) and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    (a,) = torch.autograd.grad(out, y, grad)
    (b,) = torch.autograd.grad(want, y, grad)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert upsample_aligned(y.detach(), (9, 13)).is_contiguous()  # on CPU: the plain op


def test_a_single_image_takes_its_own_tiles_where_set(monkeypatch):
    from dyhead_cli.models.deform_triton import CONFIG, METHOD, SINGLE, kernel_choice

    for dtype in CONFIG:
        assert kernel_choice(dtype, 8) == (CONFIG[dtype], METHOD[dtype])
        assert kernel_choice(dtype, 1) == (SINGLE[dtype] or (CONFIG[dtype], METHOD[dtype]))
    monkeypatch.setitem(SINGLE, torch.bfloat16, ((32, 64, 32, 4, 1), "taps"))
    assert kernel_choice(torch.bfloat16, 1) == ((32, 64, 32, 4, 1), "taps")
    assert kernel_choice(torch.bfloat16, 2) == (CONFIG[torch.bfloat16], METHOD[torch.bfloat16])
    monkeypatch.setitem(SINGLE, torch.bfloat16, None)
    assert kernel_choice(torch.bfloat16, 1) == (CONFIG[torch.bfloat16], METHOD[torch.bfloat16])
