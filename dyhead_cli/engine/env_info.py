"""``env.json``: what a run was made with (package versions, CUDA, GPUs, command line, git commit, the
precision and device actually used), so that a result can be traced and repeated."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("dyhead", "torch", "torchvision", "timm", "accelerate", "numpy", "pycocotools", "safetensors", "albumentations")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(folder: Path) -> dict[str, Any] | None:
    """The commit of the git checkout ``folder`` is in (and whether it has uncommitted changes), if any."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, hardware and command line; ``extra`` (precision, device, processes) is merged in."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_threads": torch.get_num_threads(),
        "git": git_commit(Path(__file__).resolve().parent),
    }
    info.update(extra or {})
    return info


def write_env(path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``env.json`` (a resumed run appends its own environment under ``resumes``)."""
    from dyhead_cli.engine.run_log import write_error

    info = environment(extra)
    try:
        if path.is_file():
            first = json.loads(path.read_text())
            first.setdefault("resumes", []).append(info)
            path.write_text(json.dumps(first, indent=2))
        else:
            path.write_text(json.dumps(info, indent=2))
    except OSError as e:
        raise write_error(path, e) from None
    return info
