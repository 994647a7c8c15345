"""``dyhead train RECIPE [--out DIR] [--resume DIR] [--set k=v]``: a rich progress bar over the steps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dyhead_cli.commands.console import console
from dyhead_cli.engine.train import Reporter, train_from_files


class ProgressReporter(Reporter):
    """A rich progress bar with the latest loss, lr and speed; messages printed above it."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def start(self, total_steps: int, completed: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=completed, info="")

    def step(self, step: int, info: dict[str, Any] | None) -> None:
        if info is not None:
            self.progress.update(self.task, info=f"loss {info['loss']:.3f}  lr {info['lr']:.2e}  {info['images_per_s']:.1f} img/s")
        self.progress.update(self.task, completed=step)

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        self.progress.stop()


def run(recipe: Path, out: Path | None, resume: Path | None, overrides: list[str]) -> dict[str, Any]:
    return train_from_files(recipe, out, resume, overrides, reporter=ProgressReporter())
