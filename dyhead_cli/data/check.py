"""Find what is wrong with a COCO-format data set before a training run trips over it.

Unlike the loader, which stops at the first problem, the checker collects every problem it can see in
one linear pass over images and annotations, and opens every image file (decoding it, since a truncated
JPEG only fails when its pixels are read). Sizes are compared with the image as displayed, i.e. after
its EXIF orientation, because that is how the loader reads it and how COCO tools annotate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dyhead_cli.data.annotations import load_json_object, record_problems
from dyhead_cli.data.images import IMAGE_ERRORS
from dyhead_cli.errors import DyheadError

BOX_TOLERANCE = 1.0  # px a box may overhang the image (rounding in annotation tools); the loader clips it
EXAMPLES = 5  # file names quoted in a message that stands for many
EXIF_ORIENTATION = 0x0112


@dataclass
class CheckReport:
    """What ``check_dataset`` found: ``errors`` break training or evaluation, ``warnings`` may be fine."""

    ann_file: str
    images_dir: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    num_images_read: int = 0  # image files that opened and decoded

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, limit: int = 20) -> str:
        """A few lines for a terminal: the counts, then at most ``limit`` errors and ``limit`` warnings."""
        lines = [
            f"{self.ann_file}: {self.num_images} images ({self.num_images_read} read), "
            f"{self.num_annotations} annotations, {self.num_categories} categories: "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        for kind, messages in (("error", self.errors), ("warning", self.warnings)):
            lines += [f"  {kind}: {m}" for m in messages[:limit]]
            if len(messages) > limit:
                lines.append(f"  ... and {len(messages) - limit} more {kind}s")
        return "\n".join(lines)


def check_dataset(ann_file: str | Path, images_dir: str | Path) -> CheckReport:
    """Check a COCO detection file and its images; see the module docstring."""
    report = CheckReport(str(ann_file), str(images_dir))
    data = _load(Path(ann_file), report)
    if data is None:
        return report
    bad = {(p.section, p.index) for p in record_problems(data)}
    report.errors.extend(p.message for p in record_problems(data))
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        what = "is a file, not a folder" if images_dir.exists() else "not found"
        report.errors.append(f"image folder {what}: {images_dir} (no image could be checked)")
        images_dir = None
    good = {
        key: [(i, r) for i, r in enumerate(data[key]) if (key, i) not in bad] for key in ("images", "annotations", "categories")
    }
    cat_ids = _check_categories(good["categories"], report)
    image_sizes = _check_images(good["images"], images_dir, report)
    if not data["images"]:
        report.errors.append("the file lists no images: nothing to train or evaluate on")
    _check_annotations(good["annotations"], image_sizes, cat_ids, report)
    report.num_annotations = len(data["annotations"])
    return report


def _load(path: Path, report: CheckReport) -> dict[str, Any] | None:
    """The parsed file, or None after recording why nothing else can be checked."""
    try:
        data = load_json_object(path, "annotation file")
    except DyheadError as e:
        report.errors.append(str(e))
        return None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            report.errors.append(f"annotation file {path} has no '{key}' key")
        elif not isinstance(data[key], list):
            report.errors.append(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return None if report.errors else data


def _check_categories(categories: list[tuple[int, dict[str, Any]]], report: CheckReport) -> dict[Any, str]:
    """category id -> name of the well-formed categories (schema problems are already reported)."""
    names: dict[Any, str] = {}
    for _, cat in categories:
        if "name" not in cat:
            report.warnings.append(f"category id {cat['id']!r} has no 'name' (it is called {str(cat['id'])!r})")
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    report.num_categories = len(names)
    if not names:
        report.errors.append("no categories: the model would have nothing to detect")
    return names


def _check_images(
    images: list[tuple[int, dict[str, Any]]], images_dir: Path | None, report: CheckReport
) -> dict[Any, tuple[str, int, int] | None]:
    """image id -> (file name, displayed width, height), or None where the size is unknown."""
    sizes: dict[Any, tuple[str, int, int] | None] = {}
    seen_files: set[str] = set()
    for _, img in images:
        image_id, name = img["id"], img["file_name"]
        if name in seen_files:
            report.warnings.append(f"file {name} is listed by more than one image id (again as id {image_id!r})")
        seen_files.add(name)
        json_size = _json_size(img)
        if json_size is None:
            report.warnings.append(f"image id {image_id!r} ({name}) has no valid 'width'/'height'")
        file_size = _read_size(images_dir / name, image_id, report) if images_dir is not None else None
        if file_size is not None and json_size is not None and file_size[:2] != json_size:
            (w, h, orientation), (jw, jh) = file_size, json_size
            why = ""
            if orientation in (5, 6, 7, 8) and (jh, jw) == (w, h):
                why = f" (the size before its EXIF rotation, orientation {orientation}; boxes must use the shown one)"
            report.errors.append(f"image {images_dir / name} is {w}x{h} but the JSON says {jw}x{jh}{why}")
        size = file_size[:2] if file_size is not None else json_size
        sizes[image_id] = (name, *size) if size is not None else None
    report.num_images = len(sizes)
    return sizes


def _json_size(img: dict[str, Any]) -> tuple[int, int] | None:
    w, h = img.get("width"), img.get("height")
    if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
        return int(w), int(h)
    return None


def _read_size(path: Path, image_id: Any, report: CheckReport) -> tuple[int, int, int] | None:
    """(displayed width, height, EXIF orientation) of a decodable image; None after recording the error."""
    if not path.is_file():
        report.errors.append(f"image file not found: {path} (image id {image_id!r})")
        return None
    try:
        with Image.open(path) as im:
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            im.load()
            w, h = im.size
    except IMAGE_ERRORS as e:
        report.errors.append(f"corrupt or unreadable image {path} (image id {image_id!r}): {e}")
        return None
    report.num_images_read += 1
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)


def _check_annotations(
    annotations: list[tuple[int, dict[str, Any]]],
    images: dict[Any, tuple[str, int, int] | None],
    cat_ids: dict[Any, str],
    report: CheckReport,
) -> None:
    """Boxes against their images, and what has no annotations (schema problems are already reported)."""
    per_image = dict.fromkeys(images, 0)
    per_category = dict.fromkeys(cat_ids, 0)
    lacking_eval_keys = 0
    for _, ann in annotations:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        per_category[ann["category_id"]] = per_category.get(ann["category_id"], 0) + 1
        if "area" not in ann or "iscrowd" not in ann:
            lacking_eval_keys += 1
        _check_box(ann["bbox"], f"annotation id {ann['id']!r}", images.get(ann["image_id"]), report)

    if lacking_eval_keys:
        report.warnings.append(
            f"{lacking_eval_keys} annotations lack 'area' or 'iscrowd', which COCO evaluation reads "
            "(dyhead fills in iscrowd = 0 and the box area; other tools may not)"
        )
    empty = [images[i][0] if images[i] else str(i) for i in images if per_image.get(i, 0) == 0]
    if empty:
        examples = ", ".join(empty[:EXAMPLES]) + (", ..." if len(empty) > EXAMPLES else "")
        report.warnings.append(f"{len(empty)} images have no annotations ({examples})")
    for cat_id in cat_ids:
        if per_category.get(cat_id, 0) == 0:
            report.warnings.append(f"category {cat_ids[cat_id]!r} (id {cat_id!r}) has no annotations")


def _check_box(bbox: Any, where: str, image: tuple[str, int, int] | None, report: CheckReport) -> None:
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        report.errors.append(f"{where} has a box with zero or negative size {bbox!r}")
        return
    if image is None:
        return
    name, width, height = image
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        report.errors.append(f"{where} box {bbox!r} lies outside its {width}x{height} image {name}")
