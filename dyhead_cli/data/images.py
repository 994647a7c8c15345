"""Which images a command works on, and reading them: folders, file lists, a COCO file's image list.

Every command that takes images (``predict``, ``visualize``, the data sets) reads them through
``load_rgb`` (EXIF orientation applied, any PIL mode to RGB) and lists folders through ``find_images``.

Videos (by extension, or any named file OpenCV opens that PIL does not) give one entry per frame, or per
``vid_stride``-th frame, named ``clip.mp4#frame=000012`` (see ``data/video.py``).

Image ids: with an annotation file, its own ids. Otherwise, when every image's file stem is a number
(COCO's ``000000000139.jpg``) and no two are the same, that number, so results load against the
matching annotation file; else 1..N in the order of the sorted relative paths (relative to the deepest
folder holding every input, ``root``; a video's frames in order). ``ImageList.id_rule`` says which.
A named file that is neither an image nor a video is listed in ``ImageList.ignored``.
Annotation files: an image's ``file_name`` is looked up under ``images_dir`` when given; else under the
recipe's ``data.val_images`` (or ``train_images``) when the file is the recipe's ``data.val_ann`` (or
``train_ann``); else under the annotation file's own folder.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from dyhead_cli.data.annotations import read_annotation_file
from dyhead_cli.data.transforms import test_transform
from dyhead_cli.data.video import VIDEO_EXTENSIONS, FrameReader, frame_name, is_video_file, video_info
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as displayed (EXIF orientation applied) in RGB; a ``DyheadError`` naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except IMAGE_ERRORS as e:
        raise DyheadError(f"cannot read image {path}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit greys are scaled to 0..255."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16-bit images: 0..65535 -> 0..255 for every image (as OpenCV reads them), so one scale holds for a
        # whole data set; 32-bit ones the same unless they hold 8-bit values, or values past 65535 (their peak)
        grey = np.asarray(im, dtype=np.float32)
        peak = float(grey.max()) if grey.size else 0.0
        if im.mode.startswith("I;16") or peak > 255:
            grey = grey * (255.0 / max(65535.0, peak))
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@dataclass
class ImageEntry:
    id: int
    path: Path  # where to read it
    file_name: str  # as written to the image list (relative to ``root``, or the annotation file's name)
    frame: int | None = None  # a video's frame number (``path`` is the video)


ID_RULES = ("annotation file", "file stems", "sorted paths 1..N")


@dataclass
class ImageList:
    entries: list[ImageEntry]
    root: Path | None = None  # file names are relative to this folder
    ann_file: Path | None = None
    ann_categories: list[dict[str, Any]] | None = None  # the annotation file's categories, sorted by id
    id_rule: str = "sorted paths 1..N"  # one of ID_RULES: where the image ids come from
    ignored: list[str] = field(default_factory=list)  # "name: why" for named files that are no image or video
    video_fps: dict[Path, float] = field(default_factory=dict)  # per video: its frame rate


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: Path, seen: set[str] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Files under ``folder`` with one of ``extensions`` (recursive, case-insensitive), sorted; hidden files
    skipped.

    Symbolic links are followed, but each real folder is entered and each real file listed once: a link
    loop ends, and an image reached by two paths is listed under the first (in sorted order). ``seen``
    (real paths) carries this across several folders of one command line.
    """
    seen = set() if seen is None else seen
    found: list[Path] = []
    real = os.path.realpath(folder)
    if real in seen:
        return found
    seen.add(real)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            target = os.path.realpath(os.path.join(dirpath, d))
            if target not in seen:  # a loop, or a folder already listed through another path
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in extensions):
            path = Path(dirpath) / f
            target = os.path.realpath(path)
            if target not in seen:
                seen.add(target)
                found.append(path)
    return sorted(found)


def collect_images(
    paths: Sequence[Path], images_dir: Path | None = None, recipe: Recipe | None = None, vid_stride: int = 1
) -> ImageList:
    """Turn the command line's PATHs into numbered images (see the module docstring for the rules)."""
    if not paths:
        raise DyheadError("give at least one image, video, folder or COCO annotation file")
    if vid_stride < 1:
        raise DyheadError(f"--vid-stride must be at least 1, got {vid_stride}")
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
    files: dict[Path, str] = {}  # path -> "image" | "video"
    seen: set[str] = set()  # real paths already listed (find_images)
    bases: list[Path] = []
    ignored: list[str] = []
    for p in paths:
        p = absolute(p)  # absolute, symlinks kept: a linked image is named where it is linked
        if p.is_dir():
            bases.append(p)
            for f in find_images(p, seen, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
                files.setdefault(f, "video" if is_video_file(f) else "image")
        else:
            kind = media_kind(p)
            if kind is None:
                ignored.append(f"{p.name}: not an image or video")
                continue
            bases.append(p.parent)
            files.setdefault(p, kind)
    found = []  # (name, path, frame)
    fps: dict[Path, float] = {}
    root = Path(os.path.commonpath([str(b) for b in bases])) if bases else None
    for f, kind in files.items():
        name = f.relative_to(root).as_posix()
        if kind == "image":
            found.append((name, f, None))
            continue
        info = video_info(f)
        if info is None:
            ignored.append(f"{name}: cannot open as a video")
            continue
        fps[f] = info[1]
        found.extend((frame_name(name, k), f, k) for k in range(0, info[0], vid_stride))
    if not found:
        where = ", ".join(str(p) for p in paths)
        why = f" ({'; '.join(ignored)})" if ignored else ""
        raise DyheadError(
            f"no images found in {where}{why} (image and video extensions: {' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})"
        )
    found.sort(key=lambda t: (t[1].relative_to(root).as_posix(), -1 if t[2] is None else t[2]))
    ids, rule = number_images([(name, frame) for name, _, frame in found])
    entries = [ImageEntry(i, f, name, frame) for i, (name, f, frame) in zip(ids, found)]
    return ImageList(entries, root=root, id_rule=rule, ignored=ignored, video_fps=fps)


def number_images(names: Sequence[tuple[str, int | None]]) -> tuple[list[int], str]:
    """Image ids for (file name, frame) pairs in order: the file stems when all are distinct numbers, else 1..N."""
    stems = [Path(name).stem for name, frame in names if frame is None]
    if len(stems) == len(names) and all(s.isdigit() and s.isascii() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return ids, "file stems"
    return list(range(1, len(names) + 1)), "sorted paths 1..N"


def media_kind(path: Path) -> str | None:
    """ "image" or "video" for a named file: by extension, else by what PIL / OpenCV can open; None: neither."""
    if is_image_file(path):
        return "image"
    if is_video_file(path):
        return "video"
    try:
        with Image.open(path):
            return "image"
    except IMAGE_ERRORS:
        pass
    return "video" if video_info(path) is not None else None


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
    return ImageList(entries, root=absolute(images_dir), ann_file=ann_file, ann_categories=cats, id_rule="annotation file")


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


class ImageFiles(Dataset):
    """The images of an ``ImageList`` through the recipe's test transform.

    Items are what ``data.loaders.collate`` stacks (no boxes), or ``{"error": message, ...}`` for an
    image that cannot be read, so a worker never dies on a bad file. ``keep_original`` adds the
    (H, W, 3) uint8 RGB pixels as read (to draw on). ``windows(h, w)`` (tiled inference) returns crop
    boxes (x0, y0, x1, y1); each crop then goes through the transform on its own, as ``tiles``.
    """

    def __init__(
        self,
        entries: list[ImageEntry],
        min_size: int,
        max_size: int,
        keep_original: bool = False,
        windows: Callable[[int, int], list[tuple[int, int, int, int]]] | None = None,
        resize_backend: str = "cv2",
    ) -> None:
        self.entries = entries
        self.transform = test_transform(min_size, max_size, resize_backend)
        self.keep_original = keep_original
        self.windows = windows
        self.frames: FrameReader | None = None  # opened in the process that reads (never pickled open)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "frames": None}

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, entry: ImageEntry) -> np.ndarray:
        """The (H, W, 3) uint8 RGB pixels of an entry (a file, or a video's frame)."""
        if entry.frame is None:
            return np.asarray(load_rgb(entry.path))
        if self.frames is None:
            self.frames = FrameReader()
        return self.frames.read(entry.path, entry.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            return self.prepare(self.read(entry), entry.id, entry.file_name)
        except Exception as e:  # noqa: BLE001 - any failure on one file is that file's problem, never the run's
            message = str(e) if isinstance(e, DyheadError) else f"cannot read image {entry.path}: {type(e).__name__}: {e}"
            return {"error": message, "image_id": entry.id, "file_name": entry.file_name}

    def prepare(self, rgb: np.ndarray, image_id: int, file_name: str) -> dict[str, Any]:
        """One item from (H, W, 3) uint8 RGB pixels: the resized image, its sizes, maybe tiles and the original."""
        item = dict(self.transformed(rgb), image_id=image_id, file_name=file_name)
        height, width = rgb.shape[:2]
        if self.windows is not None:
            tiles = [dict(item, offset=(0, 0))]  # the whole image too: large objects stay whole
            for x0, y0, x1, y1 in self.windows(height, width):
                crop = self.transformed(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
                tiles.append(dict(crop, image_id=image_id, file_name=file_name, offset=(x0, y0)))
            item["tiles"] = tiles
        if self.keep_original:
            item["original"] = rgb
        return item

    def transformed(self, rgb: np.ndarray) -> dict[str, Any]:
        height, width = rgb.shape[:2]
        pixels = self.transform(image=rgb, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),  # (H, W, 3) -> (3, H, W)
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "orig_size": (height, width),
            "size": (int(pixels.shape[0]), int(pixels.shape[1])),
        }
