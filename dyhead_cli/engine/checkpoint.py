"""Checkpoints: safetensors only, written atomically (temporary file, then rename).

A weights file (``last.safetensors``, ``best.safetensors``) carries everything needed to rebuild the
model in its metadata: the resolved recipe as JSON (model config, class names, offset mode). The
training state (``state.safetensors``: optimizer tensors, EMA, RNG) stores its non-tensor parts as JSON
metadata too, so nothing we write is a pickle.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dyhead_cli.errors import DyheadError

FORMAT = "dyhead/1"


def atomic_save(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a crash leaves either the old file or the new one, never half.

    A failed write (full disk, read-only folder) removes its temporary file and is one ``DyheadError``
    naming the path; the previous file stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise DyheadError(
            f"cannot write {path}: {e.strerror or e}" + ("; the previous file is intact" if path.exists() else "")
        ) from None
    except SafetensorError as e:
        _discard(tmp)
        raise DyheadError(f"cannot write {path}: {e}" + ("; the previous file is intact" if path.exists() else "")) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_save`` for a text file (recipe, predictions): the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise DyheadError(f"cannot write {path}: {e.strerror or e}") from None


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """A safetensors file's metadata, read from its header alone (no tensors); None when the file is missing
    or not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return None


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise DyheadError(f"{path} is not a readable safetensors file: {e}") from None


def save_weights(path: str | Path, model: nn.Module, recipe_dict: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Model weights + the resolved recipe (so ``--weights`` alone rebuilds the model)."""
    metadata = {"format": FORMAT, "recipe": json.dumps(recipe_dict)}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    atomic_save(dict(model.state_dict()), path, metadata)


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Return (state_dict, metadata with JSON values decoded)."""
    tensors, raw = read_safetensors(path)
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


def recipe_dict_from_checkpoint(path: str | Path) -> dict[str, Any]:
    _, meta = load_weights(path)
    if "recipe" not in meta:
        raise DyheadError(f"{path} carries no recipe in its metadata: pass --recipe, or convert it with 'dyhead convert'")
    return meta["recipe"]


def load_model_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise DyheadError(f"{source} does not fit the model: " + "; ".join(problems))
    # NaN or inf weights give no detections at all (every score NaN), which looked like a model that sees
    # nothing: refused, naming the tensors
    broken = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if broken:
        shown = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise DyheadError(f"{source} holds NaN or infinite values in {len(broken)} tensor(s) ({shown}): it cannot be used")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------
# training state


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_train_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
    ema: dict[str, Tensor] | None = None,
    model: dict[str, Tensor] | None = None,
) -> None:
    """Model, optimizer tensors, EMA weights and RNG as tensors; param groups, counters and RNG as JSON.

    The model weights live in the same file so that one atomic rename makes a consistent checkpoint.
    """
    opt = optimizer.state_dict()
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in (model or {}).items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    for name, value in (ema or {}).items():
        tensors[f"ema.{name}"] = value
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    metadata = {
        "format": FORMAT,
        "param_groups": json.dumps(opt["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "counters": json.dumps(counters),
        "rng": json.dumps(rng_meta),
    }
    atomic_save(tensors, path, metadata)


def load_train_state(path: str | Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Restore optimizer and RNG; return (counters, ema tensors)."""
    tensors, raw = read_safetensors(path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(raw["optimizer_scalars"]).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(raw["param_groups"])})
    set_rng_state(tensors, json.loads(raw["rng"]))
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    return json.loads(raw["counters"]), ema
