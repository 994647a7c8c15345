"""Writing result files so that a crash never leaves half a file: a JSON array streamed to a temporary
name and renamed at the end, and the image list that goes with COCO results.

A failed write (full disk, read-only folder) is a ``DyheadError`` naming the file, the temporary file is
removed and the previous file at ``path`` is left as it was. File names that are not valid UTF-8 are
written with their odd bytes as ``\\xNN`` text (``json_safe``), so the JSON is valid for every reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dyhead_cli.engine.paths import temporary_name, writing


class JsonStream:
    """Write ``head``, then the items of one JSON array as they come, then ``tail``; atomically.

    The text goes to a temporary file next to ``path`` that replaces ``path`` on ``close()`` only, so an
    interrupted run never leaves a truncated file behind.
    """

    def __init__(self, path: Path, head: str = "[", tail: str = "\n]\n") -> None:
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.tail = tail
        self.count = 0
        self.file = None
        self.made = next((d for d in reversed(self.path.parents) if not d.exists()), None)  # removed by abort
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "w", encoding="utf-8")
            self._put(head)

    def _put(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError:
            self.abort()
            raise

    def write(self, items: Iterable[Any]) -> None:
        with writing(self.path):
            for item in items:
                self._put(("," if self.count else "") + "\n" + json.dumps(json_safe(item), separators=(",", ":")))
                self.count += 1

    def write_raw(self, text: str) -> None:
        """Text as is (the caller's JSON), e.g. the closing part of a hand-built object."""
        with writing(self.path):
            self._put(text)

    def close(self) -> None:
        with writing(self.path):
            try:
                self.file.write(self.tail)
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.tmp, self.path)
            except OSError:
                self.abort()
                raise

    def abort(self) -> None:
        """Drop the temporary file; ``path`` keeps whatever it held before."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass
        folder = self.path.parent
        while self.made is not None and folder.is_relative_to(self.made):  # the folders made for it, if empty
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent


def json_safe(value: Any) -> Any:
    """``value`` with every string made valid UTF-8: undecodable bytes of file names become ``\\xNN`` text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            text = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def images_json_path(out: Path) -> Path:
    """``preds.json`` -> ``preds.images.json`` (next to it)."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix.lower() == ".json" else out.name) + ".images.json")
