"""Built-in recipes (shipped in the package), ``extends``, ``dyhead recipes``, ``--version``, Python 3.10."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dyhead_cli
from dyhead_cli.cli import app
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import builtin_recipe_names, builtin_recipe_text, load_recipe

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_builtin_recipes_load_by_name_and_by_the_readme_path_from_anywhere(tmp_path, monkeypatch):
    names = builtin_recipe_names()
    assert "quickstart" in names and "atss_r50_dyhead_1x_coco" in names and len(names) >= 9
    monkeypatch.chdir(tmp_path)  # an empty folder: no recipes/ here
    by_name = load_recipe("quickstart")
    assert by_name.name == "quickstart" and by_name.model.backbone.name == "regnetx_002"
    assert load_recipe("recipes/quickstart.toml") == by_name  # the README's path still works after pip install
    assert load_recipe("quickstart.toml") == by_name  # as the README's recipe table names them
    assert load_recipe(tmp_path / "old-clone" / "recipes" / "quickstart.toml") == by_name  # the old layout
    assert load_recipe("quickstart", ["train.lr=0.5"]).train.lr == 0.5
    with pytest.raises(DyheadError, match="did you mean 'quickstart'"):
        load_recipe("quickstrat")
    with pytest.raises(DyheadError, match=r"recipe file not found: elsewhere/quickstart.toml \(did you mean 'quickstart'"):
        load_recipe("elsewhere/quickstart.toml")  # only recipes/NAME.toml falls back to the built-in
    (tmp_path / "quickstart").write_text('name = "mine"\n[train]\nlr = 0.25\n')
    assert load_recipe("quickstart").train.lr == 0.25  # an existing file always wins over a built-in name


def test_extends_merges_tables_over_a_builtin_or_a_relative_file(tmp_path):
    child = tmp_path / "small.toml"
    child.write_text('extends = "quickstart"\n[model.dyhead]\nnum_blocks = 1\n[train]\nlr = 0.01\n')
    r, base = load_recipe(child), load_recipe("quickstart")
    assert r.name == "small"  # named after itself, not its base
    assert r.model.dyhead.num_blocks == 1 and r.train.lr == 0.01
    assert r.model.backbone.name == base.model.backbone.name == "regnetx_002"  # untouched keys inherited
    assert r.model.fpn.channels == 64 and r.train.schedule == "cosine" and r.data.min_sizes == [128]
    (tmp_path / "sub").mkdir()
    grandchild = tmp_path / "sub" / "tiny.toml"
    grandchild.write_text('extends = "../small.toml"\n[data]\nmin_sizes = [96, 112]\n')
    g = load_recipe(grandchild, ["train.epochs=1"])
    assert (g.name, g.model.dyhead.num_blocks, g.data.min_sizes, g.train.epochs) == ("tiny", 1, [96, 112], 1)
    loop_a, loop_b = tmp_path / "a.toml", tmp_path / "b.toml"
    loop_a.write_text('extends = "b.toml"\n')
    loop_b.write_text('extends = "a.toml"\n')
    with pytest.raises(DyheadError, match="goes round in a circle"):
        load_recipe(loop_a)
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "quickstrt"\n')
    with pytest.raises(DyheadError, match="bad.toml: extends = 'quickstrt': no recipe .*did you mean 'quickstart'"):
        load_recipe(bad)
    missing = tmp_path / "missing.toml"
    missing.write_text('extends = "gone/base.toml"\n')
    with pytest.raises(DyheadError, match=r"missing.toml: extends = 'gone/base.toml': recipe file not found"):
        load_recipe(missing)  # the file that names the missing base is named
    typo = tmp_path / "typo.toml"
    typo.write_text('extends = "quickstart"\n[train]\nlrr = 1.0\n')
    with pytest.raises(DyheadError, match="unknown recipe key 'train.lrr'"):
        load_recipe(typo)  # the merged recipe gets the usual checks


def test_recipes_command_lists_and_shows(tmp_path):
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    for name in builtin_recipe_names():
        assert name in result.output
    shown = runner.invoke(app, ["recipes", "show", "quickstart"])
    assert shown.exit_code == 0
    assert shown.stdout == builtin_recipe_text("quickstart")  # byte for byte: redirect it and edit
    mine = tmp_path / "my.toml"
    mine.write_text(shown.stdout)
    assert load_recipe(mine).model == load_recipe("quickstart").model
    missing = runner.invoke(app, ["recipes", "show", "nope"])
    assert missing.exit_code == 1 and "no built-in recipe 'nope'" in missing.output


def test_recipe_descriptions_are_whole_sentences():
    """The listing's description is the first comment line, continued while a bracket is open (the
    ResNeXt recipe's was cut after "(paper: 54.0 AP test-dev with DCN in the backbone;")."""
    from dyhead_cli.commands.recipes import describe

    for name in builtin_recipe_names():
        said = describe(builtin_recipe_text(name))
        assert said and said.count("(") == said.count(")"), (name, said)
    assert describe("# one (two\n# three) four\n# five\nname = 'x'\n") == "one (two three) four"
    assert describe("[model]\nhead = 'fcos'\n") == "fcos on resnet50"


def test_version():
    assert dyhead_cli.__version__ and dyhead_cli.__version__[0].isdigit()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dyhead {dyhead_cli.__version__}"


def test_import_dyhead_cli_alone_does_not_import_torch():
    code = "import sys, dyhead_cli; print(dyhead_cli.__version__, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    assert out == [dyhead_cli.__version__, "False"]


def python310() -> str | None:
    for candidate in (shutil.which("python3.10"), str(Path.home() / ".pyenv/versions/3.10.13/bin/python")):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"], capture_output=True, text=True
            )
            if probe.returncode == 0 and probe.stdout.strip() == "True":
                return candidate
    return None


@pytest.mark.skipif(python310() is None, reason="no Python 3.10 interpreter here")
def test_python_310_compiles_the_package_and_loads_recipes_through_tomli(tmp_path):
    """requires-python says >=3.10: every module must compile there, and recipes load through tomli
    (Python 3.10 has no tomllib; here pip's vendored copy of tomli stands in for the dependency)."""
    py = python310()
    copy = tmp_path / "src"
    shutil.copytree(REPO / "dyhead_cli", copy / "dyhead_cli", ignore=shutil.ignore_patterns("__pycache__"))
    compiled = subprocess.run([py, "-m", "compileall", "-q", str(copy / "dyhead_cli")], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr  # no 3.11-only syntax anywhere
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "tomli.py").write_text(
        "from pip._vendor.tomli import *  # noqa\nfrom pip._vendor.tomli import TOMLDecodeError, loads, load  # noqa\n"
    )
    code = (
        "import sys, tomli, dyhead_cli; from dyhead_cli.recipe import load_recipe; "
        "assert 'tomllib' not in sys.modules; r = load_recipe('quickstart', ['train.lr=0.5']); "
        "print(dyhead_cli.__version__, r.name, r.train.lr)"
    )
    result = subprocess.run(
        [py, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{copy}", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [dyhead_cli.__version__, "quickstart", "0.5"]
