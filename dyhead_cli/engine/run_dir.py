"""The run directory: which folder a training may write to, its lock, leftovers of a killed run, and
what ``--resume`` may change.

Rules (each broken rule is one line that says what to do):
- ``--out`` is refused when it is a file, one of the run's inputs (recipe, data folders and files), a
  folder holding another run (``--resume`` it, or ``--force`` to start over), or a non-empty folder of
  other files (``--force`` to write there anyway).
- A training holds an exclusive lock on ``RUN/.lock`` while it writes; a second one is refused.
- ``--resume RUN`` takes RUN's ``recipe.toml``; ``--set`` may change only ``RESUME_SAFE`` keys, recorded in
  ``metrics.jsonl`` (``resume`` events, replayed by later resumes); ``recipe.toml`` itself is never
  rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dyhead_cli.engine import recipes
from dyhead_cli.engine.checkpoint import read_metadata
from dyhead_cli.engine.run_log import read_events
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe, apply_overrides, to_dict

STATE_FILE = "state.safetensors"
RECIPE_FILE = "recipe.toml"
# What a run directory holds; their presence marks a folder as a run, --force removes them.
RUN_FILES = (
    "recipe.toml",
    "metrics.jsonl",
    "metrics.csv",
    "state.safetensors",
    "last.safetensors",
    "best.safetensors",
    "env.json",
    "results.png",
    "val_predictions.json",
    "confusion_matrix.png",
    "pr_curves.png",
    ".state.safetensors.prev",
    ".last.safetensors.prev",
)
# Keys that --set may change on --resume, and why they are harmless mid-run.
RESUME_SAFE = {
    "train.epochs": "the schedule stretches to the new length",
    "train.max_steps": "the schedule stretches to the new length",
    "train.eval_every": "evaluation only",
    "train.log_every": "logging only",
    "train.checkpoint_every": "checkpointing only",
    "train.log_with": "logging only",
    "train.lr": "the way on after a diverged step",
    "train.clip_grad_norm": "the way on after a diverged step",
    "data.num_workers": "each sample's augmentation is seeded by its index, not by the worker",
    "data.skip_corrupt": "an unreadable image is skipped instead of ending the run; the data order stays the same",
    "eval.batch_size": "evaluation only",
}
# Keys a resumed run decides itself (recorded in the run, checked separately).
RESUME_OWN = {"train.mixed_precision", "train.device"}
# Keys a hand edit of RUN/recipe.toml may change (check_unedited): where the inputs are (data moved, the run
# resumed from another folder or machine; what they hold must be the same) and the run's name.
RELOCATABLE = {
    "name",
    "data.train_images",
    "data.train_ann",
    "data.val_images",
    "data.val_ann",
    "model.backbone.pretrained_file",
}


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in ("recipe.toml", "metrics.jsonl", STATE_FILE))


def check_out_dir(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output folder that is a file, an input, another run or a folder of other files."""
    out_r = out.resolve()
    if out.exists() and not out.is_dir():
        raise DyheadError(f"--out {out} is a file: give a folder for the run (a new or empty one)")
    for path in inputs:
        p = path.resolve()
        if p == out_r or (p.is_dir() and out_r.is_relative_to(p)):
            raise DyheadError(f"--out {out} is (or is inside) an input of the run ({path}): choose another folder")
        if p.parent == out_r and p.name in RUN_FILES:  # --force would have removed it, the run overwritten it
            raise DyheadError(f"--out {out} holds {path}, an input of the run that the run writes over: choose another folder")
    if out.is_dir() and not force:
        if is_run(out):
            if not (out / STATE_FILE).is_file():  # stopped (kill -9, a crash) before its first checkpoint
                raise DyheadError(
                    f"--out {out} holds a run that stopped before its first checkpoint (no {STATE_FILE}): nothing to "
                    "resume; start over in it with --force (its logs are replaced)"
                )
            raise DyheadError(
                f"--out {out} holds a run already: continue it with --resume {out}, or start over in it with --force "
                "(its checkpoints and logs are replaced)"
            )
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others:
            raise DyheadError(
                f"--out {out} is a folder with other files in it ({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}): "
                "choose a new or empty folder, or --force to write the run there"
            )


def check_writable(folder: Path) -> None:
    """Write and remove a probe in ``folder`` (or in its nearest existing parent when it does not exist
    yet): a read-only or full file system fails here, before any work, with one line."""
    probe_in = folder
    while not probe_in.exists():
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise DyheadError(f"cannot create the run folder {folder}: {probe_in} is a file")
        fd, name = tempfile.mkstemp(prefix=".dyhead-probe-", dir=probe_in)
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        raise DyheadError(f"cannot write to {probe_in}: {e.strerror or e}") from None


def forget_failed_start(folder: Path, created: bool) -> None:
    """After a new run failed before its first optimizer step (a model that cannot be built, too few
    images, Ctrl-C during the start; the caller knows whether a step was taken): remove what it wrote, its
    tracker logs included, and the folder if it made it. Left there, its ``recipe.toml`` made the folder
    "a run" that a retry with the same ``--out`` refused and ``--resume`` could not continue. A saved
    state is never removed."""
    if (folder / STATE_FILE).exists():
        return
    clear_run(folder)
    (folder / ".lock").unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):  # not empty: files of the user's
            folder.rmdir()


def clear_run(folder: Path) -> None:
    """--force: remove the files of an earlier run (and its tracker logs) from ``folder``."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for child in folder.iterdir():
        if child.is_dir() and (child.name in ("tensorboard", "mlruns", "wandb") or any(child.glob("events.out.tfevents.*"))):
            shutil.rmtree(child, ignore_errors=True)


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the life of the training (released when the process
    ends, even by ``kill -9``). Held by the main process only."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DyheadError(f"cannot write {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                owner = self.path.read_text().strip() or "?"
                raise DyheadError(
                    f"{self.path.parent} is in use by another training (pid {owner}); wait for it or choose another --out"
                ) from None
            raise DyheadError(f"cannot lock {self.path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete ``.*.tmp-PID`` files a killed run left behind (safe: we hold the run's lock)."""
    stale = sorted(folder.glob(".*.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------------
# checkpoints kept for a roll-back


def keep_previous(run_dir: Path) -> None:
    """Before a checkpoint is replaced, keep the current one as ``.state.prev``/``.last.prev`` (hard links:
    no copy, and a crash at any point leaves a complete file under each name)."""
    for name in (STATE_FILE, "last.safetensors"):
        current, previous = run_dir / name, run_dir / f".{name}.prev"
        if current.is_file():
            tmp = run_dir / f".{name}.prev.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.link(current, tmp)
            os.replace(tmp, previous)


def roll_back_if_poisoned(run_dir: Path, failed_step: int) -> int | None:
    """The step of the checkpoint to resume from after step ``failed_step`` failed; the checkpoint of step
    ``failed_step - 1`` (whose weights gave the non-finite values) is replaced by the previous one."""
    saved = saved_step(run_dir)
    if saved is None or saved < failed_step - 1:
        return saved
    previous = run_dir / f".{STATE_FILE}.prev"
    if not previous.is_file():
        return None
    os.replace(previous, run_dir / STATE_FILE)
    if (run_dir / ".last.safetensors.prev").is_file():
        os.replace(run_dir / ".last.safetensors.prev", run_dir / "last.safetensors")
    return saved_step(run_dir)


def saved_step(run_dir: Path) -> int | None:
    """The step ``state.safetensors`` holds (None without one)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(json.loads((f.metadata() or {})["counters"])["step"])


def best_ap(run_dir: Path) -> float:
    path = run_dir / "best.safetensors"
    if not path.is_file():
        return -1.0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return float(json.loads((f.metadata() or {}).get("AP", "-1")))


# ----------------------------------------------------------------------------------------------------
# resume


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _why(key: str) -> str:
    if key.startswith("model."):
        return "the checkpoint's weights were made for the old value"
    if key.startswith("data."):
        return "the data order and augmentation of the saved epoch depend on it"
    if key in ("train.batch_size", "train.grad_accum", "train.seed"):
        return "the saved position in the epoch's data order depends on it"
    return "the optimizer state and schedule of the run were made with the old value"


def saved_recipe(run: Path) -> Recipe:
    """The run's effective recipe: ``recipe.toml`` plus the changes earlier resumes recorded."""
    if not run.exists():
        raise DyheadError(f"--resume {run}: no such folder")
    if not run.is_dir():
        raise DyheadError(f"--resume {run} is a file: give the run's folder (the --out of the training)")
    if not (run / STATE_FILE).is_file():
        raise DyheadError(f"--resume {run}: no {STATE_FILE} there (was a checkpoint ever written?)")
    if not (run / RECIPE_FILE).is_file():
        raise DyheadError(f"--resume {run}: no {RECIPE_FILE} there")
    values = to_dict(recipes.load(run / RECIPE_FILE))
    overrides = [f"{key}={_toml(new)}" for changed in resume_changes(run) for key, (_, new) in changed.items()]
    return recipes.from_dict(values, overrides)


def resume_changes(run: Path) -> list[dict[str, list[Any]]]:
    """What each earlier ``--resume`` changed, in order: {key: [old, new]} of its ``resume`` event."""
    return [event.get("changed") or {} for event in read_events(run / "metrics.jsonl") if event.get("event") == "resume"]


def checkpoint_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe in a checkpoint's safetensors metadata, read from its header alone; None when the file is
    missing or not such a checkpoint."""
    try:
        recipe = json.loads((read_metadata(path) or {}).get("recipe", "null"))
    except (ValueError, TypeError):
        return None
    return recipe if isinstance(recipe, dict) else None


def check_unedited(run: Path, flat_saved: dict[str, Any]) -> None:
    """Refuse a ``recipe.toml`` edited since the run's last checkpoint (``last.safetensors`` keeps the recipe
    it was trained with): a hand edit would change the run silently, unlike ``--set``, which is checked and
    recorded. Keys the run resolves itself (``RESUME_OWN``) and the paths of its inputs and its name
    (``RELOCATABLE``: editing them is how a run follows its moved data) are not compared.

    Keys that may change on resume (``RESUME_SAFE``) change through ``--set``, recorded in metrics.jsonl and
    replayed over ``recipe.toml`` by later resumes: there the file must still hold the value the run started
    with (the first recorded change's old value, else the checkpoint's), or an edit would be overridden by a
    replayed change, or take effect unrecorded."""
    recorded = checkpoint_recipe(run / "last.safetensors")
    if recorded is None:
        return
    try:  # through the same loader as recipe.toml: a run from an older version compares like with like
        flat_recorded = json.loads(json.dumps(flatten(to_dict(recipes.from_dict(recorded)))))
    except DyheadError:
        return  # a recipe this version cannot read: nothing to compare with
    saved = json.loads(json.dumps(flat_saved))  # tuples -> lists, as on the other side
    for key, value in saved.items():
        if key in RESUME_SAFE or key in RESUME_OWN or key in RELOCATABLE or key not in flat_recorded:
            continue
        if flat_recorded[key] != value:
            raise _edited(run, key, value, f"{flat_recorded[key]!r} in its checkpoint last.safetensors")
    started = dict(flat_recorded)
    for changed in reversed(resume_changes(run)):  # the first change of a key sets what it started as
        started.update({key: old for key, (old, _new) in changed.items()})
    in_file = json.loads(json.dumps(flatten(to_dict(recipes.load(run / RECIPE_FILE)))))
    for key in RESUME_SAFE:
        if key in in_file and key in started and in_file[key] != started[key]:
            raise _edited(run, key, in_file[key], f"{started[key]!r} when the run started")


def _edited(run: Path, key: str, value: Any, before: str) -> DyheadError:
    return DyheadError(
        f"--resume {run}: its {RECIPE_FILE} was edited after the run started: {key} = {value!r} there, {before}. "
        f"A run continues with the recipe it started with: undo the edit (keys that may change mid-run go on the "
        f"command line, --set key=value; only the inputs' paths and the name may be edited there)"
    )


def resume_recipe(run: Path, recipe_path: Path | None, overrides: list[str]) -> tuple[Recipe, dict[str, list[Any]]]:
    """The recipe to continue ``run`` with, and the keys this resume changes ({key: [old, new]}).

    Without RECIPE it is the run's own; with RECIPE (as a check), the file must agree with the run apart
    from what the run resolved itself (class names, precision, device). ``--set`` may change only
    ``RESUME_SAFE`` keys; anything else is refused with the key and the reason.
    """
    saved = saved_recipe(run)
    base = to_dict(saved)
    flat_base = flatten(base)
    check_unedited(run, flat_base)
    if recipe_path is not None:
        given = flatten(to_dict(recipes.load(recipe_path, overrides)))
        if not given["model.class_names"] and given["model.num_classes"] == 80:
            given["model.class_names"], given["model.num_classes"] = (
                flat_base["model.class_names"],
                flat_base["model.num_classes"],
            )
        given["name"] = flat_base["name"]
    else:
        given = flatten(apply_overrides(to_dict(saved), overrides))
        recipes.from_dict(to_dict(saved), overrides)  # the same type and value checks as a fresh run
    changes = {k: [flat_base[k], given[k]] for k in flat_base if k not in RESUME_OWN and given.get(k) != flat_base[k]}
    for key, (old, new) in changes.items():
        if key not in RESUME_SAFE:
            where = f"{recipe_path} differs from the run's {RECIPE_FILE}" if recipe_path is not None else "--set"
            raise DyheadError(
                f"--resume {run}: {where} at {key} ({old!r} -> {new!r}); it cannot change mid-run: {_why(key)}. "
                f"Keys that may change: {', '.join(RESUME_SAFE)}"
            )
    values = apply_overrides(base, [f"{k}={_toml(v[1])}" for k, v in changes.items()])
    return recipes.from_dict(values), changes


def _toml(value: Any) -> str:
    from dyhead_cli.recipe import _toml_value

    return _toml_value(value)
