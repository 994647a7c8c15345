"""The consoles every command prints to, and how a user's mistake becomes one line and an exit code.

User-supplied text (file names, recipe names, messages quoting them) is printed as plain text: rich
markup in it is never interpreted (``markup=False`` / ``escape``).
"""
from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    """``error: <message>`` on stderr (the message as plain text), then exit with ``code``."""
    err_console.print("[bold red]error:[/] ", end="", highlight=False)
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def say(message: str, *, err: bool = False) -> None:
    """Print one line of plain text (no markup interpretation, no highlighting)."""
    (err_console if err else console).print(message, markup=False, highlight=False, soft_wrap=True)
