"""``dyhead train [RECIPE] [--out DIR | --resume DIR] [--force] [--set k=v]``: a progress bar in a terminal,
plain log lines otherwise (see ``commands.progress``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dyhead_cli.commands.progress import reporter_for_console
from dyhead_cli.engine.train import train_from_files


def run(recipe: Path | None, out: Path | None, resume: Path | None, overrides: list[str], force: bool = False) -> dict[str, Any]:
    return train_from_files(recipe, out, resume, overrides, reporter=reporter_for_console("train"), force=force)
