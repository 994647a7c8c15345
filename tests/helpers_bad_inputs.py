"""The harness of the bad-input tests: run a command the way a user would and check it failed well.

A failure is good when: the exit code is the documented one, stderr is exactly one readable line
(``error: ...``) naming what is wrong, nothing anywhere says "Traceback", no exception escaped, and no
file under the protected folders was written, changed or removed (hashes before and after).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from dyhead_cli.cli import app

runner = CliRunner()

TINY_RECIPE = """
name = "bad-inputs-tiny"

[model]
num_classes = 2
class_names = ["circle", "square"]

[model.backbone]
name = "test_resnet"
pretrained = false

[model.fpn]
channels = 32

[model.dyhead]
num_blocks = 1

[data]
val_images = "{root}/images"
val_ann = "{root}/ann.json"
train_images = "{root}/images"
train_ann = "{root}/ann.json"
min_sizes = [64]
max_size = 128
test_min_size = 64
num_workers = 0

[eval]
batch_size = 2
"""


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file (and link target) under ``roots``; a new, changed or lost file shows."""
    found: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if not root.is_dir() else [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            if p.is_symlink():
                found[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists():
                found[str(p)] = "special"
    return found


def invoke(args: list[Any], env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def check_clean_run(result) -> None:
    """No traceback, no escaped exception."""
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def expect_refusal(args: list[Any], expect: str | tuple[str, ...], protect: tuple[Path, ...] = (), code: int = 1, env=None):
    """Run ``args``; assert one ``error:`` line on stderr containing ``expect``, exit ``code``, files untouched."""
    before = snapshot(*protect)
    result = invoke(args, env)
    check_clean_run(result)
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in (expect,) if isinstance(expect, str) else expect:
        assert part in lines[0], (part, lines[0])
    after = snapshot(*protect)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return result


def write_image(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_checkpoint(root: Path, **backbone: Any) -> tuple[Path, Path]:
    """An untrained tiny detector saved as our checkpoint (recipe in its metadata); returns (weights, recipe)."""
    from dyhead_cli.engine.checkpoint import save_weights
    from dyhead_cli.engine.inference import build_for_weights
    from dyhead_cli.recipe import load_recipe, to_dict

    root.mkdir(parents=True, exist_ok=True)
    recipe_path = root / "tiny.toml"
    recipe_path.write_text(TINY_RECIPE.format(root=root.as_posix()))
    recipe = load_recipe(recipe_path)
    model = build_for_weights(recipe.model)
    for key, value in backbone.items():
        setattr(recipe.model.backbone, key, value)
    weights = root / "tiny.safetensors"
    save_weights(weights, model, to_dict(recipe))
    return weights, recipe_path


def coco_file(
    path: Path, images: list[dict], annotations: list[dict] | None = None, categories: list[dict] | None = None
) -> Path:
    import json

    data = {
        "images": images,
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }
    path.write_text(json.dumps(data))
    return path
