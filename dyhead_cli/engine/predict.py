"""``dyhead predict``'s engine: run a checkpoint over images and videos and stream COCO-format results to
a JSON file.

Inputs are images, videos (one image per frame, or per ``vid_stride``-th frame), folders (searched
recursively) or one COCO annotation file (its image list, see ``data/images.py``). Every image goes
through ``engine.predictor.Predictor``, the path the Python API takes too: the evaluation pipeline of
the checkpoint's recipe (``data.test_min_size`` / ``max_size`` resize, padding to
``size_divisibility``, the same batch size by default), so the numbers match ``dyhead eval`` on the
same images; optionally tiled (``tile``), filtered by score and class.

``<out stem>.images.json`` is written next to the results: a COCO file with ``images`` (id, file_name,
width, height), ``categories``, no annotations, plus ``root``, ``image_ids`` (where the ids come from)
and the ``skipped`` images, so ``COCO("preds.images.json").loadRes("preds.json")`` works.

Memory stays bounded: results are written as each batch finishes (a temporary file renamed at the end),
and unreadable images are reported, skipped and counted, never fatal. ``save_dir`` gets each image
drawn with its detections (a video: an annotated video).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dyhead_cli.data.images import ImageList, collect_images
from dyhead_cli.data.video import VideoWriter
from dyhead_cli.engine.detections import draw_detections
from dyhead_cli.engine.inference import load_detector
from dyhead_cli.engine.predictor import Predictor, head_overrides
from dyhead_cli.engine.results import JsonStream, images_json_path, json_safe
from dyhead_cli.errors import DyheadError

MAX_WORKERS = 64  # DataLoader processes: more only exhausts memory


@dataclass
class PredictSummary:
    out: Path
    images_json: Path
    num_images: int = 0  # asked for
    num_predicted: int = 0
    num_skipped: int = 0
    num_detections: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # named files that are neither image nor video ("name: why")
    id_rule: str = ""
    save_dir: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.num_predicted / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PredictOptions:
    """Everything ``dyhead predict`` may set besides its inputs, checkpoint and output file.

    ``score_thr`` is the user's threshold on final scores: detections scoring below it are not written
    (the head's candidate threshold, ``model.head_options.score_thresh``, applies first, inside the model).
    ``classes`` keeps detections of these class names or category ids; ``iou`` / ``max_det`` replace the
    head's NMS threshold and detections per image; ``tile`` > 0 predicts ``tile``-pixel crops overlapping
    by ``tile_overlap`` plus the whole image, merged by NMS. ``save_dir`` receives annotated images
    (detections scoring at least ``score_thr``, else ``draw_score_thr``). ``recipe_path`` / ``overrides``
    change the checkpoint's recipe; ``batch_size`` / ``workers`` default to its evaluation settings.
    """

    recipe_path: Path | None = None
    overrides: Sequence[str] = ()
    images_dir: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    score_thr: float | None = None
    half: bool = False
    bf16: bool = False
    vid_stride: int = 1
    save_dir: Path | None = None
    classes: Sequence[str] | None = None
    iou: float | None = None
    max_det: int | None = None
    tile: int = 0
    tile_overlap: float = 0.2
    draw_score_thr: float = 0.3

    def check(self) -> None:
        """Refuse out-of-range numbers before any file is read."""
        if self.batch_size is not None and self.batch_size < 1:
            raise DyheadError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and not 0 <= self.workers <= MAX_WORKERS:
            raise DyheadError(f"--workers must be within 0..{MAX_WORKERS}, got {self.workers}")
        if self.score_thr is not None and not 0.0 <= self.score_thr <= 1.0:
            raise DyheadError(f"--score-thr must be within 0..1, got {self.score_thr}")
        if self.classes is not None and not self.classes:
            raise DyheadError("--classes names no class: give class names or category ids, e.g. --classes person,car")


@torch.no_grad()
def predict(
    paths: Sequence[Path],
    weights: Path,
    out: Path,
    options: PredictOptions = PredictOptions(),
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[PredictSummary], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Predict every image of ``paths``; stream COCO results to ``out`` and the image list beside it.

    ``options``: see ``PredictOptions``. ``on_start(num_images)``, ``on_batch(summary)`` and
    ``on_skip(message)`` let the caller show progress.
    """
    o = options
    o.check()
    if Path(weights).suffix == ".onnx":  # an exported model, run by onnxruntime (engine/onnx_runner.py)
        from dyhead_cli.engine.onnx_runner import load_for_predict

        det = load_for_predict(
            weights, o.recipe_path, [*o.overrides, *head_overrides(o.iou, o.max_det)], o.device, o.half, o.bf16
        )
        device = "cpu"
    else:
        det = load_detector(weights, o.recipe_path, [*o.overrides, *head_overrides(o.iou, o.max_det)])
        device = o.device
    recipe = det.recipe
    images = collect_images(paths, o.images_dir, recipe, o.vid_stride)
    predictor = Predictor(
        det, device, images.ann_categories, o.score_thr, o.classes, o.tile, o.tile_overlap, o.batch_size, o.half, o.bf16
    )
    loader = DataLoader(
        predictor.dataset(images.entries, keep_original=o.save_dir is not None),
        batch_size=predictor.batch_size,
        shuffle=False,
        num_workers=recipe.data.num_workers if o.workers is None else o.workers,
        collate_fn=list,  # the predictor collates (collate_images), as for in-memory images
    )

    saver = AnnotatedOutput(
        Path(o.save_dir) if o.save_dir is not None else None,
        images,
        o.vid_stride,
        o.score_thr if o.score_thr is not None else o.draw_score_thr,
    )
    saver.check()
    out = Path(out)
    if saver.folder is not None:
        for written in (out, images_json_path(out)):
            if os.path.realpath(saver.folder) == os.path.realpath(written):
                raise DyheadError(f"--save {saver.folder} is where the results go ({written}): choose another folder")
    summary = PredictSummary(
        out=out,
        images_json=images_json_path(out),
        num_images=len(images.entries),
        ignored=list(images.ignored),
        id_rule=images.id_rule,
        save_dir=saver.folder,
    )
    info = {"description": f"images predicted by dyhead with {weights}"}
    if images.ann_file is not None:
        info["annotation_file"] = str(images.ann_file)
    head = (
        "{" + f'"info":{json.dumps(json_safe(info))},"root":{json.dumps(json_safe(str(images.root or "")))},'
        f'"image_ids":{json.dumps(images.id_rule)},"categories":{json.dumps(json_safe(predictor.categories))},"annotations":[],"images":['
    )
    results = JsonStream(out)
    try:
        image_list = JsonStream(summary.images_json, head=head, tail="")
    except BaseException:
        results.abort()
        raise
    if on_skip is not None:
        for message in images.ignored:
            on_skip(message)
    if on_start is not None:
        on_start(len(images.entries))
    start = time.perf_counter()
    try:
        for items in loader:
            good = [it for it in items if "error" not in it]
            for failure in (it for it in items if "error" in it):
                summary.num_skipped += 1
                summary.skipped.append(failure["file_name"])
                if on_skip is not None:
                    on_skip(failure["error"])
            for item, found in zip(good, predictor.detect(good)):
                h, w = item["orig_size"]
                result = predictor.result(found, item)
                rows = result.to_coco(int(item["image_id"]))
                results.write(rows)
                summary.num_detections += len(rows)
                image_list.write(
                    [{"id": int(item["image_id"]), "file_name": item["file_name"], "width": int(w), "height": int(h)}]
                )
                saver.save(item, result)
            summary.num_predicted += len(good)
            summary.seconds = time.perf_counter() - start
            if on_batch is not None:
                on_batch(summary)
        summary.seconds = time.perf_counter() - start
        if summary.num_images and not summary.num_predicted:
            first = f" (first: {summary.skipped[0]})" if summary.skipped else ""
            raise DyheadError(
                f"none of the {summary.num_images} images could be read{first}: nothing predicted, {out} not written"
            )
        image_list.write_raw("\n]," + f'"skipped":{json.dumps(json_safe(summary.skipped))}' + "}\n")
        saver.close()
        image_list.close()
        try:
            results.close()
        except BaseException:
            summary.images_json.unlink(missing_ok=True)  # both files or neither
            raise
    except BaseException:
        saver.abort()
        image_list.abort()  # first: the folder results made for both goes once it is empty
        results.abort()
        raise
    return summary


class AnnotatedOutput:
    """``--save DIR``: each image drawn with its detections at DIR/<file name>; a video's frames as a video."""

    def __init__(self, folder: Path | None, images: ImageList, vid_stride: int, min_score: float) -> None:
        self.folder = folder
        self.min_score = min_score
        self.entries = {e.file_name: e for e in images.entries}
        self.fps = {path: fps / vid_stride for path, fps in images.video_fps.items()}
        self.videos: dict[Path, VideoWriter] = {}

    def check(self) -> None:
        """Refuse, before any work, a DIR that is a file or where a drawing would replace an input (``--save``
        naming the images' own folder would draw over the user's photos and videos)."""
        if self.folder is None:
            return
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise DyheadError(f"--save {self.folder} is a file, not a folder: give a folder path")
        files = {e.path: e for e in self.entries.values()}  # a video once, not once per frame
        inputs = {os.path.realpath(p) for p in files}
        for entry in files.values():
            target = self.target(entry.file_name, video=entry.frame is not None)
            if os.path.realpath(target) in inputs:
                raise DyheadError(
                    f"--save {self.folder} would draw over the input {entry.path} (it holds the images read): choose another folder"
                )

    def save(self, item: dict, found) -> None:
        if self.folder is None:
            return
        picture = np.asarray(draw_detections(Image.fromarray(item["original"]), found, self.min_score))
        entry = self.entries.get(item["file_name"])
        if entry is not None and entry.frame is not None:
            if entry.path not in self.videos:
                self.videos[entry.path] = VideoWriter(self.target(item["file_name"], video=True), self.fps.get(entry.path, 25.0))
            self.videos[entry.path].write(picture)
            return
        target = self.target(item["file_name"])
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(target)

    def target(self, file_name: str, video: bool = False) -> Path:
        """Where ``file_name``'s drawing goes: DIR/<file name>, kept inside DIR (no absolute parts, no '..');
        a video's frames (``clip.mp4#frame=000012``) go to DIR/clip.mp4; images not in a format PIL writes get
        ``.png`` added."""
        if video:
            file_name = file_name.split("#frame=")[0]
        parts = [p for p in Path(file_name).parts if p not in ("..", ".") and not Path(p).is_absolute() and p != Path(p).anchor]
        target = self.folder.joinpath(*parts) if parts else self.folder / "image.png"
        if not video and target.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"):
            target = target.with_name(target.name + ".png")
        return target

    def close(self) -> None:
        for writer in self.videos.values():
            writer.close()

    def abort(self) -> None:
        """An interrupted or failed run: no video cut short (the pictures drawn so far are whole and stay)."""
        for writer in self.videos.values():
            writer.abort()
