"""How a run looks on the console: a rich progress bar in a terminal, one plain line per ``log_every``
steps (and per evaluation) when the output goes to a file or a pipe, flushed at once so ``tail -f`` and
CI logs show it as it happens."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from dyhead_cli.commands.console import console
from dyhead_cli.engine.progress import Reporter


def duration(seconds: float | None) -> str:
    """1h02m, 4m05s, 12s."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def loss_terms(info: dict[str, Any]) -> str:
    return " ".join(f"{k[5:]} {v:.4f}" for k, v in info.items() if k.startswith("loss_"))


def step_line(step: int, info: dict[str, Any]) -> str:
    """``step 20/750  epoch 1/6  loss 1.2345 (cls 0.5 box 0.6 ctr 0.1)  lr 2.00e-03  41.2 img/s  eta 5m12s  mem 812 MB``."""
    return (
        f"step {step}/{info['total_steps']}  epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f} ({loss_terms(info)})  "
        f"lr {info['lr']:.2e}  {info['images_per_s']:.1f} img/s  eta {duration(info['eta_s'])}  mem {info['memory_mb']:.0f} MB"
    )


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.file.flush()


class LineReporter(Reporter):
    """Plain lines for logs: one per ``log_every`` steps, one per evaluation, the messages."""

    def __init__(self) -> None:
        self.eval_images = 0
        self.eval_done = 0
        self.next_report = 0.0

    def start(self, total_steps: int, completed: int) -> None:
        _say(f"training: {total_steps} steps" + (f", from step {completed}" if completed else ""))

    def step(self, step: int, info: dict[str, Any] | None) -> None:
        if info is not None:
            _say(step_line(step, info))

    def eval_start(self, num_images: int) -> None:
        self.eval_images, self.eval_done, self.next_report = num_images, 0, time.monotonic() + 30
        _say(f"eval: {num_images} images")

    def eval_advance(self, num_images: int) -> None:
        self.eval_done += num_images
        if time.monotonic() >= self.next_report:  # a sign of life on long evaluations, every 30 s
            self.next_report = time.monotonic() + 30
            _say(f"eval: {self.eval_done}/{self.eval_images} images")

    def eval_end(self, seconds: float) -> None:
        _say(f"eval: {self.eval_done} images in {seconds:.1f} s ({self.eval_done / max(seconds, 1e-9):.1f} img/s)")

    def message(self, text: str) -> None:
        _say(text)


class BarReporter(Reporter):
    """A rich progress bar: steps, latest loss/lr/speed, and an ETA that includes the evaluations; a second
    bar over the images while an evaluation runs."""

    def __init__(self, label: str = "train") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self.label = label
        self.task = None
        self.eval_task = None
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def start(self, total_steps: int, completed: int) -> None:
        self._start()
        self.task = self.progress.add_task(self.label, total=total_steps, completed=completed, info="", eta="?")

    def step(self, step: int, info: dict[str, Any] | None) -> None:
        if info is not None:
            self.progress.update(
                self.task,
                eta=duration(info["eta_s"]),
                info=f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.3f}  lr {info['lr']:.2e}  {info['images_per_s']:.1f} img/s  {info['memory_mb']:.0f} MB",
            )
        self.progress.update(self.task, completed=step)

    def eval_start(self, num_images: int) -> None:
        self._start()
        self.eval_task = self.progress.add_task("eval", total=num_images, info="", eta="")

    def eval_advance(self, num_images: int) -> None:
        self.progress.advance(self.eval_task, num_images)

    def eval_end(self, seconds: float) -> None:
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


def reporter_for_console(label: str = "train") -> Reporter:
    """The bar in a terminal, plain lines otherwise."""
    return BarReporter(label) if console.is_terminal else LineReporter()
