"""The machine a benchmark ran on: CPU (model, vector extensions), GPU, driver, versions, load, command line."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from dyhead_cli.engine.machine import cpu_description

# ----------------------------------------------------------------------------------------------------
# machine and command


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import timm
    import torchvision

    cpu = cpu_description()  # model name and vector extensions, one read of /proc/cpuinfo
    info: dict[str, Any] = {
        "cpu": cpu["model"],
        "cpu_vector_extensions": " ".join(cpu["vector_extensions"]),  # type: ignore[arg-type]
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_average_start": load_average(),
    }
    if device == "cuda":
        info.update(gpu_info())
    return info


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (e.g. 580.159.04): NVML, else nvidia-smi, else /proc; None if none answers."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError):
        m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m[1]
    return None


def gpu_info() -> dict[str, Any]:
    """The CUDA device and its software: name, memory, compute capability, driver, CUDA, cuDNN, TF32 flags,
    Triton, the fused deformable conv's configuration (or why it is unavailable) and the block end it runs."""
    from dyhead_cli.models import deform_triton, dyhead_cuda

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "gpu_memory_bytes": props.total_memory,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_multiprocessors": props.multi_processor_count,
        "driver": nvidia_driver(),
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        **deform_triton.describe(),
        "dyhead_epilogue": dyhead_cuda.EPILOGUE,
    }


def command_line() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)
