"""What CPU a timing was measured on: model name and the vector extensions that decide its speed.

Why: the same model runs at very different ratios on CPUs of one brand (a Zen 4 core splits AVX-512
into two 256-bit halves, a Zen 5 core does not; MKL picks AVX2 kernels on AMD, oneDNN picks AVX-512),
so every speed figure is only meaningful next to the CPU's model and its vector extensions.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

# /proc/cpuinfo flags that matter for float32/bfloat16 GEMMs and convolutions, in the order printed
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "sve",
    "sve2",
    "sme",
)


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's "key: value" lines of /proc/cpuinfo (all processors repeat them)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_description(cpuinfo: str | None = None) -> dict[str, object]:
    """{"model": "AMD EPYC 9R14 ...", "vector_extensions": ["avx2", "avx512f", ...]} of this machine.

    ``cpuinfo``: the text of /proc/cpuinfo (read from the file when None; tests pass their own). On
    systems without it the model is ``platform.processor()`` and the extensions are unknown (empty).
    """
    if cpuinfo is None:
        cpuinfo = ""
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text()
    fields = _cpuinfo_fields(cpuinfo)
    model = fields.get("model name") or fields.get("cpu model") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def cpu_line(description: dict[str, object] | None = None) -> str:
    """One line for a report: "AMD EPYC (avx2 fma avx512f avx512_bf16 ...)"."""
    d = cpu_description() if description is None else description
    ext = " ".join(d["vector_extensions"]) or "vector extensions unknown"  # type: ignore[arg-type]
    return f"{d['model']} ({ext})"
