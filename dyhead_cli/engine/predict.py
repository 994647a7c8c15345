"""``dyhead predict``'s engine: run a checkpoint over images and stream COCO-format results to a JSON file.

Inputs are images, folders (searched recursively) or one COCO annotation file (its image list, see
``data/images.py``). Every image goes through the evaluation pipeline of the checkpoint's recipe
(``data.test_min_size`` / ``max_size`` resize, padding to ``size_divisibility``, the same batch size by
default), so the numbers match ``dyhead eval`` on the same images.

``<out stem>.images.json`` is written next to the results: a COCO file with ``images`` (id, file_name,
width, height), ``categories``, no annotations, plus ``root`` and the ``skipped`` images, so
``COCO("preds.images.json").loadRes("preds.json")`` works.

Memory stays bounded: results are written as each batch finishes (a temporary file renamed at the end),
and unreadable images are reported, skipped and counted, never fatal.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dyhead_cli.data.images import collect_images
from dyhead_cli.data.loaders import image_loader
from dyhead_cli.engine.inference import autocast_dtype, category_ids, choose_device, detections_to_coco, load_detector, run_model
from dyhead_cli.engine.results import JsonStream, images_json_path
from dyhead_cli.errors import DyheadError


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

    @property
    def images_per_s(self) -> float:
        return self.num_predicted / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def predict(
    paths: Sequence[Path],
    weights: Path,
    out: Path,
    recipe_path: Path | None = None,
    overrides: Sequence[str] = (),
    images_dir: Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    score_thr: float | None = None,
    half: bool = False,
    bf16: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[PredictSummary], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Predict every image of ``paths``; stream COCO results to ``out`` and the image list beside it.

    ``score_thr`` is the user's threshold on final scores: detections scoring below it are not written
    (the head's candidate threshold, ``model.head_options.score_thresh``, applies first, inside the model).
    ``on_start(num_images)``, ``on_batch(summary)`` and ``on_skip(message)`` let the caller show progress.
    """
    if batch_size is not None and batch_size < 1:
        raise DyheadError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise DyheadError(f"--workers must be >= 0, got {workers}")
    if score_thr is not None and not 0.0 <= score_thr <= 1.0:
        raise DyheadError(f"--score-thr must be within 0..1, got {score_thr}")
    if Path(weights).suffix == ".onnx":  # an exported model, run by onnxruntime (engine/onnx_runner.py)
        from dyhead_cli.engine.onnx_runner import load_for_predict

        det, dev, dtype = load_for_predict(weights, recipe_path, overrides, device, half, bf16), torch.device("cpu"), None
    else:
        dev = choose_device(device)
        dtype = autocast_dtype(half, bf16, dev)
        det = load_detector(weights, recipe_path, overrides)
    recipe = det.recipe
    images = collect_images(paths, images_dir, recipe)
    cats = category_ids(det, images.ann_categories)
    cat_of_label = [c["id"] for c in cats]
    model = det.model.to(dev)
    loader = image_loader(
        images.entries,
        recipe,
        batch_size or recipe.eval.batch_size,
        recipe.data.num_workers if workers is None else workers,
        pin=dev.type == "cuda",
    )

    out = Path(out)
    summary = PredictSummary(out=out, images_json=images_json_path(out), num_images=len(images.entries))
    info = {"description": f"images predicted by dyhead with {weights}"}
    if images.ann_file is not None:
        info["annotation_file"] = str(images.ann_file)
    head = (
        "{" + f'"info":{json.dumps(info)},"root":{json.dumps(str(images.root or ""))},'
        f'"categories":{json.dumps(cats)},"annotations":[],"images":['
    )
    results = JsonStream(out)
    image_list = JsonStream(summary.images_json, head=head, tail="")
    if on_start is not None:
        on_start(len(images.entries))
    start = time.perf_counter()
    try:
        for batch in loader:
            for failure in batch["failed"]:
                summary.num_skipped += 1
                summary.skipped.append(failure["file_name"])
                if on_skip is not None:
                    on_skip(failure["error"])
            if batch["image_ids"]:
                tensors = batch["images"].to(dev, non_blocking=True)
                detections = run_model(model, tensors, batch["image_sizes"], batch["orig_sizes"], dev, dtype)
                for image_id, name, (h, w), found in zip(batch["image_ids"], batch["file_names"], batch["orig_sizes"], detections):
                    rows = detections_to_coco(found, int(image_id), cat_of_label)
                    if score_thr is not None:
                        rows = [r for r in rows if r["score"] >= score_thr]
                    results.write(rows)
                    summary.num_detections += len(rows)
                    image_list.write([{"id": int(image_id), "file_name": name, "width": int(w), "height": int(h)}])
                summary.num_predicted += len(batch["image_ids"])
            summary.seconds = time.perf_counter() - start
            if on_batch is not None:
                on_batch(summary)
        summary.seconds = time.perf_counter() - start
        image_list.file.write("\n]," + f'"skipped":{json.dumps(summary.skipped)}' + "}\n")
        results.close()
        image_list.close()
    except BaseException:
        results.abort()
        image_list.abort()
        raise
    return summary
