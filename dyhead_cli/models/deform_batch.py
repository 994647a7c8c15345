"""Sample points of many deformable convs at once: the 13 convs of a DyHead block in one set of ops.

Why: ``deform.bilinear_taps`` is ~30 whole-tensor ops per conv; a block has 13 convs, mostly on small
maps, so a 640-px tower spent more time dispatching those ops than computing them. Here each conv's
offsets and mask are copied into one (2, N) / (N,) buffer (one op each), and the per-position constants
(base grid, limits, row pitch, neighbour steps) come concatenated from a cache keyed by the block's
shapes, so the arithmetic runs once over all N taps. The numbers are ``bilinear_taps``'s (tested equal).

Inference on CPU only (``dyhead_cpu.block_forward_cpu``); autograd and other devices use ``bilinear_taps``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from dyhead_cli.models.deform import INDEX_DTYPE, PAD_AFTER, PAD_BEFORE, neighbour_rows, tap_grid


class Segment(NamedTuple):
    """One conv's share of a batched tap computation: output (batch, h, w) sampled from a map of size
    (in_h, in_w) whose table part starts at ``row_start``, with ``stride`` and padding 1."""

    batch: int
    h: int
    w: int
    in_h: int
    in_w: int
    stride: int
    row_start: int

    @property
    def taps(self) -> int:
        return self.batch * self.h * self.w * 9


@functools.lru_cache(maxsize=4)  # one set per block shape; about 36 bytes per tap (4 MB for a 640-px block)
def _constants(segments: tuple[Segment, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per tap, concatenated over the segments: base point (2, N) and largest point (2, N) in input pixels,
    the table's row pitch W+3 (N,) and the rows of the 4 neighbours of pixel (0, 0) (N, 4)."""
    device = torch.device("cpu")
    grids, limits, pitch, rows = [], [], [], []
    for s in segments:
        shape = (s.batch, s.h, s.w, 9)
        grid = tap_grid(s.h, s.w, s.stride, s.stride, 1, 1, dtype, device)  # (2, h, w, 9)
        grids.append(grid[:, None].expand(2, *shape).reshape(2, -1))
        limits.append(torch.tensor([[s.in_h], [s.in_w]], dtype=dtype).expand(2, s.taps))
        pitch.append(torch.full((s.taps,), s.in_w + PAD_BEFORE + PAD_AFTER, dtype=INDEX_DTYPE))
        rows.append(neighbour_rows(s.batch, s.in_h, s.in_w, s.row_start, dtype, device).expand(*shape, 4).reshape(-1, 4))
    return torch.cat(grids, 1), torch.cat(limits, 1), torch.cat(pitch), torch.cat(rows)


def bilinear_taps_many(offsets: list[Tensor], masks: list[Tensor], segments: list[Segment]) -> tuple[Tensor, Tensor]:
    """``bilinear_taps`` of several convs, concatenated: offsets[k] (B, 18, h, w) and masks[k] (B, 9, h, w)
    of segment k (any strides) -> index and weights, (N, 4) each, segment after segment."""
    n = sum(s.taps for s in segments)
    dtype = offsets[0].dtype
    grid, limits, pitch, rows = _constants(tuple(segments), dtype)
    pts = offsets[0].new_empty(2, n)
    mask_all = offsets[0].new_empty(n)
    start = 0
    for offset, mask, s in zip(offsets, masks, segments):
        stop = start + s.taps
        # (B, 18, h, w) -> (2, B, h, w, 9): y and x planes, taps last
        pts[:, start:stop].view(2, s.batch, s.h, s.w, 9).copy_(offset.view(s.batch, 9, 2, s.h, s.w).permute(2, 0, 3, 4, 1))
        mask_all[start:stop].view(s.batch, s.h, s.w, 9).copy_(mask.permute(0, 2, 3, 1))
        start = stop
    pts += grid
    # as in bilinear_taps: below -1 every neighbour is padding (NaN too), above the size likewise
    pts = torch.clamp(torch.where(pts >= -1.0, pts, -1.0), max=limits)
    floor = pts.floor()
    high = pts - floor  # (2, N): weight of the higher neighbour along y, x
    low = 1.0 - high
    hy, hx = low.unbind()
    ly, lx = high.unbind()
    hy, ly = hy * mask_all, ly * mask_all
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)  # (N, 4)
    corner = floor.to(INDEX_DTYPE)
    index = (corner[0] * pitch + corner[1]).unsqueeze(-1) + rows
    return index, weights
