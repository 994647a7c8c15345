"""One exception type for every mistake a user can make; the CLI prints it as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DyheadError(Exception):
    """A problem with the user's input (recipe, data, weights, command line).

    The CLI catches it and prints ``error: <message>`` with exit code 1, never a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Slurm, ``docker stop``, Kubernetes) raised in the main thread as an
    interrupt, so that a command cleans up after it as after Ctrl-C (temporary files, a run's lock)."""


def suggest(name: str, choices: Iterable[str], n: int = 3, prefix: str = "") -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choices, or ``""`` when none is close; ``prefix``
    goes before each (``"train."``: a recipe key is suggested with its table)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?)"


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``DyheadError("<what> must be one of a, b, c, got 'x'")`` (with a close-match hint) unless
    ``value`` is one of ``choices``: the one wording of every list-of-choices check."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        hint = suggest(value, choices) if isinstance(value, str) else ""
        raise DyheadError(f"{what} must be one of {', '.join(choices)}, got {value!r}{hint}")


def first_line(error: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
