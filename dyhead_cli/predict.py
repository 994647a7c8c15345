"""``dyhead predict``: run a checkpoint over images and stream COCO-format results to a JSON file.

Inputs are images, folders (searched recursively) or one COCO annotation file (its image list). Every
image goes through the evaluation pipeline of the checkpoint's recipe (``data.test_min_size`` /
``max_size`` resize, zero padding to ``size_divisibility``, the same batch size by default), so the
numbers match ``dyhead eval`` on the same images.

Image ids and category ids:
- with an annotation file, its image ids, and its category ids (matched to the model's classes by name,
  else by position among the sorted ids when the counts agree);
- otherwise images are numbered 1..N in the order of their sorted relative paths (relative to the
  deepest folder holding every input, ``root``), and classes get the category ids of the checkpoint
  (metadata ``category_ids``, else the categories of the recipe's ``data.val_ann`` when that file is
  there and names the same classes, else 1..K).
Either way ``<out stem>.images.json`` is written next to the results: a COCO file with ``images``
(id, file_name, width, height), ``categories``, no annotations, plus ``root`` and the ``skipped`` images,
so ``COCO("preds.images.json").loadRes("preds.json")`` works.

Annotation files: an image's ``file_name`` is looked up under ``--images DIR`` when given; else under the
recipe's ``data.val_images`` (or ``train_images``) when the file is the recipe's ``data.val_ann`` (or
``train_ann``); else under the annotation file's own folder.

Memory stays bounded: results are written as each batch finishes (a temporary file renamed at the end),
and unreadable images are reported, skipped and counted, never fatal.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dyhead_cli.data.coco import collate, load_rgb, read_annotation_file
from dyhead_cli.data.transforms import test_transform
from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
from dyhead_cli.engine.evaluate import detections_to_coco
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------------
# which images


@dataclass
class ImageEntry:
    id: int
    path: Path  # where to read it
    file_name: str  # as written to the image list (relative to ``root``, or the annotation file's name)


@dataclass
class ImageList:
    entries: list[ImageEntry]
    root: Path | None = None  # file names are relative to this folder
    ann_file: Path | None = None
    ann_categories: list[dict[str, Any]] | None = None  # the annotation file's categories, sorted by id


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted; hidden files skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(Path(f)))
    return sorted(found)


def collect_images(paths: Sequence[Path], images_dir: Path | None = None, recipe: Recipe | None = None) -> ImageList:
    """Turn the command line's PATHs into numbered images (see the module docstring for the rules)."""
    if not paths:
        raise DyheadError("give at least one image, folder or COCO annotation file")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise DyheadError(f"no such file or folder: {p}")
    jsons = [p for p in paths if p.is_file() and p.suffix.lower() == ".json"]
    if jsons:
        if len(paths) > 1:
            raise DyheadError("a COCO annotation file must be the only PATH (its image ids would clash with others)")
        return images_from_annotations(jsons[0], images_dir, recipe)
    if images_dir is not None:
        raise DyheadError("--images is only used with a COCO annotation file as PATH")
    files: dict[Path, None] = {}
    bases: list[Path] = []
    for p in paths:
        p = absolute(p)  # absolute, symlinks kept: a linked image is named where it is linked
        if p.is_dir():
            bases.append(p)
            for f in find_images(p):
                files.setdefault(f, None)
        else:  # an explicitly named file is tried whatever its extension
            bases.append(p.parent)
            files.setdefault(p, None)
    if not files:
        raise DyheadError("no images found in " + ", ".join(str(p) for p in paths) + f" (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    root = Path(os.path.commonpath([str(b) for b in bases]))
    named = sorted((f.relative_to(root).as_posix(), f) for f in files)
    entries = [ImageEntry(i, f, name) for i, (name, f) in enumerate(named, start=1)]
    return ImageList(entries, root=root)


def absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def images_from_annotations(
    ann_file: Path, images_dir: Path | None, recipe: Recipe | None = None, data: dict[str, Any] | None = None
) -> ImageList:
    """The images of a COCO file (``data``: its already-read contents) under ``images_dir`` or the default."""
    data = read_annotation_file(ann_file) if data is None else data
    images_dir = Path(images_dir) if images_dir is not None else default_images_dir(ann_file, recipe)
    if not Path(images_dir).is_dir():
        raise DyheadError(f"image folder not found: {images_dir} (for {ann_file}; pass --images DIR)")
    ids = [img["id"] for img in data["images"]]
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise DyheadError(f"annotation file {ann_file}: image ids must be integers for COCO results, got {bad[0]!r}")
    if len(set(ids)) != len(ids):
        raise DyheadError(f"annotation file {ann_file} lists an image id more than once")
    entries = [
        ImageEntry(img["id"], Path(images_dir) / img["file_name"], str(img["file_name"]))
        for img in sorted(data["images"], key=lambda im: im["id"])
    ]
    cats = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in data["categories"]), key=lambda c: c["id"])
    return ImageList(entries, root=absolute(images_dir), ann_file=ann_file, ann_categories=cats)


def default_images_dir(ann_file: Path, recipe: Recipe | None = None) -> Path:
    """The recipe's image folder when ``ann_file`` is one of its annotation files, else the file's folder."""
    if recipe is not None:
        d = recipe.data
        for ann, images in ((d.val_ann, d.val_images), (d.train_ann, d.train_images)):
            if ann and Path(ann).is_file() and same_file(Path(ann), ann_file):
                return Path(images)
    return ann_file.parent


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# the model


@dataclass
class LoadedDetector:
    model: nn.Module
    recipe: Recipe
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def load_detector(weights: Path, recipe_path: Path | None = None, overrides: Sequence[str] = ()) -> LoadedDetector:
    """Rebuild the model from the checkpoint's recipe (or ``recipe_path``), load its weights, eval mode."""
    state, meta = load_weights(weights)
    stored = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else None
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, list(overrides))
        names = (stored or {}).get("model", {}).get("class_names") or []
        if not recipe.model.class_names and names and recipe.model.num_classes in (len(names), 80):
            recipe.model.class_names, recipe.model.num_classes = list(names), len(names)
    elif stored is not None:
        recipe = recipe_from_dict(apply_overrides(json.loads(json.dumps(stored)), list(overrides)))
    else:
        raise DyheadError(f"{weights} carries no recipe in its metadata: pass --recipe (or convert it with 'dyhead convert')")
    model = build_model(recipe.model)
    load_model_weights(model, state, source=str(weights))
    model.eval()
    names = list(recipe.model.class_names) or [f"class_{k}" for k in range(recipe.model.num_classes)]
    return LoadedDetector(model, recipe, names, meta)


def category_ids(det: LoadedDetector, ann_categories: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """[{"id", "name"}] per model label 0..K-1: the data set's own category ids (see the module docstring)."""
    k = len(det.class_names)
    named = bool(det.recipe.model.class_names)
    if ann_categories is not None:
        cats = match_categories(det.class_names, named, ann_categories)
        if cats is None:
            have = ", ".join(c["name"] for c in ann_categories)
            raise DyheadError(
                f"the annotation file's {len(ann_categories)} categories ({have}) do not match the model's {k} classes "
                f"({', '.join(det.class_names)})"
            )
        return cats
    stored = det.meta.get("category_ids")
    if isinstance(stored, list) and len(stored) == k and all(isinstance(i, int) for i in stored):
        return [{"id": i, "name": n} for i, n in zip(stored, det.class_names)]
    val_ann = Path(det.recipe.data.val_ann) if det.recipe.data.val_ann else None
    if val_ann is not None and val_ann.is_file():
        try:
            data = json.loads(val_ann.read_bytes())
            found = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in data["categories"]), key=lambda c: c["id"])
            cats = match_categories(det.class_names, named, found)
            if cats is not None:
                return cats
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable data set file: fall back to 1..K
    return [{"id": i + 1, "name": n} for i, n in enumerate(det.class_names)]


def match_categories(class_names: list[str], named: bool, cats: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    by_name = {c["name"]: c for c in cats}
    if named and len(by_name) == len(cats) and all(n in by_name for n in class_names):
        return [{"id": by_name[n]["id"], "name": n} for n in class_names]
    if len(cats) == len(class_names) and not named:
        return [dict(c) for c in cats]  # the data set's order: label k = k-th smallest id
    return None


def choose_device(name: str) -> torch.device:
    """auto (CUDA when there is one) | cpu | cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DyheadError(f"--device {name}: no CUDA device is available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DyheadError(f"--device {name!r} is not a device (try cuda or cuda:0)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DyheadError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        return device
    raise DyheadError(f"--device must be auto, cpu or cuda[:N], got {name!r}")


def autocast_dtype(half: bool, bf16: bool, device: torch.device) -> torch.dtype | None:
    if half and bf16:
        raise DyheadError("--half and --bf16 exclude each other")
    if half:
        if device.type != "cuda":
            raise DyheadError("--half (float16) needs a CUDA device; use --bf16 on CPU")
        return torch.float16
    if bf16:
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------------
# data


class ImageFiles(Dataset):
    """The images of an ``ImageList`` through the recipe's test transform.

    Items are what ``data.coco.collate`` stacks (no boxes), or ``{"error": message, ...}`` for an image
    that cannot be read, so a worker never dies on a bad file.
    """

    def __init__(self, entries: list[ImageEntry], min_size: int, max_size: int) -> None:
        self.entries = entries
        self.transform = test_transform(min_size, max_size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            image = load_rgb(entry.path)
            width, height = image.size
            pixels = self.transform(image=np.asarray(image), bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
        except Exception as e:  # noqa: BLE001 - any failure on one file is that file's problem, never the run's
            message = str(e) if isinstance(e, DyheadError) else f"cannot read image {entry.path}: {type(e).__name__}: {e}"
            return {"error": message, "image_id": entry.id, "file_name": entry.file_name}
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),  # (H, W, 3) -> (3, H, W)
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": entry.id,
            "file_name": entry.file_name,
            "orig_size": (height, width),
            "size": (int(pixels.shape[0]), int(pixels.shape[1])),
        }


def collate_images(items: list[dict[str, Any]], size_divisibility: int) -> dict[str, Any]:
    """``data.coco.collate`` of the readable items (same padding as evaluation) plus the ``failed`` ones."""
    good = [it for it in items if "error" not in it]
    batch = collate(good, size_divisibility=size_divisibility)
    batch["file_names"] = [it["file_name"] for it in good]
    batch["failed"] = [it for it in items if "error" in it]
    return batch


def image_loader(entries: list[ImageEntry], recipe: Recipe, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    d = recipe.data
    return DataLoader(
        ImageFiles(entries, d.test_min_size, d.max_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=partial(collate_images, size_divisibility=d.size_divisibility),
        pin_memory=pin,
        persistent_workers=False,
    )


# ----------------------------------------------------------------------------------------------------
# output


class JsonStream:
    """Write ``head``, then the items of one JSON array as they come, then ``tail``; atomically.

    The text goes to a temporary file next to ``path`` that replaces ``path`` on ``close()`` only, so an
    interrupted run never leaves a truncated file behind.
    """

    def __init__(self, path: Path, head: str = "[", tail: str = "\n]\n") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.tail = tail
        self.count = 0
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.file.write(head)

    def write(self, items: Iterable[Any]) -> None:
        for item in items:
            self.file.write(("," if self.count else "") + "\n" + json.dumps(item, separators=(",", ":")))
            self.count += 1

    def close(self) -> None:
        self.file.write(self.tail)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def images_json_path(out: Path) -> Path:
    """``preds.json`` -> ``preds.images.json`` (next to it)."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix.lower() == ".json" else out.name) + ".images.json")


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


# ----------------------------------------------------------------------------------------------------
# the run


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
    console=None,
) -> PredictSummary:
    """Predict every image of ``paths``; stream COCO results to ``out`` and the image list beside it.

    ``score_thr`` drops detections scoring below it (the head's own candidate threshold,
    ``model.head_options.score_thresh``, applies first). ``console`` (rich, stderr is a good choice) gets
    the progress bar and one line per skipped image.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


    console = console or Console(stderr=True)
    if batch_size is not None and batch_size < 1:
        raise DyheadError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise DyheadError(f"--workers must be >= 0, got {workers}")
    if score_thr is not None and not 0.0 <= score_thr <= 1.0:
        raise DyheadError(f"--score-thr must be within 0..1, got {score_thr}")
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
    progress = Progress(
        TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,  # the summary line replaces it
    )
    start = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("predict", total=len(images.entries), speed="")
            for batch in loader:
                for failure in batch["failed"]:
                    summary.num_skipped += 1
                    summary.skipped.append(failure["file_name"])
                    progress.console.print(f"[yellow]skipped[/] {escape(failure['error'])}", highlight=False, soft_wrap=True)
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
                done = summary.num_predicted + summary.num_skipped
                elapsed = time.perf_counter() - start
                progress.update(task, completed=done, speed=f"{summary.num_predicted / max(elapsed, 1e-9):.1f} img/s")
        summary.seconds = time.perf_counter() - start
        image_list.file.write("\n]," + f'"skipped":{json.dumps(summary.skipped)}' + "}\n")
        results.close()
        image_list.close()
    except BaseException:
        results.abort()
        image_list.abort()
        raise
    return summary


def run_model(model: nn.Module, images: torch.Tensor, sizes, orig_sizes, device: torch.device, dtype: torch.dtype | None) -> list[dict]:
    """The detector under autocast; an op without a kernel for the autocast type is a user-facing error."""
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(images, sizes, original_sizes=orig_sizes)
    except (RuntimeError, NotImplementedError) as e:
        if dtype is not None and ("BFloat16" in str(e) or "Half" in str(e)):
            flag = "--bf16" if dtype == torch.bfloat16 else "--half"
            raise DyheadError(f"{flag}: an op of this model has no {dtype} kernel on {device.type} ({str(e).splitlines()[0][-120:]}); run without {flag}") from None
        raise


def predict_from_cli(
    paths: list[Path],
    weights: Path,
    out: Path,
    recipe_path: Path | None,
    overrides: list[str],
    images_dir: Path | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    score_thr: float | None,
    half: bool,
    bf16: bool,
) -> PredictSummary:
    """``dyhead predict PATH... --weights W [--out preds.json] ...``: run and print a one-line summary."""
    from rich.console import Console

    summary = predict(
        paths, weights, out, recipe_path, overrides, images_dir, device, batch_size, workers, score_thr, half, bf16,
        console=Console(stderr=True),
    )
    skipped = f" ({summary.num_skipped} unreadable, skipped)" if summary.num_skipped else ""
    Console().print(
        f"predicted {summary.num_predicted} of {summary.num_images} images{skipped}: {summary.num_detections} detections, "
        f"{summary.images_per_s:.1f} images/s -> {summary.out} (image list: {summary.images_json})",
        highlight=False, soft_wrap=True,
    )
    return summary
