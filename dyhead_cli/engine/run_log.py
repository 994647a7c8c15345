"""What a run writes as it goes: ``metrics.jsonl`` (every event), ``metrics.csv`` (a row per logged step
and per evaluation) and the experiment trackers (TensorBoard, W&B, MLflow through Accelerate).

Every write is appended and flushed at once, so a crashed or killed run keeps all it logged. A write that
fails (full disk, read-only folder) is a ``DyheadError`` naming the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dyhead_cli.engine.checkpoint import atomic_write_text
from dyhead_cli.errors import DyheadError

CSV_FIXED = ["event", "step", "epoch", "loss"]
# Events of the training's progress: after a resume from step S, those past S happened in the part that
# was lost (killed, stopped on a non-finite loss) and are done again. Other events (error, interrupted,
# resume) are the record of what happened, kept.
PROGRESS_EVENTS = ("train", "eval", "epoch", "checkpoint")
CSV_TAIL = ["lr", "images_per_s", "skipped", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]


def write_error(path: Path, error: OSError) -> DyheadError:
    """One line for a failed write: the path and the system's reason (e.g. 'No space left on device')."""
    return DyheadError(f"cannot write {path}: {error.strerror or error}")


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a ``metrics.jsonl`` (a line cut short by a kill is ignored)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a line-per-record file back to its last complete line (no-op when it ends with a newline)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        return
    except OSError as e:
        raise write_error(path, e) from None


class MetricsLog:
    """``metrics.jsonl`` + ``metrics.csv`` + trackers; silent on every process but the main one.

    ``tracker`` is called with (values, step) for the scalars of ``train`` and ``eval`` events (it is
    ``accelerator.log`` when ``train.log_with`` names trackers).
    """

    def __init__(self, run_dir: Path, enabled: bool, tracker: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.enabled = enabled
        self.tracker = tracker
        self.columns: list[str] | None = None
        if enabled:  # a run killed mid-write left half a line: appending after it would break the file
            drop_torn_tail(self.path)
            drop_torn_tail(self.csv_path)
        if self.csv_path.is_file():  # a resumed run keeps the columns it started with
            with open(self.csv_path, newline="") as f:
                self.columns = next(csv.reader(f), None)

    def rewind(self, step: int) -> None:
        """Drop the progress events past ``step`` (the checkpoint a resume starts from) from both files, so
        the steps done again appear once, with the numbers of the run that goes on."""
        if not self.enabled:
            return
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not _past(line, step)]
            if len(kept) < len(lines):
                atomic_write_text(self.path, "".join(kept))
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            kept_rows = rows[:1] + [r for r in rows[1:] if not (len(r) > 1 and r[1].isdigit() and int(r[1]) > step)]
            if len(kept_rows) < len(rows):
                with open(self.csv_path.with_suffix(".csv.tmp"), "w", newline="") as f:
                    csv.writer(f).writerows(kept_rows)
                os.replace(self.csv_path.with_suffix(".csv.tmp"), self.csv_path)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=False, default=_jsonable) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from None
        except ValueError:  # NaN somewhere (an undefined AP): JSON has null for it
            with open(self.path, "a") as f:
                f.write(json.dumps(_nan_to_none(row)) + "\n")
        if event in ("train", "eval"):
            self._csv(row)
            if self.tracker is not None:
                scalars = {f"{event}/{k}": float(v) for k, v in fields.items() if _is_number(v) and k not in ("step", "epoch")}
                self.tracker(scalars, int(fields["step"]))

    def _csv(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            losses = sorted(k for k in row if k.startswith("loss_"))
            self.columns = CSV_FIXED + losses + CSV_TAIL
        try:
            new = not self.csv_path.is_file()
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(self.columns)
                writer.writerow([_cell(row.get(c)) for c in self.columns])
        except OSError as e:
            raise write_error(self.csv_path, e) from None


def _past(line: str, step: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a progress event past ``step`` (a line that is not JSON is kept)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(event, dict)
        and event.get("event") in PROGRESS_EVENTS
        and isinstance(event.get("step"), int)
        and event["step"] > step
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return str(v)


def _jsonable(v: Any) -> Any:
    return float(v) if hasattr(v, "__float__") else str(v)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v
