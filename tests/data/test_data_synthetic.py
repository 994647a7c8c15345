"""The synthetic shapes set: deterministic, non-contiguous category ids, tight boxes, wide size range."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyhead_cli.data import synthetic
from dyhead_cli.data.coco import CocoDetection
from dyhead_cli.data.synthetic import CATEGORIES, ensure_synthetic, make_synthetic_coco, render_image
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import DataConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=40, num_val=6, image_size=256, seed=3)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / "a", 6, 2, image_size=96, seed=5)
    b = make_synthetic_coco(tmp_path / "b", 6, 2, image_size=96, seed=5)
    c = make_synthetic_coco(tmp_path / "c", 6, 2, image_size=96, seed=6)
    for split in ("train", "val"):
        assert Path(a[f"{split}_ann"]).read_bytes() == Path(b[f"{split}_ann"]).read_bytes()
        assert Path(a[f"{split}_ann"]).read_bytes() != Path(c[f"{split}_ann"]).read_bytes()
    files_a = sorted((tmp_path / "a" / "train").iterdir())
    assert len(files_a) == 6
    for f in files_a:
        assert f.read_bytes() == (tmp_path / "b" / "train" / f.name).read_bytes()
    assert files_a[0].read_bytes() != (tmp_path / "c" / "train" / files_a[0].name).read_bytes()
    # train and val are different images, not the same stream twice
    assert files_a[0].read_bytes() != (tmp_path / "a" / "val" / files_a[0].name).read_bytes()


def test_annotations_are_complete_coco(shapes: dict) -> None:
    data = json.loads(Path(shapes["train_ann"]).read_text())
    assert [c["id"] for c in data["categories"]] == [1, 3, 7, 10]
    assert len(data["images"]) == shapes["num_train"] == 40
    assert len(data["annotations"]) == shapes["num_train_annotations"]
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    for img in data["images"]:
        assert (Path(shapes["train_images"]) / img["file_name"]).is_file()
        assert (img["width"], img["height"]) == (256, 256)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 3, 7, 10)
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 256 and y + h <= 256
        assert 0 < ann["area"] <= w * h  # visible pixels inside the box


def test_objects_span_small_to_large(shapes: dict) -> None:
    data = json.loads(Path(shapes["train_ann"]).read_text())
    sides = np.array([max(a["bbox"][2:]) for a in data["annotations"]])
    assert sides.min() <= 16  # small objects exist
    assert sides.max() >= 0.4 * 256  # and large ones
    assert {a["category_id"] for a in data["annotations"]} == {1, 3, 7, 10}


def test_boxes_are_tight_around_the_drawn_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a black background (no JPEG) every box edge touches a shape and the boxes cover every shape pixel."""
    monkeypatch.setattr(synthetic, "_background", lambda rng, size: np.zeros((size, size, 3), np.float32))
    for index in range(12):
        pixels, objects = render_image(np.random.default_rng([9, index]), 128)
        fg = pixels.max(axis=2) > 60  # shapes have a bright channel (v >= 0.65); the background is 0
        covered = np.zeros_like(fg)
        for _, (x, y, w, h), area in objects:
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            inside = fg[y : y + h, x : x + w]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert area >= 0.2 * w * h
            covered[y : y + h, x : x + w] = True
        assert not (fg & ~covered).any()


def test_category_gaps_map_to_contiguous_labels_and_back(shapes: dict) -> None:
    ds = CocoDetection(shapes["train_images"], shapes["train_ann"])
    assert ds.cat_ids == [1, 3, 7, 10]
    assert ds.class_names == [c["name"] for c in CATEGORIES]
    assert ds.label_of_cat == {1: 0, 3: 1, 7: 2, 10: 3}
    assert all(ds.cat_of_label[ds.label_of_cat[c]] == c for c in ds.cat_ids)
    item = ds[0]
    anns = [a for a in ds.coco.dataset["annotations"] if a["image_id"] == item["image_id"]]
    assert [ds.cat_of_label[int(l)] for l in item["labels"]] == [a["category_id"] for a in anns]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    assert torch.allclose(item["boxes"], expected)


def test_ensure_synthetic_creates_once_and_checks_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    cfg = DataConfig(
        train_images=str(root / "train"),
        train_ann=str(root / "annotations" / "train.json"),
        val_images=str(root / "val"),
        val_ann=str(root / "annotations" / "val.json"),
        synthetic=True,
        synthetic_num_train=3,
        synthetic_num_val=2,
        synthetic_image_size=64,
    )
    summary = ensure_synthetic(cfg)
    assert summary is not None and summary["num_train"] == 3 and summary["num_val"] == 2
    assert len(json.loads(Path(cfg.val_ann).read_text())["images"]) == 2
    assert ensure_synthetic(cfg) is None  # already there: left alone
    assert ensure_synthetic(DataConfig(synthetic=False)) is None

    # made with other settings: a one-line error naming both, and the files are left as they are
    before = Path(cfg.train_ann).read_bytes()
    for change in ({"synthetic_num_train": 4}, {"synthetic_colour_by_class": True}, {"synthetic_seed": 1}):
        other = dataclasses.replace(cfg, **change)
        with pytest.raises(DyheadError, match=r"was made with num_images=3, image_size=64, seed=0, colour_by_class=False"):
            ensure_synthetic(other)
    assert Path(cfg.train_ann).read_bytes() == before

    cfg.val_images = str(tmp_path / "elsewhere")
    with pytest.raises(DyheadError, match="data.val_images"):
        ensure_synthetic(cfg)


def _hue_hits(data: dict, root: Path, tolerance: float = 0.12) -> float:
    """Fraction of the larger shapes whose median hue (over saturated, bright pixels of the box) lies
    within ``tolerance`` of their class's CLASS_HUES entry."""
    files = {im["id"]: im["file_name"] for im in data["images"]}
    hits = total = 0
    for ann in data["annotations"]:
        if ann["area"] < 150:
            continue
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        crop = Image.open(root / files[ann["image_id"]]).convert("HSV").crop((x, y, x + w, y + h))
        hsv = np.asarray(crop, dtype=np.float32).reshape(-1, 3) / 255.0
        shape_like = hsv[(hsv[:, 1] > 0.45) & (hsv[:, 2] > 0.6)]
        if len(shape_like) < 20:
            continue
        want = synthetic.CLASS_HUES[ann["category_id"]]
        distance = np.abs((shape_like[:, 0] - want + 0.5) % 1.0 - 0.5)  # circular
        total += 1
        hits += float(np.median(distance)) < tolerance
    assert total >= 20
    return hits / total


def test_colour_by_class_keeps_each_class_to_its_hues(tmp_path: Path) -> None:
    tinted = make_synthetic_coco(tmp_path / "tinted", 30, 0, image_size=128, seed=2, colour_by_class=True)
    plain = make_synthetic_coco(tmp_path / "plain", 30, 0, image_size=128, seed=2)
    tinted_data = json.loads(Path(tinted["train_ann"]).read_text())
    plain_data = json.loads(Path(plain["train_ann"]).read_text())
    assert tinted_data["info"]["generator"]["colour_by_class"] is True
    # same shapes, places and boxes: only the colours differ
    assert tinted_data["annotations"] == plain_data["annotations"]
    assert _hue_hits(tinted_data, Path(tinted["train_images"])) > 0.9
    assert _hue_hits(plain_data, Path(plain["train_images"])) < 0.6


def test_bad_sizes_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(DyheadError):
        make_synthetic_coco(tmp_path, 2, 1, image_size=8)
    with pytest.raises(DyheadError):
        make_synthetic_coco(tmp_path, -1, 1)


def test_a_smaller_set_over_a_larger_one_leaves_no_stale_image(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path, 5, 2, image_size=32)
    (tmp_path / "train" / "mine.jpg").write_bytes(b"the user's own file")
    make_synthetic_coco(tmp_path, 2, 1, image_size=32)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.jpg", "000002.jpg", "mine.jpg"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["000001.jpg"]


def test_data_synth_over_a_set_of_other_settings_needs_force(tmp_path: Path) -> None:
    """`dyhead data synth` over a synthetic set made with other settings replaced it (a run trained on it
    lost its images); the same settings again are fine, other ones need --force."""
    from typer.testing import CliRunner

    from dyhead_cli.cli import app

    runner = CliRunner()
    base = ["data", "synth", str(tmp_path), "--image-size", "32"]
    assert runner.invoke(app, [*base, "--num-train", "4", "--num-val", "2"]).exit_code == 0
    assert runner.invoke(app, [*base, "--num-train", "4", "--num-val", "2"]).exit_code == 0  # the same again
    refused = runner.invoke(app, [*base, "--num-train", "2", "--num-val", "1"])
    assert refused.exit_code == 1 and "holds a synthetic set made with other settings (train: num_images=4" in refused.output
    assert len(list((tmp_path / "val").iterdir())) == 2  # untouched
    assert runner.invoke(app, [*base, "--num-train", "2", "--num-val", "1", "--force"]).exit_code == 0
    assert len(list((tmp_path / "val").iterdir())) == 1
