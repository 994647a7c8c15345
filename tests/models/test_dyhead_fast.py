"""The fast deformable conv and the fast DyHead tower against torchvision's op (the oracle)."""

import copy

import pytest
import torch
from helpers_fixtures import TOWER_FIXTURES, load_tower_fixture
from torchvision.ops import deform_conv2d

from dyhead_cli.convert.dyhead_keys import convert_dyhead
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.deform import (
    bilinear_taps,
    conv_all_at_once,
    deform_conv2d_fast,
    sampling_table,
    weight_matrix,
)
from dyhead_cli.models.dyhead import DyHead

# (batch, channels, H, W, stride, out channels): odd sizes, stride 2, 1-pixel-wide maps
CASES = [
    (2, 4, 24, 23, 1, 3),  # 1104 output positions: several gather + GEMM chunks
    (2, 8, 7, 9, 1, 5),
    (2, 8, 7, 9, 2, 5),
    (1, 4, 1, 1, 1, 3),
    (1, 4, 1, 1, 2, 3),
    (1, 4, 1, 6, 1, 3),
    (3, 6, 5, 1, 2, 4),
    (1, 16, 12, 10, 2, 8),
]


def conv_inputs(b, c, h, w, stride, c_out, offset_scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    offset = torch.randn(b, 18, oh, ow, generator=g, dtype=dtype) * offset_scale
    mask = torch.rand(b, 9, oh, ow, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    return x, offset, weight, bias, mask


def border_offsets(b, oh, ow, h, w, stride, dtype=torch.float32, seed=0):
    """Offsets putting every sample exactly on -1, 0, H-1, H (and W's) or far outside, or integer steps."""
    g = torch.Generator().manual_seed(seed)
    oy = torch.arange(oh).view(oh, 1, 1) * stride - 1 + torch.arange(3).view(1, 1, 3).repeat_interleave(3, -1)
    ox = torch.arange(ow).view(1, ow, 1) * stride - 1 + torch.arange(3).repeat(3).view(1, 1, 9)
    targets_y = torch.tensor([-1.0, 0.0, h - 1.0, float(h), -1e4, 1e4, -1.5, h - 0.5])
    targets_x = torch.tensor([-1.0, 0.0, w - 1.0, float(w), 1e4, -1e4, w - 0.5, -0.5])
    pick = torch.randint(0, len(targets_y), (b, oh, ow, 9), generator=g)
    dy = targets_y[pick] - oy
    dx = targets_x[torch.randint(0, len(targets_x), (b, oh, ow, 9), generator=g)] - ox
    integer = torch.randint(-2, 3, (b, oh, ow, 9, 2), generator=g).to(dtype)
    use_int = torch.rand(b, oh, ow, 9, 1, generator=g) < 0.3
    off = torch.where(use_int, integer, torch.stack([dy, dx], -1).to(dtype))
    # (B, h, w, 9, 2) -> (B, 18, h, w)
    return off.reshape(b, oh, ow, 18).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_conv_matches_torchvision(case, with_mask, with_bias):
    x, offset, weight, bias, mask = conv_inputs(*case)
    stride = case[4]
    bias = bias if with_bias else None
    mask = mask if with_mask else None
    want = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = deform_conv2d_fast(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_fast_conv_samples_exactly_on_and_beyond_borders(case):
    b, c, h, w, stride, c_out = case
    x, _, weight, bias, mask = conv_inputs(*case)
    offset = border_offsets(b, mask.shape[2], mask.shape[3], h, w, stride)
    want = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = deform_conv2d_fast(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("padding", [0, 2])
def test_fast_conv_other_padding(padding):
    x, _, weight, bias, _ = conv_inputs(2, 4, 8, 7, 1, 3)
    oh, ow = 8 + 2 * padding - 2, 7 + 2 * padding - 2
    offset = torch.randn(2, 18, oh, ow) * 2
    mask = torch.rand(2, 9, oh, ow)
    want = deform_conv2d(x, offset, weight, bias, padding=padding, mask=mask)
    got = deform_conv2d_fast(x, offset, weight, bias, padding=padding, mask=mask)
    assert (got - want).abs().max().item() < 1e-4


def grads(fn, x, offset, weight, bias, mask, stride):
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias, mask)]
    x, offset, weight, bias, mask = leaves
    y = fn(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * g).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("case", CASES[:3] + CASES[5:7])
@pytest.mark.parametrize("offsets", ["random", "zero", "integer", "borders"])
def test_fast_conv_gradients_match_torchvision(case, offsets):
    """Input, offset, weight, bias and mask gradients, in float64, incl. samples exactly on pixels."""
    b, c, h, w, stride, c_out = case
    x, offset, weight, bias, mask = conv_inputs(*case, dtype=torch.float64)
    if offsets == "zero":
        offset = torch.zeros_like(offset)  # zero-initialised offset convs: taps exactly on -1 and H
    elif offsets == "integer":
        offset = offset.round()
    elif offsets == "borders":
        offset = border_offsets(b, mask.shape[2], mask.shape[3], h, w, stride, dtype=torch.float64)
    want = grads(deform_conv2d, x, offset, weight, bias, mask, stride)
    got = grads(deform_conv2d_fast, x, offset, weight, bias, mask, stride)
    for name, a, e in zip(("input", "offset", "weight", "bias", "mask"), got, want):
        assert (a - e).abs().max().item() < 1e-9, name


def test_fast_conv_float32_gradients_and_no_mask():
    x, offset, weight, bias, _ = conv_inputs(2, 8, 9, 7, 2, 6)
    leaves = lambda: [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    outs = []
    for fn in (deform_conv2d, deform_conv2d_fast):
        ts = leaves()
        fn(ts[0], ts[1], ts[2], ts[3], stride=2, padding=1).square().sum().backward()
        outs.append([t.grad for t in ts])
    for a, e in zip(*outs):
        assert (a - e).abs().max().item() < 1e-3 * max(1.0, e.abs().max().item())


def test_fast_conv_under_cpu_autocast_computes_in_float32():
    x, offset, weight, bias, mask = conv_inputs(1, 8, 6, 6, 1, 4)
    want = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = deform_conv2d_fast(x, offset.bfloat16(), weight, bias, padding=1, mask=mask)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()  # bf16 offsets only


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]])
@pytest.mark.parametrize("channels_last", [False, True])
def test_all_at_once_conv_the_cuda_layout_matches_torchvision(case, channels_last):
    """``conv_all_at_once`` (what the table conv does off CPU: one gather, one GEMM), checked on CPU."""
    x, offset, weight, bias, mask = conv_inputs(*case)
    b, _, h, w, stride, _ = case
    want = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    table, starts = sampling_table([x])
    index, weights = bilinear_taps(offset, mask, (h, w), (stride, stride), (1, 1), starts[0])
    got = conv_all_at_once(table, index, weights, weight_matrix(weight), bias, (b, *want.shape[-2:]), channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    assert (got - want).abs().max().item() < 1e-4
    no_bias = conv_all_at_once(table, index, weights, weight_matrix(weight), None, (b, *want.shape[-2:]), channels_last)
    assert (no_bias + bias[:, None, None] - want).abs().max().item() < 1e-4


def test_a_reused_sampling_table_equals_a_fresh_one():
    """Refilling the previous block's table writes the interiors only: its zero padding must still hold."""
    first = pyramid(2, 8, [(7, 9), (4, 5)], seed=3)
    second = pyramid(2, 8, [(7, 9), (4, 5)], seed=4)
    used, _ = sampling_table(first)
    reused, starts = sampling_table(second, reuse=used)
    fresh, fresh_starts = sampling_table(second)
    assert reused.data_ptr() == used.data_ptr() and starts == fresh_starts
    assert torch.equal(reused, fresh)
    assert (fresh == 0).sum().item() == fresh.numel() - sum(x.numel() for x in second)  # only padding is 0


def test_dyrelu_in_place_slabs_match_forward(monkeypatch):
    """Without autograd ``forward_fused`` overwrites its input a few channels at a time (here 3 slabs of 2
    channels and a last one of 1, batch 2); it must give ``forward``'s numbers."""
    import dyhead_cli.models.dyhead as dyhead_module

    torch.manual_seed(0)
    attn = dyhead_module.DyReLU(7, 4)
    torch.nn.init.normal_(attn.fc2.weight, 0.0, 0.5)
    x = torch.randn(2, 7, 5, 6)
    monkeypatch.setattr(dyhead_module, "SLAB_FLOATS", 2 * 2 * 5 * 6)
    with torch.no_grad():
        want = attn(x)
        work = x.clone()
        got = attn.forward_fused(work)
    assert got.data_ptr() == work.data_ptr()  # in place
    assert (got - want).abs().max().item() < 1e-6
    before = x.clone()
    x.requires_grad_(True)
    assert (attn.forward_fused(x) - want).abs().max().item() < 1e-6  # autograd: out of place
    assert torch.equal(x.detach(), before)


def test_fast_tower_leaves_its_inputs_alone_and_repeats_itself():
    """The fast path works in place on its own buffers only, and the table it passes from block to block
    carries nothing from one call to the next."""
    tower = perturbed_tower(16, 3, "official")
    feats = pyramid(2, 16, [(9, 11), (5, 6), (3, 3)])
    copies = [f.clone() for f in feats]
    with torch.no_grad():
        want = tower.set_impl("reference")(feats)
        first = tower.set_impl("fast")(feats)
        other = tower(pyramid(2, 16, [(9, 11), (5, 6), (3, 3)], seed=7))
        second = tower(feats)
    assert all(torch.equal(f, c) for f, c in zip(feats, copies))
    for a, b, e, o in zip(first, second, want, other):
        assert torch.equal(a, b) and (a - e).abs().max().item() < 1e-4 and not torch.equal(a, o)


def test_other_kernel_sizes_go_to_torchvision():
    x = torch.randn(1, 4, 6, 6)
    weight = torch.randn(3, 4, 1, 1)
    offset = torch.randn(1, 2, 6, 6)
    assert torch.equal(deform_conv2d_fast(x, offset, weight, padding=0), deform_conv2d(x, offset, weight, padding=0))


def perturbed_tower(channels, blocks, mode, in_channels=None, seed=0):
    torch.manual_seed(seed)
    tower = DyHead(channels, blocks, offset_mode=mode, in_channels=in_channels)
    # Make sampling move (offsets of a few pixels) and the attention layers matter, away from the
    # ReLU kinks (a zero GroupNorm bias puts the scale attention's pre-activation exactly at 0).
    for block in tower.blocks:
        torch.nn.init.normal_(block.offset.weight, 0.0, 0.05)
        torch.nn.init.normal_(block.offset.bias, 0.0, 0.5)
        torch.nn.init.normal_(block.scale_attn.weight, 0.0, 0.2)
        torch.nn.init.constant_(block.scale_attn.bias, 0.5)
        torch.nn.init.normal_(block.task_attn.fc2.weight, 0.0, 0.2)
        for conv in (block.spatial_high, block.spatial_mid, block.spatial_low):
            torch.nn.init.normal_(conv.bias, 0.0, 0.1)
            torch.nn.init.normal_(conv.norm.weight, 1.0, 0.2)
            torch.nn.init.normal_(conv.norm.bias, 0.0, 0.2)
    return tower


def pyramid(batch, channels, sizes, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=dtype) for h, w in sizes]


TOWER_CASES = [  # (batch, channels, in_channels, level sizes)
    (1, 32, None, [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]),
    (2, 32, 48, [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]),
    (3, 16, None, [(10, 7), (5, 4), (3, 2)]),
    (1, 48, None, [(9, 9)]),
]


@pytest.mark.parametrize("mode", ["official", "mmdet", "aligned"])
@pytest.mark.parametrize("case", TOWER_CASES)
def test_fast_tower_matches_reference(mode, case):
    batch, channels, in_channels, sizes = case
    tower = perturbed_tower(channels, 2, mode, in_channels)
    feats = pyramid(batch, in_channels or channels, sizes)
    with torch.no_grad():
        want = tower.set_impl("reference")(feats)
        got = tower.set_impl("fast")(feats)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.is_contiguous()
        assert (a - e).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["official", "mmdet", "aligned"])
def test_fast_tower_gradients_match_reference(mode):
    tower = perturbed_tower(16, 2, mode).double()
    feats = pyramid(2, 16, [(9, 11), (5, 6), (3, 3)], dtype=torch.float64)
    results = []
    for impl in ("reference", "fast"):
        tower.zero_grad()
        xs = [f.clone().requires_grad_() for f in feats]
        out = tower.set_impl(impl)(xs)
        sum((o * torch.cos(o)).sum() for o in out).backward()
        results.append(([x.grad for x in xs], {n: p.grad.clone() for n, p in tower.named_parameters()}))
    (gx_ref, gp_ref), (gx_fast, gp_fast) = results
    for a, e in zip(gx_fast, gx_ref):
        assert (a - e).abs().max().item() < 1e-8
    for name, e in gp_ref.items():
        assert (gp_fast[name] - e).abs().max().item() < 1e-8 * max(1.0, e.abs().max().item()), name


@pytest.mark.parametrize("name", sorted(TOWER_FIXTURES))
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_parity_fixtures_through_each_impl(name, impl):
    meta, state, inputs, outputs = load_tower_fixture(name)
    source, mode = TOWER_FIXTURES[name]
    tower = DyHead(int(meta["channels"]), int(meta["num_blocks"]), offset_mode=mode)
    tower.load_state_dict(convert_dyhead(state, source), strict=True)
    with torch.no_grad():
        ours = tower.eval().set_impl(impl)(inputs)
    for a, b in zip(ours, outputs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


def test_fast_tower_under_cpu_autocast_runs():
    tower = perturbed_tower(16, 1, "official")
    feats = pyramid(1, 16, [(8, 8), (4, 4), (2, 2)])
    with torch.no_grad():
        want = tower.set_impl("fast")(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = tower(feats)
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.isfinite(a).all()
        assert (a.float() - e).abs().max().item() < 0.25


def test_set_impl_checks_its_argument_and_state_dict_is_unchanged():
    tower = DyHead(16, 1)
    keys = list(tower.state_dict())
    with pytest.raises(DyheadError, match="impl must be one of"):
        tower.set_impl("cuda")
    assert tower.set_impl("reference") is tower and list(tower.state_dict()) == keys


FIXTURE_MODES = [  # the newest semantics (mmdet: flat offset, cropped mask) in the default run, all in -m slow
    pytest.param(name, mode, marks=() if (name, mode) == ("mmdet_main", "mmdet") else pytest.mark.slow)
    for name in sorted(TOWER_FIXTURES)
    for mode in ("official", "mmdet", "aligned")
]


@pytest.mark.parametrize("name, mode", FIXTURE_MODES)
def test_fast_tower_gradients_on_fixture_weights(name, mode):
    """Every fixture's weights and inputs in every offset mode: fast vs reference outputs and the
    gradients w.r.t. every input level and every parameter, in float64 (~15 s each on 2 idle cores:
    torchvision's float64 backward)."""
    meta, state, inputs, _ = load_tower_fixture(name)
    source, _ = TOWER_FIXTURES[name]
    tower = DyHead(int(meta["channels"]), int(meta["num_blocks"]), offset_mode=mode)
    tower.load_state_dict(convert_dyhead(state, source), strict=True)
    tower = tower.double()
    results = []
    for impl in ("reference", "fast"):
        tower.zero_grad(set_to_none=True)
        xs = [x.double().requires_grad_() for x in inputs]
        out = tower.set_impl(impl)(xs)
        sum((o * torch.sin(o + i)).sum() for i, o in enumerate(out)).backward()
        results.append(
            ([o.detach() for o in out], [x.grad for x in xs], {n: p.grad.clone() for n, p in tower.named_parameters()})
        )
    (o_ref, gx_ref, gp_ref), (o_fast, gx_fast, gp_fast) = results
    for a, e in zip(o_fast + gx_fast, o_ref + gx_ref):
        assert (a - e).abs().max().item() < 1e-9 * max(1.0, e.abs().max().item())
    for key, e in gp_ref.items():
        assert (gp_fast[key] - e).abs().max().item() < 1e-9 * max(1.0, e.abs().max().item()), key


def test_packed_weights_follow_in_place_updates():
    """The packed GEMM weights are cached per weight version: an in-place update (an optimizer step,
    load_state_dict) must be seen by the next inference call, and towers built under inference_mode
    (no version counter) must still run."""
    tower = perturbed_tower(16, 1, "official").eval()
    feats = pyramid(1, 16, [(8, 8), (4, 4), (2, 2)])
    with torch.no_grad():
        before = tower.set_impl("fast")(feats)
        tower.blocks[0].spatial_mid.weight.mul_(-0.5)
        after = tower(feats)
        want = tower.set_impl("reference")(feats)
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 1e-3
    assert max((a - e).abs().max().item() for a, e in zip(after, want)) < 1e-4
    with torch.inference_mode():
        fresh = perturbed_tower(16, 1, "official").eval()
        got = fresh.set_impl("fast")(feats)
        ref = fresh.set_impl("reference")(feats)
    assert max((a - e).abs().max().item() for a, e in zip(got, ref)) < 1e-4


def test_cpu_gemm_dtype_is_bfloat16_only_under_a_bfloat16_cpu_autocast(monkeypatch) -> None:
    from dyhead_cli.models import deform

    monkeypatch.setattr(deform, "cpu_bf16_gemm", lambda: True)
    assert deform.cpu_gemm_dtype(torch.float32) == torch.float32  # no autocast: float32, the parity default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert deform.cpu_gemm_dtype(torch.float32) == torch.bfloat16
        assert deform.cpu_gemm_dtype(torch.float64) == torch.float64  # float64 features stay float64
    monkeypatch.setattr(deform, "cpu_bf16_gemm", lambda: False)  # a CPU without native bfloat16 dot products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert deform.cpu_gemm_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("grad", [False, True])
def test_fast_tower_under_cpu_bf16_autocast_stays_close_to_float32(monkeypatch, grad: bool) -> None:
    """Under a bfloat16 CPU autocast the tower's GEMMs run in bfloat16 (where the CPU has them): outputs
    float32, within bfloat16 rounding of the float32 tower, gradients finite."""
    from dyhead_cli.models import deform

    torch.manual_seed(0)
    tower = DyHead(32, 2, impl="fast").eval()
    feats = [torch.randn(2, 32, s, s + 1) for s in (12, 6, 3)]
    with torch.no_grad():
        want = tower(feats)
    gemm_dtypes = []
    real = deform.GemmWeight.linear
    monkeypatch.setattr(deform.GemmWeight, "linear", lambda self, c, b: gemm_dtypes.append(c.dtype) or real(self, c, b))
    inputs = [f.clone().requires_grad_(grad) for f in feats]
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = tower(inputs)
    expected = torch.bfloat16 if deform.cpu_bf16_gemm() else torch.float32
    assert gemm_dtypes and set(gemm_dtypes) == {expected}
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert (g.float() - w).abs().max() < 0.05 * w.abs().max()
    if grad:
        sum(g.float().square().sum() for g in got).backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def test_fast_tower_with_autograd_is_float32_exact_with_large_conv_biases():
    """Training's path (autograd on) against a float64 tower. Its conv output was a channels-last view,
    which sent GroupNorm to its CPU channels-last kernel: 50x less exact once the maps have a large mean
    (here DCN biases of 2), an error of 7.6e-4 on the official fixture's weights."""
    tower = perturbed_tower(32, 2, "official")
    with torch.no_grad():
        for block in tower.blocks:
            for conv in (block.spatial_high, block.spatial_mid, block.spatial_low):
                conv.bias.fill_(2.0)
    feats = pyramid(2, 32, [(16, 20), (8, 10), (4, 5)])
    truth = copy.deepcopy(tower).double().set_impl("reference")([f.double() for f in feats])
    got = tower.set_impl("fast")([f.clone().requires_grad_(True) for f in feats])
    assert all(g.is_contiguous() for g in got)
    worst = max((g.detach().double() - t).abs().max().item() for g, t in zip(got, truth))
    assert worst < 3e-5, worst
