"""What the DyHead blocks attend to, as pictures: scale-aware weights, deformable sampling points, feature
activity per block (``dyhead visualize --attention``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dyhead_cli.commands.visualize.drawing import (
    BACKGROUND,
    INK,
    INPUT_NAMES,
    MISSING,
    colour_bar,
    display,
    font,
    heat_colours,
    hstack,
    ink_on,
    text_size,
    titled,
    vstack,
)
from dyhead_cli.data.images import ImageEntry, ImageFiles
from dyhead_cli.data.loaders import collate_images
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.dyhead import BlockTrace

# ----------------------------------------------------------------------------------------------------
# the model's pass over one image


@dataclass
class Prepared:
    batch: Tensor  # (1, 3, Hp, Wp) 0..255
    size: tuple[int, int]  # (h, w) after the test resize
    orig: tuple[int, int]  # (h, w) of the image as loaded


def prepare(image_path: Path, recipe: Any) -> Prepared:
    """One image through the same resize and padding as ``dyhead predict``/``eval``."""
    d = recipe.data
    item = ImageFiles(
        [ImageEntry(1, Path(image_path), str(image_path))], d.test_min_size, d.max_size, resize_backend=d.resize_backend
    )[0]
    if "error" in item:
        raise DyheadError(item["error"])
    batch = collate_images([item], recipe.data.size_divisibility)
    return Prepared(batch["images"], batch["image_sizes"][0], batch["orig_sizes"][0])


@torch.no_grad()
def detect(model, prepared: Prepared, device: torch.device) -> dict[str, Tensor]:
    return model(prepared.batch.to(device), [prepared.size], original_sizes=[prepared.orig])[0]


@torch.no_grad()
def trace_dyhead(model, images: Tensor) -> tuple[list[BlockTrace], float]:
    """Run backbone + FPN + the DyHead tower with tracing on; return one ``BlockTrace`` per block and the
    largest relative difference between the traced (reference-conv) outputs and the model's own."""
    if not len(getattr(model.dyhead, "blocks", [])):
        raise DyheadError("the model has no DyHead blocks (model.dyhead.num_blocks = 0): there is no attention to show")
    feats = list(model.fpn(model.backbone(model.normalize(images))))
    traces: list[BlockTrace] = []
    traced = model.dyhead(feats, traces=traces)
    real = model.dyhead(feats)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(traced, real))
    return traces, worst


# ----------------------------------------------------------------------------------------------------
# attention pictures


def scale_attention_picture(traces: Sequence[BlockTrace], levels: Sequence[int], title: str) -> Image.Image:
    """Three heat tables (low / mid / high input): rows = blocks, columns = output levels (``levels``: their
    pyramid numbers, e.g. 3..7, or 2..6 for Faster R-CNN), pi_L in the cells."""
    num_levels = len(traces[0].scale)
    cell_w, cell_h, head_w = 62, 30, 70
    fnt, bold = font(14), font(15)
    tables = []
    explain = {
        "low": "low: level l-1 (finer), stride-2 DCN",
        "mid": "mid: level l itself, DCN",
        "high": "high: level l+1 (coarser), DCN + upsampling",
    }
    for name in INPUT_NAMES:
        width = head_w + cell_w * num_levels
        height = 2 * cell_h + cell_h * len(traces)
        table = Image.new("RGB", (width, height), BACKGROUND)
        d = ImageDraw.Draw(table)
        d.text((2, 4), explain[name], fill=INK, font=bold)
        for j in range(num_levels):
            label = f"P{levels[j]}"
            w, _ = text_size(d, label, fnt)
            d.text((head_w + j * cell_w + (cell_w - w) // 2, cell_h + 8), label, fill=INK, font=fnt)
        for b, trace in enumerate(traces):
            y = 2 * cell_h + b * cell_h
            d.text((4, y + 8), f"block {b + 1}", fill=INK, font=fnt)
            for j in range(num_levels):
                x = head_w + j * cell_w
                value = trace.scale[j].get(name)
                colour = MISSING if value is None else tuple(int(c) for c in heat_colours(np.array(value)))
                d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=colour)
                text = "-" if value is None else f"{value:.2f}"
                w, h = text_size(d, text, fnt)
                d.text((x + (cell_w - w) // 2, y + 7), text, fill=(120, 120, 120) if value is None else ink_on(colour), font=fnt)
        tables.append(table)
    body = hstack(tables, gap=24)
    bar = colour_bar(min(360, body.width), 14, "pi_L = 0", "1", font(13))
    legend = Image.new("RGB", (body.width, bar.height + 8), BACKGROUND)
    legend.paste(bar, (0, 4))
    picture = vstack([body, legend], gap=6)
    padded = Image.new("RGB", (picture.width + 20, picture.height + 10), BACKGROUND)
    padded.paste(picture, (10, 0))
    return titled(
        padded,
        title,
        size=17,
        lines=[
            "Scale-aware attention: pi_L(f) = hard_sigmoid(ReLU(conv1x1(avgpool(f)))) weighs each input map f of an "
            "output level before they are averaged. "
            f"'-' = that level has no such input (P{levels[0]} has no finer level, P{levels[-1]} no coarser one).",
        ],
    )


def feature_cell(point: tuple[float, float], prepared: Prepared, stride: int, shape: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the feature cell under ``point`` = (x, y) in original image pixels."""
    (h, w), (oh, ow) = prepared.size, prepared.orig
    x, y = point[0] * w / ow, point[1] * h / oh  # -> resized-image pixels
    valid_h, valid_w = min(shape[0], math.ceil(h / stride)), min(shape[1], math.ceil(w / stride))
    return int(min(max(y // stride, 0), valid_h - 1)), int(min(max(x // stride, 0), valid_w - 1))


def sampling_points(offset: Tensor, mask: Tensor, cell: tuple[int, int]) -> list[tuple[float, float, float, float, float]]:
    """The 9 taps of the 3x3 deformable conv (stride 1, padding 1) at ``cell``:
    [(regular row, regular col, sampled row, sampled col, mask)] in feature cells."""
    i, j = cell
    off = offset[0, :, i, j].float().view(9, 2)  # (18,) -> (9, (dy, dx))
    m = mask[0, :, i, j].float()
    taps = []
    for k in range(9):
        ky, kx = divmod(k, 3)
        r, c = i - 1 + ky, j - 1 + kx
        taps.append((r, c, r + float(off[k, 0]), c + float(off[k, 1]), float(m[k])))
    return taps


def spatial_attention_picture(
    image: Image.Image,
    traces: Sequence[BlockTrace],
    blocks: Sequence[int],
    level: int,
    stride: int,
    point: tuple[float, float],
    prepared: Prepared,
    size: int,
    title: str,
) -> Image.Image:
    """One panel per block: the image, the cell under ``point``, its regular 3x3 grid and the sampled points.

    Sampling points may lie outside the image (zero padding is sampled there): the panels get a dark
    margin wide enough to show those with mask >= 0.1 (at most a quarter of the display size).
    """
    (h, w), (oh, ow) = prepared.size, prepared.orig
    shown, scale = display(image, size)
    shown = Image.blend(shown, Image.new("RGB", shown.size, (0, 0, 0)), 0.35)
    unit = max(3.0, size / 90)
    cell_w, cell_h = stride * ow / w * scale, stride * oh / h * scale  # one feature cell in display pixels

    def to_display(row: float, col: float) -> tuple[float, float]:
        # feature cell (row, col) centre -> resized-image pixels -> original pixels -> display pixels
        return (col + 0.5) * cell_w, (row + 0.5) * cell_h

    taps_of = {}
    for b in blocks:
        offset, mask = traces[b].offsets[level], traces[b].masks[level]
        cell = feature_cell(point, prepared, stride, tuple(offset.shape[-2:]))
        taps_of[b] = (cell, sampling_points(offset, mask, cell))
    # room for the points that matter (mask >= 0.1); fainter ones far out may be cut at the border
    xy = [to_display(sr, sc) for _, taps in taps_of.values() for _, _, sr, sc, m in taps if m >= 0.1]
    over = max(
        [0.0] + [-x for x, _ in xy] + [-y for _, y in xy] + [x - shown.width for x, _ in xy] + [y - shown.height for _, y in xy]
    )
    margin = int(min(over + 3 * unit, size / 4)) if over > 0 else 0

    panels = []
    for b in blocks:
        (i, j), taps = taps_of[b]
        canvas = Image.new("RGB", (shown.width + 2 * margin, shown.height + 2 * margin), (45, 45, 45))
        canvas.paste(shown, (margin, margin))
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)

        def at(row: float, col: float) -> tuple[float, float]:
            x, y = to_display(row, col)
            return x + margin, y + margin

        x0, y0 = margin + j * cell_w, margin + i * cell_h
        d.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], outline=(255, 255, 255, 160), width=1)
        thin = max(1, round(unit / 3))
        for r, c, sr, sc, _ in taps:
            a, bb = at(r, c), at(sr, sc)
            d.line([a, bb], fill=(255, 255, 255, 150), width=thin)
            d.ellipse([a[0] - unit, a[1] - unit, a[0] + unit, a[1] + unit], outline=(255, 255, 255, 230), width=thin)
        for _, _, sr, sc, m in sorted(taps, key=lambda t: t[4]):
            x, y = at(sr, sc)
            radius = unit * (0.6 + 1.8 * m)
            d.ellipse(
                [x - radius, y - radius, x + radius, y + radius],
                fill=(255, 140, 0, int(70 + 185 * m)),
                outline=(255, 220, 120, 255),
            )
        px, py = margin + point[0] * scale, margin + point[1] * scale
        arm, thick = unit * 2.2, max(2, round(unit / 2))
        d.line([(px - arm, py), (px + arm, py)], fill=(0, 230, 255, 255), width=thick)
        d.line([(px, py - arm), (px, py + arm)], fill=(0, 230, 255, 255), width=thick)
        panel = Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB")
        masks = [t[4] for t in taps]
        shift = sum(math.hypot(sr - r, sc - c) for r, c, sr, sc, _ in taps) / len(taps)
        panels.append(
            titled(
                panel,
                f"block {b + 1}",
                size=max(13, size // 28),
                lines=[f"mask {min(masks):.2f}..{max(masks):.2f}, mean shift {shift:.2f} cells"],
            )
        )
    body = hstack(panels)
    name = level_name(stride)
    return titled(
        body,
        title,
        size=16,
        lines=[
            f"Spatial-aware attention at {name} (stride {stride}), the feature cell (square) under the cyan cross "
            f"({point[0]:.0f}, {point[1]:.0f}): white rings = the regular 3x3 grid of the deformable conv, "
            "orange dots = where it samples (grid + learned offsets), dot size and opacity = the modulation mask (0..1)"
            + ("; grey border = outside the image." if margin else "."),
        ],
    )


def level_name(stride: int) -> str:
    """The pyramid level of a stride: 8 -> "P3" (stride 2**l is level l)."""
    return f"P{stride.bit_length() - 1}"


def activity_map(feature: Tensor, valid: tuple[int, int]) -> np.ndarray:
    """mean |activation| over channels, (H, W), cropped to the image's (not the padding's) cells."""
    return feature[0].float().abs().mean(dim=0)[: valid[0], : valid[1]].cpu().numpy()


def feature_activity_picture(
    image: Image.Image, traces: Sequence[BlockTrace], level: int, stride: int, prepared: Prepared, size: int, title: str
) -> Image.Image:
    """Rows = blocks; columns = input | after spatial + scale | after task attention; each map scaled to its max."""
    (h, w) = prepared.size
    valid = (math.ceil(h / stride), math.ceil(w / stride))
    cell_size = max(96, size // 2)
    grey, _ = display(image.convert("L").convert("RGB"), cell_size)
    columns = ("input", "after spatial + scale", "after task (DyReLU)")
    fnt = font(max(12, cell_size // 18))
    rows = []
    for b, trace in enumerate(traces):
        maps = [activity_map(t[level], valid) for t in (trace.inputs, trace.fused, trace.outputs)]
        cells = []
        for name, m in zip(columns, maps):
            heat = Image.fromarray(heat_colours(m / (float(m.max()) or 1.0))).resize(grey.size, Image.NEAREST)
            cell = Image.blend(heat, grey, 0.25)
            header = name if b == 0 else ""
            cells.append(titled(cell, header, size=max(12, cell_size // 16), lines=[f"mean |x| = {m.mean():.3f}"]))
        row = hstack(cells)
        label = Image.new("RGB", (70, row.height), BACKGROUND)
        d = ImageDraw.Draw(label)
        d.text((4, row.height // 2 - 8), f"block {b + 1}", fill=INK, font=fnt)
        rows.append(hstack([label, row], gap=0))
    body = vstack(rows)
    bar = colour_bar(min(320, body.width - 80), 12, "0", "the map's max", font(12))
    legend = Image.new("RGB", (body.width, bar.height + 6), BACKGROUND)
    legend.paste(bar, (70, 2))
    name = level_name(stride)
    return titled(
        vstack([body, legend], gap=4),
        title,
        size=16,
        lines=[
            f"Feature-map activity at {name} (stride {stride}): mean |activation| over channels, each map on its own "
            "colour scale (0 .. its max; the overall level is the mean |x| above it), over a faint copy of the image.",
        ],
    )
