"""benchmarks/gpu_check.py on a machine without CUDA: it says so and exits 0, its plan lists every step, and
its two ``pytest -m gpu`` runs split the GPU tests between them: the tests of a trained run, and the rest."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


def planned_steps() -> dict[str, list[str]]:
    """Step name -> argv, from ``--dry-run`` (lines "# NAME (timeout ...)" then the command)."""
    result = run(str(SCRIPT), "--dry-run", "--work", "/tmp/gpu_check_plan")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return {head[2:].split(" (timeout")[0]: shlex.split(cmd) for head, cmd in zip(lines[::2], lines[1::2], strict=True)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    result = run(str(SCRIPT), "--out", str(tmp_path / "out"))
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == ["gpu_check: no CUDA device on this machine; nothing to check"]
    assert not (tmp_path / "out").exists()


def test_the_plan_has_every_check_the_issue_lists() -> None:
    steps = planned_steps()
    names = list(steps)
    assert [n for n in names if n.startswith("pytest -m gpu")] == ["pytest -m gpu (CLI)", "pytest -m gpu (others)"]
    for precision in ("fp16", "bf16"):
        cmd = steps[f"train {precision}"]
        assert cmd[cmd.index("--mixed_precision") + 1] == precision and "accelerate.commands.launch" in cmd
    assert "--half" in steps["predict --half"]
    for precision in ("fp32", "bf16", "fp16"):
        cmd = steps[f"benchmark {precision}"]
        assert {"--gpu", "--compare", "800x1333", "1,8"} <= set(cmd)
        assert cmd[cmd.index("--precision") + 1] == precision


def test_the_two_pytest_runs_split_the_gpu_tests() -> None:
    steps = planned_steps()
    cli, others = (steps[f"pytest -m gpu ({name})"] for name in ("CLI", "others"))
    assert others[-1] == f"not ({cli[-1]})" and cli[:-1] == others[:-1]  # the rest: each test in one run
    result = run(
        "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k", cli[-1]
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert sorted(line.split("::")[1] for line in result.stdout.splitlines() if "::" in line) == [
        "test_checkpoint_written_on_cuda_loads_on_cpu",
        "test_predict_and_eval_on_cuda_agree_with_cpu",
    ]
