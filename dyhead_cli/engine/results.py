"""Writing result files so that a crash never leaves half a file: a JSON array streamed to a temporary
name and renamed at the end, and the image list that goes with COCO results."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
