"""Bad recipes and bad annotation files: one line naming the key or the record, through real commands.

Recipes reach the commands through ``--recipe`` (predict, visualize) and ``--set``; annotation files as
predict's PATH, visualize's ``--ann`` and ``data check``'s ANN. Every case is generated here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomllib
from helpers_bad_inputs import coco_file, expect_refusal, invoke, make_checkpoint, snapshot, write_image

from dyhead_cli.data.annotations import read_annotation_file
from dyhead_cli.recipe import dump_toml

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_recipes")
    weights, recipe = make_checkpoint(root)
    image = write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.png", seed=1)
    return {"root": root, "weights": weights, "recipe": recipe, "image": image}


# ----------------------------------------------------------------------------------------------------
# recipes: (what to change in the tiny recipe, the key the one line must name)

RANGE_CASES = [
    ("train.lr", -0.1),
    ("train.lr", 0.0),
    ("train.epochs", -1),
    ("train.epochs", 0),
    ("train.log_every", 0),
    ("train.batch_size", 0),
    ("train.grad_accum", 0),
    ("train.ema_decay", 1.5),
    ("train.ema_decay", 1.0),
    ("train.momentum", -0.5),
    ("train.weight_decay", -1e-4),
    ("train.warmup_steps", -3),
    ("train.warmup_factor", 0.0),
    ("train.lr_steps", [0.5, 1.5]),
    ("train.lr_gamma", 0.0),
    ("train.clip_grad_norm", -1.0),
    ("train.seed", -1),
    ("train.max_steps", -5),
    ("train.checkpoint_every", -1),
    ("train.eval_every", -1),
    ("eval.batch_size", 0),
    ("data.num_workers", -1),
    ("data.num_workers", 100000),
    ("data.max_size", 100000),
    ("data.test_min_size", 0),
    ("data.min_sizes", []),
    ("data.min_sizes", [800, -1]),
    ("data.hflip_prob", 1.5),
    ("data.size_divisibility", 0),
    ("data.synthetic_image_size", 100000),
    ("data.synthetic_num_train", -1),
    ("model.num_classes", 0),
    ("model.pixel_std", [0.0, 1.0, 1.0]),
    ("model.pixel_mean", [1.0, 2.0]),
    ("model.fpn.channels", 0),
    ("model.fpn.channels", 40),
    ("model.dyhead.num_blocks", -1),
    ("model.backbone.frames_stages", 1),
    ("model.backbone.frozen_stages", -1),
    ("model.backbone.img_size", [224, 224, 3]),
    ("model.head_options.nms_thresh", 2.0),
    ("model.head_options.score_thresh", -0.1),
    ("model.head_options.prior_prob", 0.0),
    ("model.head_options.atss_topk", 0),
    ("model.head_options.detections_per_img", 0),
    ("model.head_options.anchor_offset", 2.0),
    ("model.head_options.pred_kernel_size", 2),
    ("model.head_options.focal_gamma", -1.0),
    ("train.lr", "fast"),
    ("train.lr", math.nan),
    ("train.optimizer", "sgdd"),
]


def _bad_recipe(root: Path, name: str, key: str, value) -> Path:
    """The tiny recipe with ``key`` (dotted) set to ``value``, written as TOML."""
    values = tomllib.loads((root / "tiny.toml").read_text())
    node = values
    *tables, last = key.split(".")
    for part in tables:
        node = node.setdefault(part, {})
    node[last] = value
    path = root / "recipes" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(dump_toml(values))
    return path


@pytest.mark.parametrize("command", ["predict", "visualize"])
@pytest.mark.parametrize("key, value", RANGE_CASES, ids=[f"{k}={v}" for k, v in RANGE_CASES])
def test_out_of_range_recipe_values_are_one_line_naming_the_key(world, tmp_path, command, key, value):
    recipe = _bad_recipe(world["root"], f"{command}-{key}", key, value)
    out = tmp_path / "out"
    args = [command, world["image"], "--weights", world["weights"], "--recipe", recipe, "--out"]
    args += [out / "preds.json"] if command == "predict" else [out]
    expect_refusal(args, f"'{key}'", protect=(world["root"], tmp_path))


OVERRIDE_CASES = [
    ("train.lr=-1", "train.lr"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("model.fpn.channels=24", "model.fpn.channels"),
    ("train.lr", "section.key=value"),
    ("train.lr.x=1", "train.lr"),
    ("name=a/b", "'name'"),
    ("nosuch.key=1", "nosuch"),
]


@pytest.mark.parametrize("override, mention", OVERRIDE_CASES)
def test_bad_overrides_are_one_line(world, tmp_path, override, mention):
    args = ["predict", world["image"], "--weights", world["weights"], "--out", tmp_path / "p.json", "--set", override]
    expect_refusal(args, mention, protect=(world["root"], tmp_path))


def _raw_recipe(root: Path, name: str, data: bytes) -> Path:
    path = root / "raw" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


RAW_RECIPES = [
    ("latin1.toml", 'name = "caf\xe9"\n'.encode("latin-1"), "not UTF-8"),
    ("broken.toml", b"[train\nlr = 1", "not valid TOML"),
    ("nested.toml", b"a = " + b"[" * 5000 + b"]" * 5000, "recipe"),
    ("markup[red]x[/red].toml", b"[train]\nlr = -1\n", "train.lr"),
]


@pytest.mark.parametrize("name, data, expect", RAW_RECIPES, ids=[r[0] for r in RAW_RECIPES])
def test_unreadable_recipe_files_are_one_line(world, tmp_path, name, data, expect):
    recipe = _raw_recipe(world["root"], name, data)
    args = ["predict", world["image"], "--weights", world["weights"], "--recipe", recipe, "--out", tmp_path / "p.json"]
    expect_refusal(args, expect, protect=(world["root"], tmp_path))


def test_recipe_that_is_a_folder_is_one_line(world, tmp_path):
    args = ["predict", world["image"], "--weights", world["weights"], "--recipe", tmp_path, "--out", tmp_path / "p.json"]
    expect_refusal(args, "is a folder", protect=(world["root"], tmp_path))


def test_eval_reads_the_recipe_with_the_same_checks(world, tmp_path):
    recipe = _bad_recipe(world["root"], "eval-lr", "train.lr", -0.1)
    expect_refusal(["eval", recipe, "--weights", world["weights"]], "'train.lr'", protect=(world["root"], tmp_path))


# ----------------------------------------------------------------------------------------------------
# annotation files: (images, annotations, categories, what the one line must name)

IMG = {"id": 1, "file_name": "a.png", "width": 64, "height": 64}
ANN = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "area": 100.0, "iscrowd": 0}
CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]

ANNOTATION_CASES = {
    "mixed-int-str-image-ids": ([IMG, dict(IMG, id="2", file_name="b.png")], [], CATS, "images[1].id must be an integer"),
    # string ids crashed training at its first batch (image ids) or first evaluation (category ids)
    "string-image-ids": ([dict(IMG, id="img1")], [], CATS, "images[0].id must be an integer id, as in COCO"),
    "string-category-ids": ([IMG], [], [{"id": "c1", "name": "x"}], "categories[0].id must be an integer id"),
    "file_name-null": ([dict(IMG, file_name=None)], [], CATS, "images[0].file_name"),
    "file_name-number": ([dict(IMG, file_name=7)], [], CATS, "images[0].file_name"),
    "file_name-missing": ([{"id": 1}], [], CATS, "images[0] lacks 'file_name'"),
    "image-id-list": ([dict(IMG, id=[1])], [], CATS, "images[0].id"),
    "image-id-bool": ([dict(IMG, id=True)], [], CATS, "images[0].id"),
    "image-not-object": ([IMG, "b.png"], [], CATS, "images[1] must be an object"),
    "width-negative": ([dict(IMG, width=-5)], [], CATS, "images[0].width"),
    "duplicate-image-ids": ([IMG, dict(IMG, file_name="b.png")], [], CATS, "images[1].id 1 is a duplicate"),
    "duplicate-category-ids": ([IMG], [], [*CATS, {"id": 1, "name": "again"}], "categories[2].id 1 is a duplicate"),
    "duplicate-category-names": ([IMG], [], [*CATS, {"id": 3, "name": "circle"}], 'categories[2].name "circle" is a duplicate'),
    "category-id-float": ([IMG], [], [{"id": 1.5, "name": "x"}], "categories[0].id"),
    "area-string": ([IMG], [dict(ANN, area="big")], CATS, "annotations[0].area"),
    "area-negative": ([IMG], [dict(ANN, area=-1)], CATS, "annotations[0].area"),
    "iscrowd-2": ([IMG], [dict(ANN, iscrowd=2)], CATS, "annotations[0].iscrowd"),
    "bbox-three": ([IMG], [dict(ANN, bbox=[1, 2, 3])], CATS, "annotations[0].bbox"),
    "bbox-nan-string": ([IMG], [dict(ANN, bbox=[1, 2, "3", 4])], CATS, "annotations[0].bbox"),
    "bbox-missing": ([IMG], [{k: v for k, v in ANN.items() if k != "bbox"}], CATS, "annotations[0] lacks 'bbox'"),
    "unknown-category": ([IMG], [dict(ANN, category_id=9)], CATS, "annotations[0].category_id: unknown category id 9"),
    "unknown-image": ([IMG], [dict(ANN, image_id=9)], CATS, "annotations[0].image_id: unknown image id 9"),
    "duplicate-annotation-ids": ([IMG], [ANN, dict(ANN)], CATS, "annotations[1].id 1 is a duplicate"),
    "annotation-not-object": ([IMG], [[1, 2]], CATS, "annotations[0] must be an object"),
    "no-categories": ([IMG], [], [], "no categories"),
    "no-images": ([], [], CATS, "lists no images"),
}


def _annotation_file(root: Path, name: str, images, annotations, categories) -> Path:
    folder = root / "anns"
    folder.mkdir(exist_ok=True)
    return coco_file(folder / f"{name}.json", images, annotations, categories)


@pytest.mark.parametrize("name", list(ANNOTATION_CASES))
def test_bad_annotation_records_are_one_line_naming_record_and_field(world, tmp_path, name):
    images, annotations, categories, expect = ANNOTATION_CASES[name]
    ann = _annotation_file(world["root"], name, images, annotations, categories)
    protect = (world["root"], tmp_path)
    predict = ["predict", ann, "--weights", world["weights"], "--images", world["root"] / "images", "--out", tmp_path / "p.json"]
    expect_refusal(predict, (str(ann), expect), protect=protect)
    visualize = ["visualize", "--ann", ann, "--images", world["root"] / "images", "--out", tmp_path / "vis"]
    expect_refusal(visualize, expect, protect=protect)


RAW_ANNOTATIONS = {
    "deeply-nested.json": (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    "latin1.json": ('{"images": "caf\xe9"}'.encode("latin-1"), "not valid JSON"),
    "array.json": (b"[1, 2]", "must hold a JSON object"),
    "images-object.json": (json.dumps({"images": {}, "categories": CATS}).encode(), "'images' must be a list"),
    "truncated.json": (b'{"images": [', "not valid JSON"),
}


@pytest.mark.parametrize("name", list(RAW_ANNOTATIONS))
def test_unreadable_annotation_files_are_one_line(world, tmp_path, name):
    data, expect = RAW_ANNOTATIONS[name]
    ann = world["root"] / "raw_anns" / name
    ann.parent.mkdir(exist_ok=True)
    ann.write_bytes(data)
    args = ["predict", ann, "--weights", world["weights"], "--images", world["root"] / "images", "--out", tmp_path / "p.json"]
    expect_refusal(args, expect, protect=(world["root"], tmp_path))


def test_annotation_file_that_is_a_folder_is_one_line(world, tmp_path):
    folder = tmp_path / "x.json"
    folder.mkdir()
    expect_refusal(["visualize", "--ann", folder, "--out", tmp_path / "vis"], "is a folder", protect=(world["root"], tmp_path))


def test_missing_iscrowd_and_area_are_filled_for_evaluation(world, tmp_path):
    """COCO evaluation reads both; a file without them evaluates (in memory), the file itself is not written."""
    from dyhead_cli.data.coco import CocoDetection
    from dyhead_cli.engine.evaluate import coco_evaluate

    bare = {k: v for k, v in ANN.items() if k not in ("iscrowd", "area")}
    ann = coco_file(tmp_path / "bare.json", [IMG], [bare], CATS)
    before = snapshot(ann)
    data = read_annotation_file(ann)
    assert data["annotations"][0]["iscrowd"] == 0 and data["annotations"][0]["area"] == 100.0
    dataset = CocoDetection(world["root"] / "images", ann)
    metrics = coco_evaluate(dataset.coco, [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "score": 0.9}])
    assert metrics["AP50"] == pytest.approx(100.0)
    assert snapshot(ann) == before


# ----------------------------------------------------------------------------------------------------
# data check: lists every problem (one line each), exit 1, and says when the images folder is missing


def test_data_check_names_a_missing_images_folder_and_an_empty_image_list(tmp_path):
    ann = coco_file(tmp_path / "ann.json", [IMG], [ANN], CATS)
    result = invoke(["data", "check", ann, "--images", tmp_path / "nowhere"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"image folder not found: {tmp_path / 'nowhere'}" in result.output
    assert result.output.count("image file not found") == 0  # one line for the folder, not one per image

    empty = coco_file(tmp_path / "empty.json", [], [], CATS)
    result = invoke(["data", "check", empty, "--images", tmp_path])
    assert result.exit_code == 1 and "lists no images" in result.output


def test_data_check_prints_markup_in_file_names_as_text(tmp_path):
    name = "[/red]x[bold].png"
    ann = coco_file(tmp_path / "ann[red]x[bold].json", [dict(IMG, file_name=name)], [ANN], CATS)
    result = invoke(["data", "check", ann, "--images", tmp_path])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"image file not found: {tmp_path / name}" in result.output


@pytest.mark.parametrize("name", ["mixed-int-str-image-ids", "area-string", "duplicate-category-ids", "file_name-null"])
def test_data_check_names_the_record_and_field_too(world, tmp_path, name):
    images, annotations, categories, expect = ANNOTATION_CASES[name]
    ann = coco_file(tmp_path / "ann.json", images, annotations, categories)
    result = invoke(["data", "check", ann, "--images", world["root"] / "images"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert expect in result.output


def test_data_check_of_a_deeply_nested_file_is_one_error(tmp_path):
    ann = tmp_path / "deep.json"
    ann.write_bytes(b"[" * 100000 + b"]" * 100000)
    result = invoke(["data", "check", ann, "--images", tmp_path])
    assert result.exit_code == 1 and "nested too deeply" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------------
# a recipe or a validation file that does not fit the checkpoint or the training file


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_recipe_that_changes_the_checkpoints_model_is_refused(world, tmp_path, command):
    # offset_mode changes what the tower computes, not a tensor's shape: the weights would load and mislead
    recipe = _bad_recipe(world["root"], f"{command}-offsets", "model.dyhead.offset_mode", "aligned")
    args = ["eval", recipe, "--weights", world["weights"]]
    if command == "predict":
        args = ["predict", world["image"], "--weights", world["weights"], "--recipe", recipe, "--out", tmp_path / "p.json"]
    expect = ("does not describe the model in", "model.dyhead.offset_mode is 'aligned' in the recipe but 'official'")
    expect_refusal(args, expect, protect=(world["root"], tmp_path))


def test_eval_matches_the_checkpoints_classes_by_name(world, tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 30], "area": 900.0, "iscrowd": 0}
    base = ["eval", world["recipe"], "--weights", world["weights"], "--set", f"data.val_images={world['root'] / 'images'}"]
    other = coco_file(tmp_path / "other.json", images, [ann], [{"id": 1, "name": "person"}, {"id": 2, "name": "square"}])
    expect = (f"annotation file {other} does not name the classes of", "calls id 1 'person', not 'circle'")
    expect_refusal([*base, "--set", f"data.val_ann={other}"], expect, protect=(world["root"], tmp_path))
    # the same classes under other ids are matched by name
    swapped = coco_file(tmp_path / "swapped.json", images, [ann], [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}])
    out = tmp_path / "m.json"
    result = invoke([*base, "--set", f"data.val_ann={swapped}", "--json", out])
    assert result.exit_code == 0, result.output + result.stderr
    assert list(json.loads(out.read_text())["per_class"]) == ["square", "circle"]


def test_train_refuses_a_validation_file_with_other_categories(world, tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 30], "area": 900.0, "iscrowd": 0}
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    train = coco_file(tmp_path / "train.json", images, [ann], cats)
    val = coco_file(tmp_path / "val.json", images, [ann], [*cats, {"id": 3, "name": "cross"}])
    sets = [f"data.train_ann={train}", f"data.val_ann={val}", f"data.train_images={world['root'] / 'images'}"]
    sets.append(f"data.val_images={world['root'] / 'images'}")
    args = ["train", world["recipe"], "--out", tmp_path / "run", *(x for s in sets for x in ("--set", s))]
    expect = (f"validation annotation file {val} lists other categories than {train}", "adds 'cross' (id 3)")
    expect_refusal(args, expect, protect=(world["root"], tmp_path))
