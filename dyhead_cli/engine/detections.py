"""What a detector found in one image, as the Python API returns it: boxes, scores, classes, and two
ways out (a drawing, COCO result rows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dyhead_cli.engine.inference import detections_to_coco

# Tableau 20, strong colours first (also dyhead visualize's): distinct on photos and on the synthetic shapes.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
]


@dataclass
class Detections:
    """The detections of one image, best first.

    ``boxes`` (N, 4) float32 x1, y1, x2, y2 in the original image's pixels; ``scores`` (N,) float32;
    ``labels`` (N,) int64 model classes 0..K-1. ``class_names`` and ``category_of_label`` cover all K
    classes; ``names`` and ``category_ids`` are per detection.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    category_of_label: list[int]  # the data set's category id of each model class
    image_size: tuple[int, int]  # (h, w) of the original image
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB, kept to draw on
    path: Path | None = None  # the file the image came from, when it came from one
    frame: int | None = None  # the frame of the video at ``path``, when it came from one

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[int(k)] for k in self.labels]

    @property
    def category_ids(self) -> torch.Tensor:
        """(N,) int64: the data set's category id of each detection (what COCO results use)."""
        return torch.tensor([self.category_of_label[int(k)] for k in self.labels], dtype=torch.int64)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result rows: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h), ``score``, as ``dyhead predict``."""
        found = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return detections_to_coco(found, int(image_id), self.category_of_label)

    def plot(self, min_score: float = 0.3, line_width: int | None = None) -> Image.Image:
        """A copy of the image with the detections scoring at least ``min_score`` drawn on it."""
        if self.image is not None:
            canvas = Image.fromarray(self.image)
        elif self.path is not None and self.frame is not None:
            from dyhead_cli.data.video import FrameReader

            reader = FrameReader()
            try:
                canvas = Image.fromarray(reader.read(self.path, self.frame))
            finally:
                reader.close()
        elif self.path is not None:
            from dyhead_cli.data.images import load_rgb

            canvas = load_rgb(self.path)
        else:
            raise ValueError("this result keeps no image to draw on")
        return draw_detections(canvas.copy(), self, min_score, line_width)


def draw_detections(canvas: Image.Image, found: Detections, min_score: float = 0.3, line_width: int | None = None) -> Image.Image:
    """Draw boxes and "name score" labels on ``canvas`` (changed in place and returned)."""
    draw = ImageDraw.Draw(canvas)
    width = line_width or max(1, round(max(canvas.size) / 300))
    font_size = max(10, round(max(canvas.size) / 60))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    order = torch.argsort(found.scores).tolist()  # best drawn last, on top
    for i in order:
        score = float(found.scores[i])
        if score < min_score:
            continue
        label = int(found.labels[i])
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in found.boxes[i])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{found.class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle((x1, ty, x1 + right - left + 4, ty + bottom - top + 2), fill=colour)
        draw.text((x1 + 2, ty - (top - y1)), text, fill=(255, 255, 255), font=font)
    return canvas
