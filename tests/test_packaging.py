"""The package as users get it: a wheel holds the recipes, and a plain install runs `dyhead train quickstart`
from an empty folder. The wheel is built from a copy of the sources without downloading anything
(`--no-deps --no-build-isolation`); the fresh virtual environment borrows torch & co. from this
machine (`--system-site-packages`) but gets dyhead from the wheel only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import dyhead_cli
from dyhead_cli.recipe import builtin_recipe_names

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dyhead_cli", src / "dyhead_cli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(work / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (work / "dist").glob("dyhead-*.whl")
    return built


def test_the_wheel_holds_the_recipes_version_and_entry_point(wheel):
    assert wheel.name.startswith(f"dyhead-{dyhead_cli.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
        entry_points = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
    for recipe in builtin_recipe_names():
        assert f"dyhead_cli/recipes/{recipe}.toml" in names
    assert "dyhead_cli/api.py" in names and "dyhead_cli/engine/predictor.py" in names
    assert f"Version: {dyhead_cli.__version__}" in metadata
    assert 'Requires-Dist: tomli>=1.1; python_version < "3.11"' in metadata
    assert "dyhead = dyhead_cli.cli:app" in entry_points


@pytest.mark.slow
def test_a_plain_install_trains_the_quickstart_from_an_empty_folder(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python, dyhead = env_dir / "bin" / "python", env_dir / "bin" / "dyhead"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import dyhead_cli; print(dyhead_cli.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=empty,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(env_dir)), f"dyhead_cli imported from {where}, not from the wheel"
    version = subprocess.run([str(dyhead), "--version"], capture_output=True, text=True, env=env, cwd=empty)
    assert version.stdout.strip() == f"dyhead {dyhead_cli.__version__}"
    train = subprocess.run(
        [
            str(dyhead),
            "train",
            "quickstart",
            "--out",
            "run",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.eval_every=0",
            "--set",
            "data.synthetic_num_train=4",
            "--set",
            "data.synthetic_num_val=2",
            "--set",
            "data.num_workers=0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=empty,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (empty / "run" / "last.safetensors").is_file() and (
        empty / "data" / "synthetic" / "annotations" / "train.json"
    ).is_file()
