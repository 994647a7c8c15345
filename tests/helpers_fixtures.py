"""The reference fixtures in ``../shared/fixtures`` (made by running the official and MMDetection code).

They are read in place, never copied into the repository; tests that need them skip when ``../shared``
is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"

# fixture name -> (key format for convert_dyhead, the offset_mode our DyHead needs), as the README there says
TOWER_FIXTURES = {
    "official_a": ("official", "official"),
    "mmdet_release": ("mmdet", "official"),
    "mmdet_main": ("mmdet", "mmdet"),
}


def fixture_path(name: str) -> Path:
    """The path of a shared fixture file; skips the calling test when it is not there."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} is not available (../shared is absent)")
    return path


def load_tower_fixture(name: str) -> tuple[dict[str, str], dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``dyhead_parity_<name>.safetensors`` -> (metadata, reference state dict, inputs P3..P7, outputs P3..P7)."""
    with safe_open(str(fixture_path(f"dyhead_parity_{name}.safetensors")), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("state_dict.") :]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    n = len(json.loads(meta["sizes"]))
    return meta, state, [tensors[f"input.{i}"] for i in range(n)], [tensors[f"output.{i}"] for i in range(n)]
