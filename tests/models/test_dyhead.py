import pytest
import torch
from helpers_fixtures import TOWER_FIXTURES, load_tower_fixture

from dyhead_cli.convert.dyhead_keys import convert_dyhead
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.dyhead import DyHead, DyHeadBlock, fit_offset_to_output, make_divisible

SIZES = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]


def levels(channels=32, batch=2, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("name", sorted(TOWER_FIXTURES))
def test_parity_with_reference_fixture(name):
    meta, state, inputs, outputs = load_tower_fixture(name)
    source, mode = TOWER_FIXTURES[name]
    assert meta["dyhead_offset_mode"] == mode
    tower = DyHead(int(meta["channels"]), int(meta["num_blocks"]), offset_mode=mode)
    tower.load_state_dict(convert_dyhead(state, source), strict=True)
    tower.eval()
    with torch.no_grad():
        ours = tower(inputs)
    for a, b in zip(ours, outputs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(TOWER_FIXTURES))
def test_offset_modes_really_differ_on_fixture(name):
    """Each fixture is reproduced by its own mode only: the other two modes miss it by far."""
    meta, state, inputs, outputs = load_tower_fixture(name)
    source, mode = TOWER_FIXTURES[name]
    for other in sorted({"official", "mmdet", "aligned"} - {mode}):
        tower = DyHead(int(meta["channels"]), int(meta["num_blocks"]), offset_mode=other)
        tower.load_state_dict(convert_dyhead(state, source))
        with torch.no_grad():
            ours = tower(inputs)
        assert max((a - b).abs().max().item() for a, b in zip(ours, outputs)) > 0.01, other


def test_convert_accepts_any_prefix_and_ignores_other_keys():
    _, state, _, _ = load_tower_fixture("mmdet_release")
    prefixed = {f"neck.1.{k}": v for k, v in state.items()}
    prefixed["neck.0.lateral_convs.0.conv.weight"] = torch.zeros(1)
    converted = convert_dyhead(prefixed, "mmdet")
    DyHead(64, 2, offset_mode="mmdet").load_state_dict(converted, strict=True)
    assert torch.count_nonzero(converted["blocks.0.spatial_mid.bias"]) == 0


def test_convert_lists_unknown_keys():
    with pytest.raises(DyheadError, match=r"backbone\.dyhead_tower\.0\.mystery\.weight"):
        convert_dyhead({"backbone.dyhead_tower.0.mystery.weight": torch.zeros(1)}, "official")
    with pytest.raises(DyheadError, match="source must be"):
        convert_dyhead({}, "detectron")


def test_shapes_in_and_out_and_zero_blocks_is_identity():
    feats = levels()
    out = DyHead(32, 2)(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    same = DyHead(32, 0)(feats)
    assert all(a is b for a, b in zip(same, feats))


def test_in_channels_differs_from_channels():
    feats = levels(channels=48)
    out = DyHead(32, 2, in_channels=48)(feats)
    assert [o.shape[1] for o in out] == [32] * 5


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    tower = DyHead(32, 2)
    for block in tower.blocks:  # move sampling off the grid so offset convs get gradients
        torch.nn.init.normal_(block.offset.weight, 0, 0.05)
    out = tower(levels())
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_scale_attention_weights_differ_per_level():
    torch.manual_seed(0)
    block = DyHeadBlock(32, 32)
    torch.nn.init.normal_(block.scale_attn.weight, 0, 0.5)
    torch.nn.init.constant_(block.scale_attn.bias, 0.5)
    feats = [f + 0.3 * i for i, f in enumerate(levels())]  # levels with different statistics
    weights = [block.scale_weight(f).flatten() for f in feats]
    assert len({round(w[0].item(), 5) for w in weights}) == 5
    assert all(((w >= 0) & (w <= 1)).all() for w in weights)


def test_task_attention_changes_the_output():
    torch.manual_seed(0)
    block = DyHeadBlock(32, 32)
    x = torch.randn(2, 32, 8, 8)
    y = block.task_attn(x)
    assert y.shape == x.shape and not torch.allclose(x, y)
    # recompute DyReLU-B by hand: max(x * a1 + b1, x * a2 + b2) from the pooled coefficients
    a = block.task_attn
    coeff = torch.nn.functional.relu6(a.fc2(torch.relu(a.fc1(x.mean(dim=(2, 3))))) + 3) / 6
    a1, b1, a2, b2 = coeff[:, :, None, None].split(32, dim=1)
    expected = torch.maximum(x * (2 * a1) + b1 - 0.5, x * (2 * a2 - 1) + b2 - 0.5)
    assert torch.allclose(y, expected, atol=1e-6)


def test_spatial_attention_uses_offsets():
    torch.manual_seed(0)
    block = DyHeadBlock(32, 32)
    feats = levels()
    before = block(feats)
    torch.nn.init.normal_(block.offset.weight, 0, 0.1)
    after = block(feats)
    assert (before[1] - after[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["official", "mmdet", "aligned"])
def test_fit_offset_to_output(mode):
    off = torch.arange(2 * 18 * 4 * 6, dtype=torch.float32).view(2, 18, 4, 6)
    mask = torch.rand(2, 9, 4, 6)
    o, m = fit_offset_to_output(off, mask, (2, 3), mode)
    assert o.shape == (2, 18, 2, 3) and m.shape == (2, 9, 2, 3)
    if mode in ("official", "mmdet"):  # the offset is read as a flat prefix in both
        assert torch.equal(o[1].flatten(), off[1].flatten()[: 18 * 6])
    if mode == "official":
        assert torch.equal(m[1].flatten(), mask[1].flatten()[: 9 * 6])
    if mode == "mmdet":  # only the mask is the true top-left crop
        assert torch.equal(m, mask[:, :, :2, :3])


def test_make_divisible_matches_official_rounding():
    assert make_divisible(64) == 64 and make_divisible(16) == 16 and make_divisible(10) == 12
    assert DyHeadBlock(48, 48).task_attn.fc1.out_features == 12


def test_official_initialisation():
    """DCN weights uniform in +-1/sqrt(9 C_in) with zero bias, offset conv at PyTorch's default (not zero),
    scale branch N(0, 0.01); zero_init_offset is MMDetection's zeroed offset conv."""
    torch.manual_seed(0)
    block = DyHeadBlock(64, 64)
    bound = 1.0 / (9 * 64) ** 0.5
    for conv in (block.spatial_low, block.spatial_mid, block.spatial_high):
        w = conv.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # uniform fills the interval
        assert abs(w.std().item() - bound / 3**0.5) < 0.05 * bound and torch.count_nonzero(conv.bias) == 0
    assert block.offset.weight.abs().max() > 0 and torch.count_nonzero(block.offset.bias) > 0
    assert abs(block.scale_attn.weight.std().item() - 0.01) < 0.003
    zeroed = DyHeadBlock(64, 64, zero_init_offset=True)
    assert torch.count_nonzero(zeroed.offset.weight) == 0 and torch.count_nonzero(zeroed.offset.bias) == 0


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_trace_records_every_block_and_equals_the_forward(impl):
    tower = DyHead(32, 2, impl=impl).eval()
    feats = levels()
    traces = []
    with torch.no_grad():
        traced = tower(feats, traces=traces)
        plain = tower(feats)
    assert len(traces) == 2 and all(len(t.outputs) == len(feats) for t in traces)
    assert set(traces[0].scale[0]) == {"mid", "high"} and set(traces[0].scale[2]) == {"low", "mid", "high"}
    assert traces[0].offsets[0].shape == (2, 18, 24, 32) and traces[0].masks[0].shape == (2, 9, 24, 32)
    for a, b, t in zip(traced, plain, traces[-1].outputs):
        assert a is t and (a - b).abs().max().item() < 1e-5
