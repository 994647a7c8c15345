"""A loaded detector ready to predict: the one path from pixels to detections that both the Python API
(``dyhead_cli.load``) and ``dyhead predict`` take, so they give the same numbers.

Every image goes through ``data.images.ImageFiles`` (the recipe's test resize), batches through
``data.loaders.collate_images`` (padding to ``size_divisibility``) and ``engine.inference.run_model``.
On top of the model: optional tiling (``engine/tiling.py``), a score threshold and a class filter.
``--iou`` and ``--max-det`` are recipe overrides of the head's NMS (see ``head_overrides``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dyhead_cli.data.images import IMAGE_ERRORS, ImageEntry, ImageFiles, _to_rgb, collect_images
from dyhead_cli.data.loaders import collate_images
from dyhead_cli.engine.detections import Detections
from dyhead_cli.engine.inference import (
    LoadedDetector,
    autocast_dtype,
    category_ids,
    choose_device,
    load_detector,
    run_model,
)
from dyhead_cli.engine.tiling import check_tiling, merge_tiles, tile_windows
from dyhead_cli.errors import DyheadError, suggest
from dyhead_cli.recipe import HeadOptions, field_range


def head_overrides(iou: float | None = None, max_det: int | None = None) -> list[str]:
    """Recipe overrides for the head's NMS IoU threshold and the number of detections kept per image."""
    out = []
    if iou is not None:
        if not 0.0 < iou <= 1.0:
            raise DyheadError(f"--iou must be within (0, 1], got {iou}")
        out.append(f"model.head_options.nms_thresh={float(iou)!r}")
    if max_det is not None:
        limit = field_range(HeadOptions, "detections_per_img")
        if not limit.allows(max_det):
            raise DyheadError(f"--max-det must be {limit.describe()}, got {max_det}")
        out.append(f"model.head_options.detections_per_img={int(max_det)}")
    return out


def resolve_classes(wanted: Sequence[str | int], class_names: list[str], cats: list[dict[str, Any]]) -> list[int]:
    """Model labels for class names or the data set's category ids (a name wins over an id)."""
    labels = []
    for token in wanted:
        text = str(token).strip()
        if text in class_names:
            labels.append(class_names.index(text))
            continue
        ids = [c["id"] for c in cats]
        if text.lstrip("-").isdigit() and int(text) in ids:
            labels.append(ids.index(int(text)))
            continue
        raise DyheadError(
            f"--classes: '{text}' is neither a class name ({', '.join(class_names)}) nor a category id "
            f"({', '.join(map(str, ids))}){suggest(text, class_names)}"
        )
    return sorted(set(labels))


class Predictor:
    """Run a ``LoadedDetector`` on images: paths, PIL images, arrays, tensors, or ``ImageFiles`` items.

    ``score_thr`` drops detections below it; ``classes`` keeps only these (names or category ids);
    ``tile`` > 0 predicts crops of that many pixels (plus the whole image) and merges them by NMS.
    """

    def __init__(
        self,
        det: LoadedDetector,
        device: str = "auto",
        ann_categories: list[dict[str, Any]] | None = None,
        score_thr: float | None = None,
        classes: Sequence[str | int] | None = None,
        tile: int = 0,
        tile_overlap: float = 0.2,
        batch_size: int | None = None,
        half: bool = False,
        bf16: bool = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise DyheadError(f"--batch-size must be at least 1, got {batch_size}")
        if score_thr is not None and not 0.0 <= score_thr <= 1.0:
            raise DyheadError(f"--score-thr must be within 0..1, got {score_thr}")
        if tile:
            check_tiling(tile, tile_overlap)
        self.det = det
        self.recipe = det.recipe
        self.device = choose_device(device)
        self.dtype = autocast_dtype(half, bf16, self.device)
        self.categories = category_ids(det, ann_categories)  # [{"id", "name"}] per model label
        self.category_of_label = [c["id"] for c in self.categories]
        self.class_names = list(det.class_names)
        self.score_thr = score_thr
        self.labels = resolve_classes(classes, self.class_names, self.categories) if classes else None
        self.tile, self.tile_overlap = int(tile or 0), float(tile_overlap)
        self.batch_size = batch_size or self.recipe.eval.batch_size
        self.model = det.model.to(self.device).eval()

    # ------------------------------------------------------------------------------------------------
    # the pipeline

    def dataset(self, entries: list[ImageEntry], keep_original: bool = False) -> ImageFiles:
        """The recipe's evaluation preprocessing over ``entries`` (tiles too, when tiling)."""
        d = self.recipe.data
        windows = partial(tile_windows, size=self.tile, overlap=self.tile_overlap) if self.tile else None
        return ImageFiles(
            entries, d.test_min_size, d.max_size, keep_original=keep_original, windows=windows, resize_backend=d.resize_backend
        )

    @torch.no_grad()
    def detect(self, items: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Detections (boxes in original pixels, on the CPU) of readable ``ImageFiles`` items, in order.

        Without tiling the items are one batch (call with at most ``batch_size`` of them); with tiling
        every image's tiles are batched ``batch_size`` at a time and merged per image.
        """
        if not items:
            return []
        if not self.tile:
            found = self._run(items)
        else:
            tiles = [(i, t) for i, it in enumerate(items) for t in it["tiles"]]
            parts: list[list[dict]] = [[] for _ in items]
            offsets: list[list[tuple[int, int]]] = [[] for _ in items]
            for start in range(0, len(tiles), self.batch_size):
                chunk = tiles[start : start + self.batch_size]
                for (i, tile), out in zip(chunk, self._run([t for _, t in chunk])):
                    parts[i].append(out)
                    offsets[i].append(tile["offset"])
            o = self.recipe.model.head_options
            found = [merge_tiles(p, off, o.nms_thresh, o.detections_per_img) for p, off in zip(parts, offsets)]
        return [self._filter(f) for f in found]

    def _run(self, items: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        batch = collate_images(items, self.recipe.data.size_divisibility)
        images = batch["images"].to(self.device, non_blocking=True)
        # the classes as the only candidates, for this call alone: the model may be shared (by other
        # predictors of one loaded detector, by evaluation); an ONNX graph that post-processes itself is
        # filtered afterwards only (_filter)
        narrowed = self.labels is not None and hasattr(self.model, "keep_only")
        if narrowed:
            self.model.keep_only(self.labels)
        try:
            out = run_model(
                self.model,
                images,
                batch["image_sizes"],
                batch["orig_sizes"],
                self.device,
                self.dtype,
                self.recipe.data.size_divisibility,
            )
        finally:
            if narrowed:
                self.model.keep_only(None)
        return [{k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")} for d in out]

    def _filter(self, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = torch.ones_like(found["scores"], dtype=torch.bool)
        if self.score_thr is not None:
            keep &= found["scores"] >= self.score_thr
        if self.labels is not None:
            keep &= torch.isin(found["labels"], torch.tensor(self.labels, dtype=found["labels"].dtype))
        return {k: v[keep] for k, v in found.items()}

    def result(
        self, found: dict[str, torch.Tensor], item: dict[str, Any], path: Path | None = None, frame: int | None = None
    ) -> Detections:
        return Detections(
            boxes=found["boxes"].float(),
            scores=found["scores"].float(),
            labels=found["labels"].long(),
            class_names=self.class_names,
            category_of_label=self.category_of_label,
            image_size=tuple(item["orig_size"]),
            image=item.get("original"),
            path=path,
            frame=frame,
        )

    # ------------------------------------------------------------------------------------------------
    # the Python API: predictor(source) -> [Detections]

    def __call__(self, source: Any, bgr: bool = False) -> list[Detections]:
        """Detections for each image of ``source``, in order.

        ``source``: a path (an image, a video: one result per frame, or a folder), a PIL image, a
        (H, W, 3) or (H, W) uint8 array (RGB; ``bgr=True`` for OpenCV's order), a (3, H, W) or
        (B, 3, H, W) tensor (RGB; uint8 0..255 or float 0..1), or a list of these.
        """
        inputs = list(source) if isinstance(source, (list, tuple)) else [source]
        pending: list[tuple[Any, Path | None]] = []  # (entry or pixels, path)
        for x in inputs:
            pending.extend(self._expand(x, bgr))
        dataset = self.dataset([], keep_original=True)
        results: list[Detections] = []
        for start in range(0, len(pending), self.batch_size):
            items = []
            for k, (x, path) in enumerate(pending[start : start + self.batch_size]):
                rgb = dataset.read(x) if isinstance(x, ImageEntry) else x
                item = dataset.prepare(rgb, start + k + 1, str(path or f"image {start + k + 1}"))
                if isinstance(x, ImageEntry):
                    item.pop("original")  # drawn from the file when asked: no need to keep every image
                items.append(item)
            for (x, path), item, found in zip(pending[start : start + self.batch_size], items, self.detect(items)):
                frame = x.frame if isinstance(x, ImageEntry) else None
                results.append(self.result(found, item, path if isinstance(x, ImageEntry) else None, frame))
        return results

    def _expand(self, x: Any, bgr: bool) -> list[tuple[Any, Path | None]]:
        if isinstance(x, (str, Path)):
            listed = collect_images([Path(x)])
            if listed.ignored and not listed.entries:
                raise DyheadError(listed.ignored[0])
            return [(e, e.path) for e in listed.entries]
        if isinstance(x, Image.Image):
            try:
                rgb = np.asarray(_to_rgb(x))
            except IMAGE_ERRORS as e:  # a closed image, a mode PIL cannot convert
                raise DyheadError(f"cannot read this PIL image (mode {x.mode}, {x.width}x{x.height}): {e}") from None
            return self._expand(rgb, bgr=False)
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            if t.ndim == 4:
                return [pair for one in t for pair in self._expand(one, bgr)]
            if t.ndim != 3 or t.shape[0] not in (1, 3):
                raise DyheadError(f"a tensor image must be (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
            if t.dtype == torch.uint8:
                arr = t.permute(1, 2, 0).numpy()
            elif t.is_floating_point():
                top = float(t.max()) if t.numel() else 0.0
                if top > 1.0 + 1e-3:  # 0..255 floats would all clamp to white
                    raise DyheadError(
                        f"a float tensor image must hold 0..1, its largest value is {top:g}: divide it by 255, or give uint8"
                    )
                arr = (t.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            else:
                raise DyheadError(f"a tensor image must be uint8 (0..255) or float (0..1), got {t.dtype}")
            return self._expand(np.ascontiguousarray(arr), bgr)
        if isinstance(x, np.ndarray):
            if x.dtype != np.uint8:
                raise DyheadError(
                    f"an array image must be uint8 (H, W, 3) or (H, W), got {x.dtype} (convert with .astype(np.uint8))"
                )
            if x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 1):
                x = np.repeat(x.reshape(x.shape[0], x.shape[1], 1), 3, axis=2)
            if x.ndim != 3 or x.shape[2] != 3:
                raise DyheadError(f"an array image must be (H, W, 3) or (H, W), got shape {x.shape}")
            if x.shape[0] == 0 or x.shape[1] == 0:
                raise DyheadError(f"an image must have at least one pixel, got {x.shape[0]}x{x.shape[1]}")
            return [(np.ascontiguousarray(x[:, :, ::-1] if bgr else x), None)]
        raise DyheadError(f"cannot predict on a {type(x).__name__}: give a path, PIL image, numpy array or tensor")


def load_predictor(
    weights: str | Path,
    device: str = "auto",
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    iou: float | None = None,
    max_det: int | None = None,
    **options: Any,
) -> Predictor:
    """``load_detector`` (with ``iou`` / ``max_det`` as head overrides) wrapped in a ``Predictor``."""
    det = load_detector(Path(weights), Path(recipe) if recipe is not None else None, [*overrides, *head_overrides(iou, max_det)])
    return Predictor(det, device, **options)
