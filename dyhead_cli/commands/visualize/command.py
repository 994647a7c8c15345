"""``dyhead visualize``: boxes on images, and pictures of what the DyHead blocks attend to.

Boxes: predictions (run from ``--weights`` or read from a ``--preds`` results file) and/or ground truth
(``--ann``), side by side when both are given, with class names and scores on filled label boxes in a
fixed palette (one colour per category).

Attention (``--attention --weights W``), in the spirit of Figure 1 of the DyHead paper, three PNGs:
- ``<image>_scale_attention.png``: the scale-aware weights pi_L for every block (rows) and output level
  (columns P3..P7, or P2..P6 for Faster R-CNN), one heat table per input map (low = the finer level l-1, mid = level l itself,
  high = the coarser level l+1), the number in each cell;
- ``<image>_spatial_attention.png``: the 9 sampling points of the spatial-aware (deformable) 3x3 conv at
  one feature cell (``--point x,y`` in image pixels, default the top detection's centre), per block, on
  one level: rings = the regular 3x3 grid, dots = where it samples, dot size and opacity = the mask;
- ``<image>_feature_activity.png``: mean |activation| over channels for one level, per block: the block's
  input, after spatial + scale fusion, after task attention (DyReLU).
The intermediates come from the tower's own trace hook (``DyHead.forward(features, traces=[])``) and are
checked against its untraced output.

Everything is drawn with PIL, fonts from ``ImageFont.load_default``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dyhead_cli.commands.console import err_console, note, say
from dyhead_cli.commands.visualize.attention import (
    detect,
    feature_activity_picture,
    prepare,
    scale_attention_picture,
    spatial_attention_picture,
    trace_dyhead,
)
from dyhead_cli.commands.visualize.drawing import (
    Box,
    Categories,
    boxes_from_coco,
    draw_boxes,
    hstack,
    titled,
)
from dyhead_cli.data.annotations import check_results, read_annotation_file
from dyhead_cli.data.images import collect_images, images_from_annotations, load_rgb
from dyhead_cli.data.video import FrameReader, split_frame_name
from dyhead_cli.engine.inference import LoadedDetector, category_ids, choose_device, load_detector
from dyhead_cli.engine.paths import check_output_dir, check_output_file, temporary_name, writing
from dyhead_cli.engine.results import images_json_path
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import MAX_IMAGE_SIDE

# ----------------------------------------------------------------------------------------------------
# which images, which ids


@dataclass
class ImageIndex:
    """Find an image's id in a COCO image list, by path (resolved) or, failing that, by a unique file name
    whose listed file is not there (a moved or copied data set; where it is there, another image of that
    name, train/000001.jpg for val/000001.jpg, would get its boxes)."""

    by_path: dict[Path, int] = field(default_factory=dict)
    by_name: dict[str, int | None] = field(default_factory=dict)  # None: the name is ambiguous
    paths: dict[int, Path] = field(default_factory=dict)

    @classmethod
    def from_images(cls, images: Sequence[dict[str, Any]], root: Path) -> ImageIndex:
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
        if found is not None:
            return found
        found = self.by_name.get(Path(path).name)
        if found is not None and self.paths[found].exists():
            return None  # the listed file exists and is another one
        return found


def output_name(path: Path, root: Path | None) -> str:
    """A flat PNG name for an image: its path under ``root`` with '/' -> '__'; a video's frame
    (``clip.mp4#frame=000012``) gives ``clip__frame000012.png``."""
    frame = split_frame_name(str(path))
    if frame is not None:
        return output_name(Path(frame[0]), root)[:-4] + f"__frame{frame[1]:06d}.png"
    try:
        rel = Path(os.path.abspath(path)).relative_to(root) if root is not None else Path(path.name)
    except ValueError:
        rel = Path(Path(path).name)
    return "__".join(rel.with_suffix("").parts) + ".png"


def load_picture(path: Path, frames: FrameReader) -> Image.Image:
    """An image file, or a video's frame named as ``dyhead predict`` lists it (``clip.mp4#frame=000012``)."""
    frame = split_frame_name(str(path))
    if frame is None:
        return load_rgb(path)
    video = Path(frame[0])
    if not video.is_file():
        raise DyheadError(f"video file not found: {video}")
    return Image.fromarray(frames.read(video, frame[1]))


def output_names(paths: Sequence[Path], root: Path | None) -> list[str]:
    """``output_name`` of each image, made unique: two images never write one picture.

    Where names clash (``a.jpg`` and ``a.png``; ``x/y.jpg`` and ``x__y.jpg``) the source's extension is kept
    (``a.jpg.png``), then a counter is added (``a.jpg-2.png``). Compared case-insensitively, since some
    file systems are.
    """
    plain = [output_name(Path(p), root) for p in paths]
    clashes = {n.lower() for n in plain if sum(m.lower() == n.lower() for m in plain) > 1}
    names: list[str] = []
    taken: set[str] = set()
    for p, name in zip(paths, plain):
        if name.lower() in clashes:
            frame = split_frame_name(str(p))
            source = frame[0] if frame is not None else p  # a video's frame: the video's extension
            name = name[:-4] + Path(source).suffix.lower() + ".png"
        base, n = name[:-4], 2
        while name.lower() in taken:
            name, n = f"{base}-{n}.png", n + 1
        taken.add(name.lower())
        names.append(name)
    return names


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


def parse_level(text: str, levels: Sequence[int]) -> int:
    """'P3' (or 3) -> its index in the model's pyramid ``levels`` (3..7 for the one-stage heads, 2..6 for
    Faster R-CNN)."""
    t = str(text).strip().upper().removeprefix("P")
    if not t.isdigit() or int(t) not in levels:
        raise DyheadError(f"--level must be one of {', '.join(f'P{n}' for n in levels)} for this model, got {text!r}")
    return list(levels).index(int(t))


def load_json(path: Path, what: str) -> Any:
    if not Path(path).is_file():
        raise DyheadError(f"{what} not found: {path}")
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyheadError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise DyheadError(f"{what} {path} is nested too deeply") from None


ATTENTION_PICTURES = ("_scale_attention.png", "_spatial_attention.png", "_feature_activity.png")


def check_pictures(out: Path, stems: Sequence[str], attention: bool, inputs: Sequence[tuple[str, Path | None]]) -> None:
    """Before any drawing: no picture may replace an input (an image drawn into its own folder) or a folder."""
    for stem in stems:
        names = [stem[:-4] + suffix for suffix in ATTENTION_PICTURES] if attention else [stem]
        for name in names:
            check_output_file(out / name, "--out", inputs, suffixes=(".png",))


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (a temporary name, then a rename); a failure names ``path``."""
    tmp = temporary_name(path)
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
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
                for (x1, y1, x2, y2), score, label in zip(
                    found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()
                )
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
    recipe: Path | None = None,
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
    Ids of a results file are looked up in the ``<stem>.images.json`` that ``dyhead predict`` wrote next to it
    (also with ``ann``: ids of a folder's images are not the annotation file's), else in the annotation file
    (results of another tool, predicted from it).
    """
    console = console or err_console
    if not 64 <= size <= MAX_IMAGE_SIDE:
        raise DyheadError(f"--size must be within 64..{MAX_IMAGE_SIDE} pixels (larger pictures exhaust memory), got {size}")
    if limit < 0:
        raise DyheadError(f"--limit must be >= 0 (0 = all images), got {limit}")
    if not 0.0 <= score_thr <= 1.0:
        raise DyheadError(f"--score-thr must be within 0..1, got {score_thr}")
    inputs = [
        ("checkpoint --weights", weights),
        ("--recipe", recipe),
        ("--preds file", preds),
        ("--ann file", ann),
        ("--images folder", images_dir),
    ] + [("input", p) for p in images]
    out = check_output_dir(out, "--out", inputs)
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
    det = load_detector(weights, recipe, overrides) if weights is not None else None
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
        rows = check_results(load_json(Path(preds), "predictions file"), Path(preds))
        sources.preds_rows = group_by_image(rows)
        listing_path = images_json_path(Path(preds))
        if listing_path.is_file():  # what the results' ids mean, as 'dyhead predict' wrote it: also with --ann
            listing = read_annotation_file(listing_path)
            root = Path(os.path.abspath(str(listing.get("root") or listing_path.parent)))
            sources.preds_index = ImageIndex.from_images(listing["images"], root)
            for c in listing.get("categories", []):
                names.setdefault(c["id"], str(c.get("name", c["id"])))
            roots.append(root)
        elif sources.gt_index is not None:  # another tool's results: their ids are the annotation file's
            sources.preds_index = sources.gt_index
            if sources.preds_rows and not set(sources.preds_rows) & set(sources.gt_index.paths):
                raise DyheadError(
                    f"none of the {len(sources.preds_rows)} image ids in {preds} is an image of {ann}: "
                    "results of other images (give the annotation file they were predicted from)"
                )
        else:
            raise DyheadError(
                f"image list not found: {listing_path} (written by 'dyhead predict' next to the results; or pass --ann)"
            )

    if images:
        listed_images = collect_images(list(images))
        video = next((e.path for e in listed_images.entries if e.frame is not None), None)
        if video is not None:
            raise DyheadError(f"{video} is a video: visualize draws images ('dyhead predict VIDEO --save DIR' draws a video)")
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
    stems = output_names(todo, root)
    check_pictures(out, stems, attention, inputs + [("input image", p) for p in todo])
    title_size = max(13, size // 30)
    frames = FrameReader()  # predictions of a video: its frames, read in order
    try:
        for path, stem in zip(todo, stems):
            try:
                image = load_picture(path, frames)
            except DyheadError as e:
                note("skipped", e, to=console)
                summary.skipped.append(str(path))
                continue
            if attention:
                summary.written.extend(
                    attention_pictures(det, image, Path(path), out, stem[:-4], sources.device, point, level, block, size, summary)
                )
                continue
            panels = []
            if sources.gt_index is not None:
                gt = sources.ground_truth(path)
                if gt is None:
                    note("note", f"{path} is not in {ann}: no ground truth drawn", to=console)
                panels.append(
                    titled(draw_boxes(image, gt or [], sources.cats, size), f"ground truth ({len(gt or [])})", size=title_size)
                )
            if sources.has_predictions:
                found = sources.predictions(path, score_thr)
                if found is None:
                    note("note", f"{path} is not in the predictions' image list", to=console)
                title = f"predictions ({len(found or [])}, score >= {score_thr:g})"
                panels.append(titled(draw_boxes(image, found or [], sources.cats, size), title, size=title_size))
            summary.written.append(save_png(hstack(panels, gap=12), out / stem))
    finally:
        frames.close()
    if summary.skipped and not summary.written:
        raise DyheadError(f"none of the {len(todo)} images could be read (first: {summary.skipped[0]}): nothing drawn")
    return summary


def attention_pictures(
    det,
    image: Image.Image,
    path: Path,
    out: Path,
    stem: str,
    dev: torch.device,
    point_text: str | None,
    level_text: str,
    block: int | None,
    size: int,
    summary: VisualizeSummary,
) -> list[Path]:
    """The three attention PNGs for one image."""
    prepared = prepare(path, det.recipe)
    traces, error = trace_dyhead(det.model, prepared.batch.to(dev))
    summary.max_trace_error = max(summary.max_trace_error, error)
    if error > 1e-3:
        raise DyheadError(f"internal: the recomputed DyHead block differs from its forward by {error:.2e} (relative)")
    levels = tuple(det.model.fpn.levels)
    level = parse_level(level_text, levels)
    stride = det.model.fpn.strides[level]
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
        save_png(
            scale_attention_picture(traces, levels, f"{name}: scale-aware attention per block and level"),
            out / f"{stem}_scale_attention.png",
        ),
        save_png(
            spatial_attention_picture(
                image,
                traces,
                blocks,
                level,
                stride,
                point,
                prepared,
                size if len(blocks) == 1 else max(256, size // 2),
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


def run(**kwargs: Any) -> VisualizeSummary:
    """``dyhead visualize ...``: write the PNGs and print where they went."""
    summary = visualize(console=err_console, **kwargs)
    for path in summary.written:
        say(f"wrote {path}")
    skipped = f" ({len(summary.skipped)} unreadable images skipped)" if summary.skipped else ""
    say(f"{len(summary.written)} pictures in {kwargs.get('out')}{skipped}")
    return summary
