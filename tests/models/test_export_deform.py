"""The exportable deformable conv (models/deform_export.py) against torchvision's op, and in ONNX."""

from __future__ import annotations

import pytest
import torch
from helpers_fixtures import TOWER_FIXTURES, load_tower_fixture
from torch import nn
from torchvision.ops import deform_conv2d

from dyhead_cli.convert.dyhead_keys import convert_dyhead
from dyhead_cli.models.deform_export import deform_conv2d_export
from dyhead_cli.models.dyhead import OFFSET_MODES, DeformConvNorm, DyHead

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(size, stride, seed=0, batch=2, channels=6, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(batch, channels, h, w, generator=g, dtype=dtype)
    offset = torch.randn(batch, 18, oh, ow, generator=g, dtype=dtype) * scale
    mask = torch.rand(batch, 9, oh, ow, generator=g, dtype=dtype)
    weight = torch.randn(5, channels, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(5, generator=g, dtype=dtype)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("size", [(7, 9), (1, 1), (1, 6), (13, 4), (2, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_equals_torchvision_on_odd_sizes(size, stride):
    x, offset, mask, weight, bias = _inputs(size, stride)
    ref = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = deform_conv2d_export(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_zero_padding_at_and_beyond_the_border():
    """Sample points exactly at -1 and at the size (all four neighbours outside or weight 0), on the
    border, and far outside: torchvision's zero padding, point for point."""
    h, w = 5, 6
    x, _, mask, weight, bias = _inputs((h, w), 1, seed=1)
    edges = torch.tensor([-1.0, -0.5, 0.0, 0.25, float(h - 1), h - 0.5, float(h), h + 0.5, -40.0, 40.0])
    g = torch.Generator().manual_seed(2)
    offset = edges[torch.randint(len(edges), (2, 18, h, w), generator=g)]
    ref = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    got = deform_conv2d_export(x, offset, weight, bias, padding=1, mask=mask)
    assert (got - ref).abs().max().item() < 1e-4


def test_without_mask_or_bias_and_in_float64():
    x, offset, _, weight, _ = _inputs((6, 5), 1, seed=3, dtype=torch.float64)
    ref = deform_conv2d(x, offset, weight, None, padding=1)
    got = deform_conv2d_export(x, offset, weight, None, padding=1)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max().item() < 1e-10


def test_gradients_match_torchvision():
    x, offset, mask, weight, bias = _inputs((5, 7), 1, seed=4, scale=1.5)
    grads = []
    for op in (deform_conv2d, deform_conv2d_export):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
        a, o, m, wt, b = leaves
        op(a, o, wt, b, padding=1, mask=m).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for ref, got in zip(*grads):
        assert (got - ref).abs().max().item() < 1e-3 * max(1.0, ref.abs().max().item())


def test_rejects_what_it_does_not_implement():
    x, offset, mask, weight, bias = _inputs((5, 5), 1)
    with pytest.raises(ValueError, match="3x3"):
        deform_conv2d_export(x, offset, weight[:, :, :1, :1], bias, padding=0, mask=mask)


@pytest.mark.parametrize("mode", OFFSET_MODES)
@pytest.mark.parametrize("stride, big, small", [(1, (9, 11), (5, 6)), (2, (9, 11), (17, 21))])
def test_each_offset_mode_matches_the_reference_conv(mode, stride, big, small):
    """The "high" (offsets from a larger map) and "low" (stride 2) convs of a block, exportable vs torchvision."""
    torch.manual_seed(0)
    conv = DeformConvNorm(6, 16, stride=stride).eval()
    x = torch.randn(2, 6, *small)
    if stride == 2:  # the low conv: the offset map has the output's size
        big = ((small[0] + 1) // 2, (small[1] + 1) // 2)
    offset = torch.randn(2, 18, *big) * 2
    mask = torch.rand(2, 9, *big)
    with torch.no_grad():
        ref = conv(x, offset, mask, mode)
        got = conv(x, offset, mask, mode, exportable=True)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(TOWER_FIXTURES))
def test_export_impl_reproduces_the_reference_fixtures(name):
    meta, state, inputs, outputs = load_tower_fixture(name)
    source, mode = TOWER_FIXTURES[name]
    tower = DyHead(int(meta["channels"]), int(meta["num_blocks"]), offset_mode=mode, impl="export").eval()
    tower.load_state_dict(convert_dyhead(state, source), strict=True)
    with torch.no_grad():
        ours = tower(inputs)
    for a, b in zip(ours, outputs):
        assert (a - b).abs().max().item() < 1e-4


class HighConvs(nn.Module):
    """One "high" conv per offset mode: offsets of the larger map, conv over the smaller one (the quirk)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Conv2d(6, 27, 3, padding=1)
        self.convs = nn.ModuleList(DeformConvNorm(6, 16) for _ in OFFSET_MODES)

    def forward(self, big: torch.Tensor, small: torch.Tensor, exportable: bool = True) -> tuple[torch.Tensor, ...]:
        om = self.offset(big)
        offset, mask = om[:, :18], om[:, 18:].sigmoid()
        return tuple(conv(small, offset, mask, mode, exportable) for conv, mode in zip(self.convs, OFFSET_MODES))


def test_onnx_export_of_all_offset_modes_runs_on_onnxruntime_at_other_sizes(tmp_path):
    """Dynamic sizes (the small map half the big one, as between pyramid levels), checked at two sizes
    other than the traced one; standard ops only."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import contextlib
    import io
    import warnings

    from torch.export import Dim

    torch.manual_seed(0)
    model = HighConvs().eval()
    for p in model.offset.parameters():
        p.data.mul_(20)  # offsets of several pixels, so every mode reads far from the plain grid
    k, j = Dim("k", min=2, max=32), Dim("j", min=2, max=32)
    shapes = {"big": {0: Dim("b", min=1, max=8), 2: 2 * k, 3: 2 * j}, "small": {0: Dim("b", min=1, max=8), 2: k, 3: j}}
    path = tmp_path / "high.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(2, 6, 12, 16), torch.randn(2, 6, 6, 8)), dynamic_shapes=shapes)
        torch.onnx.export(program, dynamo=True, opset_version=18).save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "GridSample" in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b, (h, w) in [(1, (5, 7)), (3, (9, 4))]:
        big, small = torch.randn(b, 6, 2 * h, 2 * w), torch.randn(b, 6, h, w)
        with torch.no_grad():
            ref = model(big, small, exportable=False)
        got = session.run(None, dict(zip(names, (big.numpy(), small.numpy()))))
        for mode, r, g in zip(OFFSET_MODES, ref, got):
            assert (torch.from_numpy(g) - r).abs().max().item() < 1e-4, mode


@pytest.mark.parametrize("stride", [1, 2])
def test_sampled_conv_equals_torchvision(stride):
    """The CUDA fast path's conv (float32 sampling, GEMM in the autocast dtype) in float32 on CPU."""
    from torchvision.ops import deform_conv2d

    from dyhead_cli.models.deform_export import deform_conv2d_sampled

    g = torch.Generator().manual_seed(stride)
    x = torch.randn(2, 16, 11, 13, generator=g)
    h, w = (11 - 1) // stride + 1, (13 - 1) // stride + 1
    offset = torch.randn(2, 18, h, w, generator=g) * 3
    mask = torch.rand(2, 9, h, w, generator=g)
    weight, bias = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
    want = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = deform_conv2d_sampled(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the GEMM in bfloat16, the sampling still float32
        low = deform_conv2d_sampled(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert low.dtype == torch.bfloat16 and (low.float() - want).abs().max().item() < 0.05 * want.abs().max().item()
