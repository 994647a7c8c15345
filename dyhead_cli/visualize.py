"""``dyhead visualize``: boxes on images, and pictures of what the DyHead blocks attend to.

Boxes: predictions (run from ``--weights`` or read from a ``--preds`` results file) and/or ground truth
(``--ann``), side by side when both are given, with class names and scores on filled label boxes in a
fixed palette (one colour per category).

Attention (``--attention --weights W``), in the spirit of Figure 1 of the DyHead paper, three PNGs:
- ``<image>_scale_attention.png``: the scale-aware weights pi_L for every block (rows) and output level
  (columns P3..P7), one heat table per input map (low = the finer level l-1, mid = level l itself,
  high = the coarser level l+1), the number in each cell;
- ``<image>_spatial_attention.png``: the 9 sampling points of the spatial-aware (deformable) 3x3 conv at
  one feature cell (``--point x,y`` in image pixels, default the top detection's centre), per block, on
  one level: rings = the regular 3x3 grid, dots = where it samples, dot size and opacity = the mask;
- ``<image>_feature_activity.png``: mean |activation| over channels for one level, per block: the block's
  input, after spatial + scale fusion, after task attention (DyReLU).
The intermediates are recomputed with each block's own submodules (``offset_and_mask``, ``spatial_*``,
``scale_weight``, ``task_attn``) and checked against the block's forward output.

Everything is drawn with PIL, fonts from ``ImageFont.load_default``.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from dyhead_cli.data.coco import load_rgb, read_annotation_file
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.dyhead import BlockTrace
from dyhead_cli.predict import (
    ImageEntry,
    ImageFiles,
    LoadedDetector,
    category_ids,
    choose_device,
    collate_images,
    collect_images,
    images_from_annotations,
    images_json_path,
    load_detector,
)

# Tableau 20, strong colours first: distinct on photos and on the synthetic shapes.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]
# viridis, sampled at 0, 1/8, ..., 1 (linear in between)
VIRIDIS = np.array(
    [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
     (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float32,
)
LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
INPUT_NAMES = ("low", "mid", "high")
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MISSING = (225, 225, 225)


# ----------------------------------------------------------------------------------------------------
# drawing primitives


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def ink_on(colour: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``colour``."""
    r, g, b = colour[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def label_box(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, fnt, above: bool = True,
    taken: list[tuple[float, float, float, float]] | None = None,
) -> None:
    """``text`` on a filled box whose lower-left (``above``) or upper-left corner is ``xy``.

    ``taken``: label rectangles already drawn; this one moves down past them (a few steps at most).
    """
    w, h = text_size(draw, text, fnt)
    pad = max(2, h // 4)
    x, y = xy
    x = max(0.0, min(x, draw.im.size[0] - w - 2 * pad))
    top = y - h - 2 * pad if above else y
    rect = (x, top, x + w + 2 * pad, top + h + 2 * pad)
    for _ in range(4):
        hit = [r for r in taken or [] if rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3]]
        if not hit:
            break
        shift = max(r[3] for r in hit) - rect[1] + 1
        rect = (rect[0], rect[1] + shift, rect[2], rect[3] + shift)
    if taken is not None:
        taken.append(rect)
    draw.rectangle(rect, fill=tuple(colour))
    left, t, _, _ = draw.textbbox((0, 0), text, font=fnt)
    draw.text((rect[0] + pad - left, rect[1] + pad - t), text, fill=ink_on(colour), font=fnt)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 (any shape) -> uint8 RGB (..., 3) on the viridis ramp."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(VIRIDIS) - 2)
    t = (v - lo)[..., None]
    return (VIRIDIS[lo] * (1 - t) + VIRIDIS[lo + 1] * t).round().astype(np.uint8)


def colour_bar(width: int, height: int, left: str, right: str, fnt) -> Image.Image:
    bar = Image.fromarray(np.repeat(heat_colours(np.linspace(0, 1, width))[None], height, axis=0))
    canvas = Image.new("RGB", (width, height + fnt.size + 6), BACKGROUND)
    canvas.paste(bar, (0, 0))
    d = ImageDraw.Draw(canvas)
    d.text((0, height + 3), left, fill=INK, font=fnt)
    w, _ = text_size(d, right, fnt)
    d.text((width - w, height + 3), right, fill=INK, font=fnt)
    return canvas


def titled(image: Image.Image, title: str, size: int | None = None, lines: Sequence[str] = ()) -> Image.Image:
    """``image`` under a title bar (and optional smaller lines below the title)."""
    size = size or max(12, image.width // 40)
    big, small = font(size), font(max(10, int(size * 0.8)))
    probe = ImageDraw.Draw(image)
    wrapped = wrap(probe, title, big, image.width - 12)
    small_lines = [w for line in lines for w in wrap(probe, line, small, image.width - 12)]
    height = 8 + len(wrapped) * (size + 4) + len(small_lines) * (small.size + 3) + 4
    canvas = Image.new("RGB", (image.width, image.height + height), BACKGROUND)
    d = ImageDraw.Draw(canvas)
    y = 6
    for line in wrapped:
        d.text((6, y), line, fill=INK, font=big)
        y += size + 4
    for line in small_lines:
        d.text((6, y), line, fill=(70, 70, 70), font=small)
        y += small.size + 3
    canvas.paste(image, (0, height))
    return canvas


def wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and text_size(draw, candidate, fnt)[0] > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def vstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    canvas = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)), BACKGROUND)
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def display(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    """``image`` resized so its longer side is ``size`` pixels; returns (image, scale)."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, Image.LANCZOS if scale < 1 else Image.BICUBIC), scale


# ----------------------------------------------------------------------------------------------------
# boxes


@dataclass
class Box:
    xyxy: tuple[float, float, float, float]  # original image pixels
    category_id: int
    score: float | None = None  # None = ground truth


@dataclass
class Categories:
    """category id -> name and a palette colour (by position among the sorted ids)."""

    names: dict[int, str]

    def colour(self, category_id: int) -> tuple[int, int, int]:
        order = sorted(self.names)
        index = order.index(category_id) if category_id in self.names else len(order) + hash(category_id) % 7
        return PALETTE[index % len(PALETTE)]

    def name(self, category_id: int) -> str:
        return self.names.get(category_id, str(category_id))


def draw_boxes(image: Image.Image, boxes: Sequence[Box], cats: Categories, size: int) -> Image.Image:
    """The image at display ``size`` with its boxes; label text 'name' or 'name 0.87'. Best scores on top."""
    canvas, scale = display(image, size)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(size / 256))
    fnt = font(max(11, round(size / 36)))
    order = sorted(boxes, key=lambda b: -1.0 if b.score is None else b.score)
    for b in order:
        x1, y1, x2, y2 = (v * scale for v in b.xyxy)
        colour = cats.colour(b.category_id)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
    taken: list[tuple[float, float, float, float]] = []
    for b in reversed(order):  # labels after all boxes (no box line crosses a label), best first (best placed)
        x1, y1, _, _ = (v * scale for v in b.xyxy)
        text = cats.name(b.category_id) + ("" if b.score is None else f" {b.score:.2f}")
        _, h = text_size(draw, text, fnt)
        above = y1 - h - 6 >= 0
        label_box(draw, (x1, y1 if above else y1 + line), text, cats.colour(b.category_id), fnt, above=above, taken=taken)
    return canvas


def boxes_from_coco(rows: Sequence[dict[str, Any]], score_thr: float | None = None) -> list[Box]:
    out = []
    for r in rows:
        score = r.get("score")
        if score is not None and score_thr is not None and score < score_thr:
            continue
        x, y, w, h = r["bbox"]
        out.append(Box((x, y, x + w, y + h), r["category_id"], None if score is None else float(score)))
    return out


# ----------------------------------------------------------------------------------------------------
# which images, which ids


@dataclass
class ImageIndex:
    """Find an image's id in a COCO image list, by path (resolved) or, failing that, by a unique file name."""

    by_path: dict[Path, int] = field(default_factory=dict)
    by_name: dict[str, int | None] = field(default_factory=dict)  # None: the name is ambiguous
    paths: dict[int, Path] = field(default_factory=dict)

    @classmethod
    def from_images(cls, images: Sequence[dict[str, Any]], root: Path) -> "ImageIndex":
        index = cls()
        for im in images:
            path = Path(os.path.abspath(Path(root) / im["file_name"]))
            index.by_path[path.resolve()] = im["id"]
            index.paths[im["id"]] = path
            name = Path(im["file_name"]).name
            index.by_name[name] = None if name in index.by_name else im["id"]
        return index

    def find(self, path: Path) -> int | None:
        found = self.by_path.get(Path(path).resolve())
        return found if found is not None else self.by_name.get(Path(path).name)


def output_name(path: Path, root: Path | None) -> str:
    """A flat PNG name for an image: its path under ``root`` with '/' -> '__'."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(root) if root is not None else Path(path.name)
    except ValueError:
        rel = Path(Path(path).name)
    return "__".join(rel.with_suffix("").parts) + ".png"


# ----------------------------------------------------------------------------------------------------
# the model's pass over one image


@dataclass
class Prepared:
    batch: Tensor  # (1, 3, Hp, Wp) 0..255
    size: tuple[int, int]  # (h, w) after the test resize
    orig: tuple[int, int]  # (h, w) of the image as loaded


def prepare(image_path: Path, recipe: Any) -> Prepared:
    """One image through the same resize and padding as ``dyhead predict``/``eval``."""
    item = ImageFiles([ImageEntry(1, Path(image_path), str(image_path))], recipe.data.test_min_size, recipe.data.max_size)[0]
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


def scale_attention_picture(traces: Sequence[BlockTrace], title: str) -> Image.Image:
    """Three heat tables (low / mid / high input): rows = blocks, columns = output levels, pi_L in the cells."""
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
            label = LEVEL_NAMES[j] if j < len(LEVEL_NAMES) else f"L{j}"
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
            "output level before they are averaged. '-' = that level has no such input (P3 has no finer level, P7 no coarser one).",
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
    over = max([0.0] + [-x for x, _ in xy] + [-y for _, y in xy] + [x - shown.width for x, _ in xy] + [y - shown.height for _, y in xy])
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
            d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 140, 0, int(70 + 185 * m)), outline=(255, 220, 120, 255))
        px, py = margin + point[0] * scale, margin + point[1] * scale
        arm, thick = unit * 2.2, max(2, round(unit / 2))
        d.line([(px - arm, py), (px + arm, py)], fill=(0, 230, 255, 255), width=thick)
        d.line([(px, py - arm), (px, py + arm)], fill=(0, 230, 255, 255), width=thick)
        panel = Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB")
        masks = [t[4] for t in taps]
        shift = sum(math.hypot(sr - r, sc - c) for r, c, sr, sc, _ in taps) / len(taps)
        panels.append(
            titled(panel, f"block {b + 1}", size=max(13, size // 28),
                   lines=[f"mask {min(masks):.2f}..{max(masks):.2f}, mean shift {shift:.2f} cells"])
        )
    body = hstack(panels)
    name = LEVEL_NAMES[level] if level < len(LEVEL_NAMES) else f"L{level}"
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
    name = LEVEL_NAMES[level] if level < len(LEVEL_NAMES) else f"L{level}"
    return titled(
        vstack([body, legend], gap=4),
        title,
        size=16,
        lines=[
            f"Feature-map activity at {name} (stride {stride}): mean |activation| over channels, each map on its own "
            "colour scale (0 .. its max; the overall level is the mean |x| above it), over a faint copy of the image.",
        ],
    )


# ----------------------------------------------------------------------------------------------------
# command


def parse_point(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise DyheadError(f"--point must look like x,y (image pixels), got {text!r}") from None
    return x, y


def parse_level(text: str, num_levels: int) -> int:
    """'P3'..'P7' (or 3..7) -> 0..4."""
    t = str(text).strip().upper().removeprefix("P")
    names = [f"P{3 + i}" for i in range(num_levels)]
    if not t.isdigit() or not 0 <= int(t) - 3 < num_levels:
        raise DyheadError(f"--level must be one of {', '.join(names)}, got {text!r}")
    return int(t) - 3


def load_json(path: Path, what: str) -> Any:
    if not Path(path).is_file():
        raise DyheadError(f"{what} not found: {path}")
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyheadError(f"{what} {path} is not valid JSON: {e}") from None


def save_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


@dataclass
class VisualizeSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    max_trace_error: float = 0.0


@dataclass
class BoxSources:
    """Where the boxes of an image come from: the annotation file, a results file, or the model itself."""

    cats: Categories
    gt_index: ImageIndex | None = None  # the annotation file's images
    gt_rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    preds_index: ImageIndex | None = None  # the images the results' ids refer to
    preds_rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    detector: LoadedDetector | None = None
    label_cats: list[dict[str, Any]] = field(default_factory=list)  # model label -> {"id", "name"}
    device: torch.device = torch.device("cpu")

    @property
    def has_predictions(self) -> bool:
        return self.detector is not None or self.preds_index is not None

    def ground_truth(self, path: Path) -> list[Box] | None:
        """The image's non-crowd annotations; None when the annotation file does not list it."""
        image_id = self.gt_index.find(path)
        if image_id is None:
            return None
        return boxes_from_coco([dict(a, score=None) for a in self.gt_rows.get(image_id, []) if not a.get("iscrowd", 0)])

    def predictions(self, path: Path, score_thr: float) -> list[Box] | None:
        """The model's boxes scoring >= ``score_thr``; None when a results file has nothing for the image."""
        if self.detector is not None:
            found = detect(self.detector.model, prepare(Path(path), self.detector.recipe), self.device)
            rows = [
                {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": self.label_cats[int(label)]["id"], "score": float(score)}
                for (x1, y1, x2, y2), score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())
            ]
            return boxes_from_coco(rows, score_thr)
        image_id = self.preds_index.find(path)
        return None if image_id is None else boxes_from_coco(self.preds_rows.get(image_id, []), score_thr)


def group_by_image(rows: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["image_id"], []).append(r)
    return grouped


def visualize(
    images: Sequence[Path],
    out: Path,
    weights: Path | None = None,
    recipe_path: Path | None = None,
    overrides: Sequence[str] = (),
    preds: Path | None = None,
    ann: Path | None = None,
    images_dir: Path | None = None,
    score_thr: float = 0.3,
    size: int = 512,
    limit: int = 0,
    device: str = "auto",
    attention: bool = False,
    point: str | None = None,
    level: str = "P3",
    block: int | None = None,
    console=None,
) -> VisualizeSummary:
    """Write the pictures (see the module docstring) into ``out``; return what was written.

    Images: ``images`` (files/folders) if given, else the annotation file's, else the results' image list.
    Ids of a results file are looked up in the annotation file when given (predicted from it), else in
    the ``<stem>.images.json`` that ``dyhead predict`` wrote next to it.
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    if size < 64:
        raise DyheadError(f"--size must be at least 64 pixels, got {size}")
    if attention:
        if weights is None:
            raise DyheadError("--attention needs --weights (the model whose attention to draw)")
        if preds is not None or ann is not None:
            raise DyheadError("--attention draws the model's attention: drop --preds/--ann (draw boxes in a separate run)")
    elif weights is None and preds is None and ann is None:
        raise DyheadError("nothing to draw: give --weights or --preds (predictions), --ann (ground truth), or --attention")
    if weights is not None and preds is not None:
        raise DyheadError("give either --weights (run the model) or --preds (read its results), not both")
    if ann is None and images_dir is not None:
        raise DyheadError("--images is only used with --ann")

    sources = BoxSources(Categories({}), device=choose_device(device))
    names = sources.cats.names
    det = load_detector(weights, recipe_path, overrides) if weights is not None else None
    roots: list[Path] = []
    if ann is not None:
        data = read_annotation_file(ann)
        listed = images_from_annotations(Path(ann), images_dir, det.recipe if det else None, data=data)
        sources.gt_index = ImageIndex.from_images(data["images"], listed.root)
        sources.gt_rows = group_by_image(data["annotations"])
        names.update({c["id"]: c["name"] for c in listed.ann_categories or []})
        roots.append(listed.root)
    if det is not None:
        sources.detector = det
        det.model.to(sources.device)
        sources.label_cats = category_ids(det, listed.ann_categories if ann is not None else None)
        names.update({c["id"]: c["name"] for c in sources.label_cats})
    if preds is not None:
        rows = load_json(Path(preds), "predictions file")
        if not isinstance(rows, list):
            raise DyheadError(f"{preds} is not a COCO results list")
        sources.preds_rows = group_by_image(rows)
        if sources.gt_index is not None:
            sources.preds_index = sources.gt_index
        else:
            listing_path = images_json_path(Path(preds))
            listing = load_json(listing_path, "image list (written by 'dyhead predict' next to the results)")
            root = Path(os.path.abspath(listing.get("root") or listing_path.parent))
            sources.preds_index = ImageIndex.from_images(listing["images"], root)
            names.update({c["id"]: str(c.get("name", c["id"])) for c in listing.get("categories", [])})
            roots.append(root)

    if images:
        listed_images = collect_images(list(images))
        todo, root = [e.path for e in listed_images.entries], listed_images.root
    elif sources.gt_index is not None or sources.preds_index is not None:
        index = sources.gt_index or sources.preds_index
        todo, root = [index.paths[i] for i in sorted(index.paths)], roots[0]
    else:
        raise DyheadError("give the images to draw on (or --ann / --preds, whose image lists are used)")
    if limit > 0:
        todo = todo[:limit]
    if attention and len(todo) != 1:
        raise DyheadError(f"--attention draws one image; got {len(todo)}")

    summary = VisualizeSummary()
    out = Path(out)
    title_size = max(13, size // 30)
    for path in todo:
        try:
            image = load_rgb(path)
        except DyheadError as e:
            console.print(f"[yellow]skipped[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            summary.skipped.append(str(path))
            continue
        stem = output_name(path, root)
        if attention:
            summary.written.extend(attention_pictures(det, image, Path(path), out, stem[:-4], sources.device, point, level, block, size, summary))
            continue
        panels = []
        if sources.gt_index is not None:
            gt = sources.ground_truth(path)
            if gt is None:
                console.print(f"[yellow]note[/] {escape(str(path))} is not in {escape(str(ann))}: no ground truth drawn", highlight=False)
            panels.append(titled(draw_boxes(image, gt or [], sources.cats, size), f"ground truth ({len(gt or [])})", size=title_size))
        if sources.has_predictions:
            found = sources.predictions(path, score_thr)
            if found is None:
                console.print(f"[yellow]note[/] {escape(str(path))} is not in the predictions' image list", highlight=False)
            title = f"predictions ({len(found or [])}, score >= {score_thr:g})"
            panels.append(titled(draw_boxes(image, found or [], sources.cats, size), title, size=title_size))
        summary.written.append(save_png(hstack(panels, gap=12), out / stem))
    return summary


def attention_pictures(
    det, image: Image.Image, path: Path, out: Path, stem: str, dev: torch.device, point_text: str | None, level_text: str,
    block: int | None, size: int, summary: VisualizeSummary,
) -> list[Path]:
    """The three attention PNGs for one image."""
    prepared = prepare(path, det.recipe)
    traces, error = trace_dyhead(det.model, prepared.batch.to(dev))
    summary.max_trace_error = max(summary.max_trace_error, error)
    if error > 1e-3:
        raise DyheadError(f"internal: the recomputed DyHead block differs from its forward by {error:.2e} (relative)")
    num_levels = len(traces[0].inputs)
    level = parse_level(level_text, num_levels)
    strides = tuple(getattr(det.model.fpn, "strides", (8, 16, 32, 64, 128)))
    stride = strides[level]
    if block is not None and not 1 <= block <= len(traces):
        raise DyheadError(f"--block must be within 1..{len(traces)} (the model has {len(traces)} DyHead blocks), got {block}")
    blocks = list(range(len(traces))) if block is None else [block - 1]
    point = parse_point(point_text)
    point_note = "given point"
    if point is None:
        found = detect(det.model, prepared, dev)
        if len(found["scores"]):
            x1, y1, x2, y2 = found["boxes"][int(found["scores"].argmax())].tolist()
            point, point_note = ((x1 + x2) / 2, (y1 + y2) / 2), "centre of the top-scoring detection"
        else:
            point, point_note = (image.width / 2, image.height / 2), "image centre (no detection)"
    if not (0 <= point[0] <= image.width and 0 <= point[1] <= image.height):
        raise DyheadError(f"--point {point[0]:g},{point[1]:g} lies outside the {image.width}x{image.height} image")
    name = path.name
    written = [
        save_png(scale_attention_picture(traces, f"{name}: scale-aware attention per block and level"), out / f"{stem}_scale_attention.png"),
        save_png(
            spatial_attention_picture(
                image, traces, blocks, level, stride, point, prepared, size if len(blocks) == 1 else max(256, size // 2),
                f"{name}: spatial-aware attention ({point_note})",
            ),
            out / f"{stem}_spatial_attention.png",
        ),
        save_png(
            feature_activity_picture(image, traces, level, stride, prepared, size, f"{name}: what each attention stage does"),
            out / f"{stem}_feature_activity.png",
        ),
    ]
    return written


def visualize_from_cli(**kwargs: Any) -> VisualizeSummary:
    """``dyhead visualize ...``: write the PNGs and print where they went."""
    from rich.console import Console

    summary = visualize(console=Console(stderr=True), **kwargs)
    console = Console()
    for path in summary.written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    skipped = f" ({len(summary.skipped)} unreadable images skipped)" if summary.skipped else ""
    console.print(f"{len(summary.written)} pictures in {kwargs.get('out')}{skipped}", highlight=False)
    return summary
