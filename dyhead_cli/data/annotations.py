"""Reading COCO annotation files: the structure pycocotools relies on, checked with the record named."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dyhead_cli.errors import DyheadError

REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "categories": ("id",),
    "annotations": ("id", "image_id", "category_id", "bbox"),
}

def read_annotation_file(path: str | Path, require_annotations: bool = False) -> dict[str, Any]:
    """Load a COCO JSON file and check the structure pycocotools relies on; a ``DyheadError`` otherwise.

    'annotations' may be absent (test-dev style image lists) unless ``require_annotations``.
    """
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyheadError(f"annotation file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DyheadError(f"annotation file {path} must hold a JSON object, got {type(data).__name__}")
    if "annotations" not in data and not require_annotations:
        data["annotations"] = []
    for key, fields in REQUIRED_KEYS.items():
        if key not in data:
            raise DyheadError(f"annotation file {path} has no '{key}' list (is it a COCO detection file?)")
        if not isinstance(data[key], list):
            raise DyheadError(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DyheadError(f"annotation file {path}: {key}[{i}] lacks {', '.join(repr(f) for f in missing)}")
            bad = [f for f in ("id", "image_id", "category_id") if f in entry and not is_id(entry[f])]
            if bad:
                raise DyheadError(f"annotation file {path}: {key}[{i}] has a non-scalar {bad[0]!r}: {entry[bad[0]]!r}")
    if not data["categories"]:
        raise DyheadError(f"annotation file {path} has no categories")
    if not data["images"]:
        raise DyheadError(f"annotation file {path} lists no images")
    return data

def is_id(value: Any) -> bool:
    """Ids are dictionary keys in pycocotools: ints (or strings), never lists, floats or booleans."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)
