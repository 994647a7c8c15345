"""Reading reference checkpoints (``.pth``/``.pkl``/``.safetensors``) without ever running code a pickle names.

Torch files go through ``torch.load(weights_only=True)`` (NumPy arrays and scalars are the only extra types
allowed in), plain pickles (detectron2's ``.pkl``: a dict of NumPy arrays) through an unpickler that
resolves nothing but NumPy's array/dtype/scalar reconstructors. Anything else is refused with a one-line
message saying how to re-save the weights.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dyhead_cli.errors import DyheadError

# Top-level entries that hold the weights, in the order they are looked for:
# MMDetection {"meta", "state_dict", "optimizer"}, detectron2 {"model", "optimizer", "scheduler", "iteration"},
# detectron2 .pkl {"model", "__author__", "matching_heuristics"}.
WEIGHT_CONTAINERS = ("state_dict", "model", "module", "model_state_dict")


def _numpy_global(name: str) -> Any | None:
    """The NumPy object a pickle may name to rebuild arrays, dtypes and scalars (NumPy 1 or 2 spelling)."""
    core = getattr(np, "_core", None) or np.core
    table = {
        "numpy.core.multiarray._reconstruct": core.multiarray._reconstruct,
        "numpy._core.multiarray._reconstruct": core.multiarray._reconstruct,
        "numpy.core.multiarray.scalar": core.multiarray.scalar,
        "numpy._core.multiarray.scalar": core.multiarray.scalar,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    if name in table:
        return table[name]
    module, _, attr = name.rpartition(".")
    if module == "numpy.dtypes" and attr.endswith("DType") and hasattr(np, "dtypes"):
        obj = getattr(np.dtypes, attr, None)
        return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
    return None


class _RefusedGlobal(Exception):
    """A pickle named something outside the allowlist; carries the name."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Python's documented "restricting globals" unpickler: only NumPy's reconstructors resolve.

    Nothing the file names is called unless it is one of those (plus ``_codecs.encode`` for bytes written
    by protocol 2 and ``collections.OrderedDict``), so loading cannot run code from the file.
    """

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "_codecs.encode":
            import codecs

            return codecs.encode
        if full == "collections.OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        obj = _numpy_global(full)
        if obj is None:
            raise _RefusedGlobal(full)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("persistent id (a legacy torch file)")


def _resave_hint(path: Path) -> str:
    """What to do instead, in words: we never hand out a command that unpickles a file."""
    loader = "pickle (encoding='latin1')" if path.suffix == ".pkl" else "torch"
    return (
        f"if you trust the file, re-save only its weights: load it yourself with {loader}, take its "
        f"state dict ('model' or 'state_dict' entry) as tensors and save that with torch.save or "
        f"safetensors to {path.with_suffix('.weights.pth')}, then convert that file"
    )


def _refuse(path: Path, names: list[str]) -> DyheadError:
    shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    return DyheadError(
        f"{path} holds pickled Python objects ({shown}) that dyhead will not unpickle, since that can run "
        f"code; {_resave_hint(path)}"
    )


def _torch_load_zip(path: Path) -> Any:
    """``torch.load(weights_only=True)``; NumPy globals (e.g. in MMDetection's meta) are the only extras allowed."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    refused = [n for n in names if _numpy_global(n) is None]
    if refused or not names:
        raise _refuse(path, refused or ["an object torch refuses to load with weights_only=True"])
    # dtype instances are rebuilt through their concrete classes (numpy.dtypes.Float32DType, ...): allow those too.
    dtype_classes = [c for c in vars(getattr(np, "dtypes", object)).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    with torch.serialization.safe_globals([(_numpy_global(n), n) for n in names] + dtype_classes):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line), lines[0])
            raise _refuse(path, [reason[:160]]) from None


def _load_plain_pickle(path: Path) -> Any:
    """A plain pickle (detectron2 ``.pkl``), or a legacy (pre-zip) torch file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file, or one with objects torch refuses: try NumPy only
        pass
    data = path.read_bytes()
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _RefusedGlobal as e:
        raise _refuse(path, [str(e)]) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise DyheadError(f"{path} is neither a torch checkpoint nor a readable pickle: {e}") from None
    if isinstance(obj, int) and not isinstance(obj, bool):  # a legacy torch file starts with a magic number
        raise _refuse(path, ["a legacy torch file torch.load(weights_only=True) cannot read"])
    return obj


def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    if isinstance(value, np.generic):
        return torch.tensor(value.item())
    return value


def unwrap_weights(obj: Any, path: Path | str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(flat weights, info) from a loaded checkpoint object.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a DistributedDataParallel
    ``module.`` prefix; NumPy arrays become tensors. ``info`` has ``containers`` (top-level entries left out,
    e.g. the optimizer), ``meta`` (MMDetection's meta dict, if any) and ``not_tensors`` (weight-dict entries
    that are not arrays).
    """
    if not isinstance(obj, dict):
        raise DyheadError(f"{path} does not hold a dict of weights (got {type(obj).__name__})")
    info: dict[str, Any] = {"containers": [], "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {}}
    weights: Any = obj
    for key in WEIGHT_CONTAINERS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            weights = inner
            info["containers"] = sorted(str(k) for k in obj if k != key)
            break
    state: dict[str, Tensor] = {}
    not_tensors: list[str] = []
    for key, value in weights.items():
        value = _to_tensor(value)
        if torch.is_tensor(value):
            state[str(key)] = value
        else:
            not_tensors.append(str(key))
    if not state:
        raise DyheadError(f"{path} holds no tensors under {' / '.join(WEIGHT_CONTAINERS)} or at its top level")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    info["not_tensors"] = sorted(not_tensors)
    return state, info


def read_reference_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a reference checkpoint safely: (flat weights, info) as ``unwrap_weights`` returns them."""
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return unwrap_weights(load_file(str(path)), path)
        except (SafetensorError, OSError) as e:
            raise DyheadError(f"{path} is not a readable safetensors file: {e}") from None
    with warnings.catch_warnings():  # torch's notes on pickle protocols: our refusal, if any, is the one line
        warnings.simplefilter("ignore", UserWarning)
        obj = _torch_load_zip(path) if zipfile.is_zipfile(path) else _load_plain_pickle(path)
    return unwrap_weights(obj, path)
