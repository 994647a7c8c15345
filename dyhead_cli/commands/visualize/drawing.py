"""Drawing with PIL: label boxes, heat colours, stacked panels, boxes from COCO rows (``dyhead visualize``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dyhead_cli.engine.detections import PALETTE

# viridis, sampled at 0, 1/8, ..., 1 (linear in between)
VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float32,
)
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
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    colour,
    fnt,
    above: bool = True,
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
    canvas = Image.new(
        "RGB", (max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)), BACKGROUND
    )
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
