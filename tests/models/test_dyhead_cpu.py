"""The channels-last pieces of the DyHead block's CPU inference path, each against the plain torch ops it
replaces (the whole path is tested against the reference tower in test_dyhead_fast.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dyhead_cli.models.dyhead_cpu as dyhead_cpu
from dyhead_cli.models.dyhead_cpu import (
    channel_stats,
    group_norm_affine,
    scaled_sum_dyrelu_,
    upsample_into,
    upsampled_mean,
)


def channels_last(*shape: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + shift).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_group_norm_affine_is_group_norm(batch, shift):
    """norm(y) == y * scale + shift per image and channel, for two maps with their own norms at once, also
    for maps whose mean is far from zero (the statistics are two-pass, not E[y^2] - E[y]^2)."""
    norms = [torch.nn.GroupNorm(4, 16) for _ in range(2)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    ys = [channels_last(batch, 16, 7, 9, seed=s, shift=shift) * torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1) for s in (0, 1)]
    with torch.no_grad():
        stats = [channel_stats(y) for y in ys]
        mean, var = (torch.stack(t) for t in zip(*stats))
        weight = torch.stack([n.weight for n in norms])[:, None]
        bias = torch.stack([n.bias for n in norms])[:, None]
        scale, offset = group_norm_affine(mean, var, weight, bias, 4, norms[0].eps)
    assert scale.shape == offset.shape == mean.shape == (2, batch, 16)
    for k, (y, norm) in enumerate(zip(ys, norms)):
        want = F.group_norm(y.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
        got = y * scale[k][..., None, None] + offset[k][..., None, None]
        assert (got.double() - want).abs().max().item() < 1e-5
        assert (mean[k].double() - y.double().mean(dim=(2, 3))).abs().max().item() < 1e-5
        assert (var[k].double() - y.double().var(dim=(2, 3), unbiased=False)).abs().max().item() < 1e-4


@pytest.mark.parametrize(("src", "dst"), [((5, 7), (9, 13)), ((3, 3), (5, 6)), ((1, 1), (2, 2)), ((4, 4), (4, 4))])
def test_upsampled_mean_is_the_mean_of_the_upsampled_map(src, dst):
    y = channels_last(2, 8, *src)
    up = F.interpolate(y, size=dst, mode="bilinear", align_corners=True)
    assert (upsampled_mean(y, dst) - up.mean(dim=(2, 3))).abs().max().item() < 1e-6


def test_upsample_into_writes_the_buffer():
    y = channels_last(2, 8, 5, 7)
    buf = torch.full((2 * 9 * 13, 8), float("nan"))
    got = upsample_into(y, buf.view(2, 9, 13, 8).permute(0, 3, 1, 2))
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, F.interpolate(y, size=(9, 13), mode="bilinear", align_corners=True))


@pytest.mark.parametrize("n_maps", [1, 2, 3])
def test_scaled_sum_dyrelu_in_slabs(monkeypatch, n_maps):
    """maps[0] <- max(f * a1 + b1, f * a2 + b2), f = shift + sum maps[i] * scales[i], in place, here in slabs
    of 4 rows (6*5 = 30 rows per image: 7 full slabs and a last one of 2)."""
    monkeypatch.setattr(dyhead_cpu, "SLAB_FLOATS", 4 * 2 * 8)
    maps = [channels_last(2, 8, 6, 5, seed=i) for i in range(n_maps)]
    g = torch.Generator().manual_seed(9)
    scales = [torch.rand(2, 8, generator=g) for _ in maps]
    shift = torch.randn(2, 8, generator=g)
    a1, b1, a2, b2 = (torch.randn(2, 8, generator=g) for _ in range(4))
    f = shift[..., None, None] + sum(m * s[..., None, None] for m, s in zip(maps, scales))
    want = torch.maximum(f * a1[..., None, None] + b1[..., None, None], f * a2[..., None, None] + b2[..., None, None])
    first = maps[0]
    got = scaled_sum_dyrelu_(maps, scales, shift, [a1, b1, a2, b2])
    assert got.data_ptr() == first.data_ptr() and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max().item() < 1e-5


def test_batched_taps_equal_the_per_conv_ones():
    """bilinear_taps_many over several convs (strides 1 and 2, a batch of 2, points beyond every border,
    offsets as channel slices of the offset conv's output, like the block's) gives bilinear_taps's index
    and weights, concatenated."""
    from dyhead_cli.models.deform import bilinear_taps
    from dyhead_cli.models.deform_batch import Segment, bilinear_taps_many

    g = torch.Generator().manual_seed(3)
    convs = [((7, 9), (7, 9), 1, 0), ((4, 5), (7, 9), 2, 500), ((3, 3), (3, 3), 1, 123)]
    offsets, masks, segments, want = [], [], [], []
    for (h, w), in_size, stride, row_start in convs:
        om = torch.randn(2, 27, h, w, generator=g) * 4.0
        offset = om[:, :18]  # not contiguous over the batch
        mask = torch.rand(2, 9, h, w, generator=g)
        offsets.append(offset)
        masks.append(mask)
        segments.append(Segment(2, h, w, *in_size, stride, row_start))
        want.append(bilinear_taps(offset, mask, in_size, (stride, stride), (1, 1), row_start))
    index, weights = bilinear_taps_many(offsets, masks, segments)
    assert torch.equal(index, torch.cat([i for i, _ in want]))
    assert (weights - torch.cat([w for _, w in want])).abs().max().item() < 1e-6
