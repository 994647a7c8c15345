"""The consoles every command prints to, and how a user's mistake becomes one line and an exit code.

User-supplied text (file names, recipe names, messages quoting them) is printed as plain text: rich
markup in it is never interpreted and never breaks printing (``say``, ``note``, ``fail`` build ``Text``
objects; only our own constant labels are styled). File names that are not valid UTF-8 (Linux allows
any bytes) are shown with their odd bytes as ``\\xNN`` instead of failing to encode.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def printable(message: object) -> str:
    """``str(message)`` with lone surrogates (undecodable bytes of a file name) as ``\\xNN``."""
    text = str(message)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # surrogates that were not bytes
    return text


def styled(label: str, style: str, message: object) -> Text:
    """``label`` in ``style``, a space, then ``message`` as plain text (no markup, no highlighting)."""
    text = Text(label, style=style)
    text.append(" ")
    text.append(printable(message))
    return text


def fail(message: object, code: int = 1) -> None:
    """``error: <message>`` on stderr (the message as plain text, one line), then exit with ``code``."""
    one_line = " ".join(printable(message).split("\n"))
    err_console.print(styled("error:", "bold red", one_line), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def say(message: object, *, err: bool = False) -> None:
    """Print one line of plain text (no markup interpretation, no highlighting)."""
    (err_console if err else console).print(Text(printable(message)), highlight=False, soft_wrap=True)


def note(label: str, message: object, *, style: str = "yellow", err: bool = False, to: Console | None = None) -> None:
    """``label`` coloured, then ``message`` as plain text: ``note("skipped", "cannot read a.jpg")``."""
    target = to if to is not None else (err_console if err else console)
    target.print(styled(label, style, message), highlight=False, soft_wrap=True)
