"""check_dataset: each kind of problem in a hand-built bad data set, none on the synthetic one."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dyhead_cli.data.check import check_dataset
from dyhead_cli.data.synthetic import make_synthetic_coco


def test_synthetic_data_set_is_clean(tmp_path: Path) -> None:
    s = make_synthetic_coco(tmp_path, num_train=10, num_val=2, image_size=64, seed=0)
    report = check_dataset(s["train_ann"], s["train_images"])
    assert report.ok and report.errors == [] and report.warnings == []
    assert (report.num_images, report.num_images_read) == (10, 10)
    assert report.num_annotations == s["num_train_annotations"] and report.num_categories == 4


def _bad_data_set(root: Path) -> Path:
    Image.new("RGB", (32, 32)).save(root / "ok.jpg")
    Image.new("RGB", (32, 32)).save(root / "wrong_size.jpg")
    Image.new("RGB", (32, 32)).save(root / "no_anns.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(root / "rotated.jpg", exif=exif)  # displayed 20 wide, 40 tall
    images = [
        {"id": 1, "file_name": "ok.jpg", "width": 32, "height": 32},
        {"id": 2, "file_name": "missing.jpg", "width": 32, "height": 32},
        {"id": 3, "file_name": "corrupt.jpg", "width": 32, "height": 32},
        {"id": 4, "file_name": "wrong_size.jpg", "width": 40, "height": 30},
        {"id": 5, "file_name": "no_anns.jpg", "width": 32, "height": 32},
        {"id": 6, "file_name": "rotated.jpg", "width": 40, "height": 20},  # the stored size, not the shown one
        {"id": 1, "file_name": "ok.jpg", "width": 32, "height": 32},  # duplicate id
    ]

    def ann(i: int, image_id: int, cat: int, bbox: list) -> dict:
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1, "iscrowd": 0}

    annotations = [
        ann(1, 1, 1, [0, 0, 10, 10]),  # fine
        ann(2, 1, 1, [20, 20, 14, 5]),  # x2 = 34 > 32 + 1: out of bounds
        ann(3, 1, 1, [5, 5, 0, 4]),  # zero width
        ann(4, 99, 1, [0, 0, 4, 4]),  # unknown image
        ann(5, 1, 42, [0, 0, 4, 4]),  # unknown category
        ann(5, 1, 1, [0, 0, 4, 4]),  # duplicate annotation id
        ann(6, 1, 1, [0, 0, 32.9, 4]),  # within the 1 px tolerance: fine
        ann(7, 1, 1, [0, 0, "4", 4]),  # malformed bbox
        {"id": 8, "image_id": 1, "bbox": [0, 0, 1, 1]},  # no category_id
        ann(9, 2, 1, [0, 0, 4, 4]),
        ann(10, 3, 1, [0, 0, 4, 4]),
        ann(11, 4, 1, [0, 0, 4, 4]),
        ann(12, 6, 1, [0, 0, 4, 4]),
    ]
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "unused"}, {"id": 1, "name": "again"}]
    path = root / "bad.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_each_kind_of_problem_is_reported(tmp_path: Path) -> None:
    report = check_dataset(_bad_data_set(tmp_path), tmp_path)
    assert not report.ok
    errors = "\n".join(report.errors)
    expected = [
        f"image file not found: {tmp_path / 'missing.jpg'}",
        f"corrupt or unreadable image {tmp_path / 'corrupt.jpg'}",
        f"image {tmp_path / 'wrong_size.jpg'} is 32x32 but the JSON says 40x30",
        f"image {tmp_path / 'rotated.jpg'} is 20x40 but the JSON says 40x20 (the size before its EXIF rotation",
        "images[6].id 1 is a duplicate (images[0] has it too)",
        "categories[2].id 1 is a duplicate (categories[0] has it too)",
        "annotation id 2 box [20, 20, 14, 5] lies outside its 32x32 image ok.jpg",
        "annotation id 3 has a box with zero or negative size",
        "annotations[3].image_id: unknown image id 99 (not among the images)",
        "annotations[4].category_id: unknown category id 42 (not among the categories)",
        "annotations[5].id 5 is a duplicate (annotations[4] has it too)",
        'annotations[7].bbox must be [x, y, width, height] (four finite numbers), got [0, 0, "4", 4]',
        "annotations[8] lacks 'category_id'",
    ]
    for message in expected:
        assert message in errors, message
    assert len(report.errors) == len(expected), errors  # nothing else: the fine boxes stay quiet
    assert report.warnings == [
        "1 images have no annotations (no_anns.jpg)",
        "category 'unused' (id 2) has no annotations",
    ]
    assert (report.num_images, report.num_images_read, report.num_categories) == (6, 4, 2)
    text = report.summary(limit=3)
    assert "13 errors, 2 warnings" in text and "... and 10 more errors" in text


def test_unreadable_annotation_files_are_errors(tmp_path: Path) -> None:
    cases = {
        "nojson.json": "{oops",
        "list.json": "[]",
        "nokeys.json": json.dumps({"images": []}),
        "badtype.json": json.dumps({"images": {}, "annotations": [], "categories": []}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
    messages = {name: check_dataset(tmp_path / name, tmp_path).errors for name in cases}
    assert "is not valid JSON" in messages["nojson.json"][0]
    assert "must hold a JSON object" in messages["list.json"][0]
    assert [m.split(" has ")[-1] for m in messages["nokeys.json"]] == ["no 'annotations' key", "no 'categories' key"]
    assert "'images' must be a list" in messages["badtype.json"][0]
    missing = check_dataset(tmp_path / "absent.json", tmp_path)
    assert not missing.ok and "not found" in missing.errors[0]


def test_a_broken_image_record_is_one_error_not_one_per_annotation(tmp_path: Path) -> None:
    """An image whose id is written "9" (or that lacks its file name) is one error; its annotations are not
    each reported again as referring to an unknown image (9 errors for one record before)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    anns = [{"id": k, "image_id": 9, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0} for k in range(1, 5)]
    for broken in ({"id": "9", "file_name": "a.jpg", "width": 32, "height": 32}, {"id": 9, "width": 32, "height": 32}):
        path = tmp_path / "ann.json"
        path.write_text(json.dumps({"images": [broken], "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
        report = check_dataset(path, tmp_path)
        assert len(report.errors) == 1 and report.errors[0].startswith("images[0]"), report.errors
    anns[0]["image_id"] = 10  # a real unknown id is still one
    path.write_text(json.dumps({"images": [broken], "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    assert check_dataset(path, tmp_path).errors[1:] == ["annotations[0].image_id: unknown image id 10 (not among the images)"]
