"""Where a command may write: one set of rules for every command, checked before any work is done.

- Inputs are never written: an output that is (or links to, or is a hard link of) an input is refused.
- An output of the wrong kind is refused: a file output that is a folder, a folder output that is a file,
  an output whose parent is a file or cannot be written to.
- An existing output is replaced only when that is a legitimate wish: a file the command itself writes
  (``suffixes``, e.g. a previous ``preds.json``) or with the command's force flag; anything else (a
  checkpoint under ``--out preds.json``'s name, a non-empty run folder) is refused, naming the flag.
- Writing that fails anyway (a full disk, a read-only file system) is one line naming the path
  (``writing``), and files are replaced atomically so the previous version survives a failure.

Every refusal is a ``DyheadError`` that says what to do instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError

from dyhead_cli.errors import DyheadError

Inputs = Mapping[str, "Path | str | None"] | Iterable[tuple[str, "Path | str | None"]]


def same_path(a: Path | str, b: Path | str) -> bool:
    """Whether ``a`` and ``b`` name the same file: one real path, or one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _pairs(inputs: Inputs) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else inputs
    return [(label, Path(p)) for label, p in items if p is not None and str(p) != ""]


def refuse_inputs(path: Path, option: str, inputs: Inputs) -> None:
    """``DyheadError`` when the output ``path`` is one of ``inputs`` (label -> path)."""
    for label, p in _pairs(inputs):
        if same_path(path, p):
            raise DyheadError(
                f"{option} {path} is the {label} this command reads: it would be overwritten; choose another {option}"
            )


def check_parent(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` must be a folder we may write into."""
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DyheadError(f"cannot write {option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise DyheadError(f"cannot write {option} {path}: the folder {parent} is not writable (read-only or no permission)")


def check_output_file(
    path: Path | str,
    option: str,
    inputs: Inputs = (),
    *,
    suffixes: Iterable[str] = (),
    force: bool = False,
    force_flag: str | None = None,
) -> Path:
    """Check a file the command will write (see the module docstring); return it as a ``Path``.

    ``suffixes``: the kinds of file the command writes there (``(".json",)``); an existing file with one of
    them is replaced, any other existing file only with ``force``. No suffixes: any existing file needs ``force``.
    """
    if not Path(path).name:  # "" (Path(".")), "/", "..": no file name at all
        raise DyheadError(f"{option} must name a file, got {str(path)!r}")
    path = Path(path)
    refuse_inputs(path, option, inputs)
    if path.is_dir():
        raise DyheadError(f"{option} {path} is a folder: give a file name inside it instead")
    if os.path.lexists(path) and not path.is_file() and not path.is_symlink():
        raise DyheadError(f"{option} {path} exists and is not a regular file")
    check_parent(path, option)
    if os.path.lexists(path) and not force:
        ours = tuple(s.lower() for s in suffixes)
        if not ours or path.suffix.lower() not in ours:
            how = f"pass {force_flag} to replace it, or " if force_flag else ""
            kind = f" (this command writes {', '.join(ours)} files there)" if ours else ""
            raise DyheadError(f"{option} {path} already exists{kind}: {how}choose another path")
        if path.suffix.lower() == ".json" and is_coco_annotation_file(path):
            how = f"pass {force_flag} to replace it, or " if force_flag else ""
            raise DyheadError(
                f"{option} {path} is a COCO annotation file, not an output of this command: {how}choose another path"
            )
    return path


def is_coco_annotation_file(path: Path) -> bool:
    """Whether an existing ``.json`` starts as a COCO annotation file (an object whose first 64 KiB hold an
    ``"images": [`` list of records with a ``"file_name"``) and is not one of our image lists
    (``"image_ids"``). A ``.json`` output may replace an earlier output of its kind (a benchmark report's
    ``"images"`` is a description), never a data set's annotations."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return (
        head.lstrip().startswith(b"{")
        and b'"image_ids"' not in head
        and re.search(rb'"images"\s*:\s*\[', head) is not None
        and b'"file_name"' in head
    )


def check_output_dir(
    path: Path | str,
    option: str,
    inputs: Inputs = (),
    *,
    must_be_empty: bool = False,
    exist_flag: str | None = None,
) -> Path:
    """Check a folder the command will write into; return it as a ``Path``.

    ``must_be_empty``: an existing non-empty folder is refused (a run folder) unless the caller passes
    ``must_be_empty=False`` because the user gave ``exist_flag``. An input folder is never an output folder.
    """
    path = Path(path)
    for label, p in _pairs(inputs):
        if same_path(path, p):
            raise DyheadError(f"{option} {path} is the {label} this command reads: choose another {option}")
    if os.path.lexists(path) and not path.is_dir():
        raise DyheadError(f"{option} {path} is a file, not a folder: give a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise DyheadError(f"cannot write into {option} {path}: the folder is not writable (read-only or no permission)")
        if must_be_empty and any(path.iterdir()):
            how = f"pass {exist_flag} to write into it anyway, or " if exist_flag else ""
            raise DyheadError(f"{option} {path} already exists and is not empty: {how}choose another folder")
    else:
        check_parent(path, option)
    return path


def check_distinct(outputs: Mapping[str, Path | str | None]) -> None:
    """Two outputs of one command must not be the same file (label -> path)."""
    items = [(label, Path(p)) for label, p in outputs.items() if p is not None]
    for i, (label_a, a) in enumerate(items):
        for label_b, b in items[i + 1 :]:
            if os.path.abspath(a) == os.path.abspath(b) or same_path(a, b):
                raise DyheadError(f"{label_a} and {label_b} are the same file {a}: give them different paths")


# ----------------------------------------------------------------------------------------------------
# writing


def describe_os_error(e: OSError, path: Path | str | None = None, verb: str = "write") -> str:
    """One line for a failed file operation: what, where, and for the usual causes what to do.

    Without ``path`` (an ``OSError`` that reached the CLI): the error's own file name(s), and "access" as
    the verb, since the CLI cannot know whether it was read or written.
    """
    if path is None:
        verb = "access" if verb == "write" else verb
        names = [str(n) for n in (e.filename, getattr(e, "filename2", None)) if n is not None]
        path = " -> ".join(names) if names else "a file"
    where = path
    reason = e.strerror or str(e) or type(e).__name__
    hints = {
        errno.ENOSPC: " (the disk is full: free some space)",
        errno.EDQUOT: " (disk quota exceeded)",
        errno.EROFS: " (read-only file system: choose a writable folder)",
        errno.EACCES: " (no permission: choose a folder you may write into)",
        errno.EPERM: " (not permitted: choose a folder you may write into)",
    }
    return f"cannot {verb} {where}: {reason}{hints.get(e.errno, '')}"


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` (or safetensors' I/O error) into a ``DyheadError`` naming it."""
    try:
        yield
    except OSError as e:
        raise DyheadError(describe_os_error(e, path)) from None
    except SafetensorError as e:
        found = re.search(r'message: "([^"]*)"', str(e))
        raise DyheadError(f"cannot write {path}: {found.group(1) if found else str(e).splitlines()[0]}") from None


def temporary_name(path: Path) -> Path:
    """A hidden name next to ``path`` for writing it atomically (same folder: ``os.replace`` is a rename)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: the old file survives any failure."""
    path = Path(path)
    tmp = temporary_name(path)
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
