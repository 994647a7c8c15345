import json
from pathlib import Path

import pytest
import tomllib

from dyhead_cli.engine import recipes
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe, dump_toml, load_recipe, recipe_from_dict, save_recipe, to_dict


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_recipe_maps_onto_dataclasses(tmp_path):
    r = load_recipe(write(tmp_path, '[model]\nhead = "fcos"\nnum_classes = 3\n[model.dyhead]\nnum_blocks = 2\n[train]\nlr = 1\n'))
    assert r.name == "r" and r.model.head == "fcos" and r.model.dyhead.num_blocks == 2
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)
    assert r.model.backbone.name == "resnet50"  # defaults fill the rest


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(DyheadError, match=r"unknown recipe key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_recipe(write(tmp_path, "[train]\nlrr = 0.1\n"))
    with pytest.raises(DyheadError, match=r"'model\.dyhead\.num_block'.*'model\.dyhead\.num_blocks'"):
        load_recipe(write(tmp_path, "[model.dyhead]\nnum_block = 3\n"))
    # other tools' names, not close in spelling: suggested through KEY_ALIASES
    for table, key, ours in (
        ("train", "learning_rate", "lr"),
        ("data", "workers", "num_workers"),
        ("train", "max_iter", "max_steps"),
    ):
        with pytest.raises(DyheadError, match=rf"unknown recipe key '{table}\.{key}' \(did you mean '{table}\.{ours}'\?\)"):
            load_recipe(write(tmp_path, f"[{table}]\n{key} = 1\n"))


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(DyheadError, match="train.epochs' must be of type int"):
        load_recipe(write(tmp_path, '[train]\nepochs = "ten"\n'))
    with pytest.raises(DyheadError, match=r"model.head' = 'atts' is not one of .*did you mean 'atss'"):
        recipes.load(write(tmp_path, '[model]\nhead = "atts"\n'))
    # every number has its range: Faster R-CNN's knobs too (a negative width was an internal error)
    for key, value in (("fc_dim", -5), ("roi_batch_size_per_image", 0), ("rpn_post_nms_top_n", 0)):
        with pytest.raises(DyheadError, match=rf"'model.rcnn.{key}' = {value} is out of range: it must be >= 1"):
            recipes.load(write(tmp_path, f"[model.rcnn]\n{key} = {value}\n"))


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.01\n")
    r = load_recipe(
        path, ["train.lr=0.02", "model.dyhead.num_blocks=0", "model.backbone.name=resnet18", "data.min_sizes=[320, 352]"]
    )
    assert r.train.lr == 0.02 and r.model.dyhead.num_blocks == 0
    assert r.model.backbone.name == "resnet18" and r.data.min_sizes == [320, 352]
    with pytest.raises(DyheadError, match="unknown recipe key 'train.lrate'"):
        load_recipe(path, ["train.lrate=1"])
    with pytest.raises(DyheadError, match="section.key=value"):
        load_recipe(path, ["train.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(DyheadError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(DyheadError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\n"))


def test_round_trip_through_toml(tmp_path):
    r = recipe_from_dict({"name": "x", "model": {"class_names": ["a", "b"], "num_classes": 2}, "train": {"lr_steps": [0.5]}})
    save_recipe(r, tmp_path / "out.toml")
    again = load_recipe(tmp_path / "out.toml")
    assert again == r
    assert tomllib.loads(dump_toml(to_dict(Recipe())))["model"]["dyhead"]["offset_mode"] == "official"


RECIPES = Path(__file__).resolve().parent.parent / "dyhead_cli" / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.model.backbone.name


def test_quickstart_recipe_runs_end_to_end_on_a_small_copy_of_its_data(tmp_path):
    """The quickstart's own model and data settings (RegNetX-200MF, colour-by-class shapes), shrunk."""
    from dyhead_cli.engine.train import train

    root = tmp_path / "synthetic"
    recipe = load_recipe(
        RECIPES / "quickstart.toml",
        [
            f"data.train_images={root}/train",
            f"data.train_ann={root}/annotations/train.json",
            f"data.val_images={root}/val",
            f"data.val_ann={root}/annotations/val.json",
            "data.synthetic_num_train=8",
            "data.synthetic_num_val=2",
            "data.num_workers=0",
            "train.epochs=1",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.eval_every=1",
        ],
    )
    assert recipe.model.backbone.name == "regnetx_002" and recipe.data.synthetic_colour_by_class
    train(recipe, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(evals[0])
    generator = json.loads((root / "annotations" / "train.json").read_text())["info"]["generator"]
    assert generator == {"num_images": 8, "image_size": 128, "seed": 0, "colour_by_class": True}
    assert (tmp_path / "run" / "last.safetensors").is_file()
