import pytest
from typer.testing import CliRunner

from dyhead_cli.cli import app

runner = CliRunner()
COMMANDS = ["train", "eval", "predict", "benchmark", "visualize", "convert", "data", "data synth", "data check"]


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["train", "eval", "predict", "benchmark", "visualize", "convert", "data"]:
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    result = runner.invoke(app, command.split() + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_bad_model_name_is_one_line_and_non_zero():
    result = runner.invoke(app, ["benchmark", "--model", "resnet5O"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown timm model 'resnet5O'" in lines[0] and "resnet50" in lines[0]
    assert "Traceback" not in result.output


def test_missing_recipe_is_one_line(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1
    assert "recipe file not found" in result.output and "Traceback" not in result.output
