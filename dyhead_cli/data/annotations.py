"""Reading COCO annotation files: every record validated against one schema, with the record named.

``SCHEMA`` says, per list (``images``, ``annotations``, ``categories``), which fields a record must or
may have and what each must hold; ``record_problems`` checks every record against it and then what holds
between records (unique ids, ids of one type, references that resolve). ``read_annotation_file`` stops at
the first problem (one line: file, ``list[index].field``, what is wrong); ``data check`` lists them all.

Optional fields COCO evaluation reads are filled in when absent (``iscrowd`` = 0, ``area`` = box area),
in memory only: the file is never written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyhead_cli.errors import DyheadError

Check = Callable[[Any], str | None]  # None = fine, else what the value must be


def is_id(value: Any) -> bool:
    """COCO ids are integers: pycocotools would take strings as keys, but results files, COCOeval's
    image lists and our outputs hold integers (a string id failed later, after training had begun)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _id(v: Any) -> str | None:
    return None if is_id(v) else "must be an integer id, as in COCO"


def _name(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def _text(v: Any) -> str | None:
    return None if isinstance(v, (str, int)) and not isinstance(v, bool) else "must be a string"


def _positive(v: Any) -> str | None:
    return None if is_number(v) and v > 0 else "must be a positive number"


def _non_negative(v: Any) -> str | None:
    return None if is_number(v) and v >= 0 else "must be a number >= 0"


def _flag(v: Any) -> str | None:
    return None if v in (0, 1) and not isinstance(v, float) else "must be 0 or 1"


def _box(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 4 and all(is_number(x) for x in v)
    return None if ok else "must be [x, y, width, height] (four finite numbers)"


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True


SCHEMA: dict[str, dict[str, Field]] = {
    "images": {
        "id": Field(_id),
        "file_name": Field(_name),
        "width": Field(_positive, required=False),
        "height": Field(_positive, required=False),
    },
    "annotations": {
        "id": Field(_id),
        "image_id": Field(_id),
        "category_id": Field(_id),
        "bbox": Field(_box),
        "area": Field(_non_negative, required=False),
        "iscrowd": Field(_flag, required=False),
    },
    "categories": {
        "id": Field(_id),
        "name": Field(_text, required=False),
    },
}


RESULT_FIELDS: dict[str, Field] = {
    "image_id": Field(_id),
    "category_id": Field(_id),
    "bbox": Field(_box),
    "score": Field(lambda v: None if is_number(v) else "must be a number"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where (``images[3].file_name``; ``index`` -1 = the file as a whole)."""

    section: str
    index: int
    message: str


def shown(value: Any) -> str:
    """A value as JSON text, shortened: ``null`` for None, as the user wrote it."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def record_problems(data: dict[str, Any], require_annotations: bool = True) -> Iterator[Problem]:
    """Every problem of a parsed COCO file, record by record, then between records."""
    for section in SCHEMA:
        if section not in data:
            if section == "annotations" and not require_annotations:
                continue
            yield Problem(section, -1, f"has no '{section}' list (is it a COCO detection file?)")
        elif not isinstance(data[section], list):
            yield Problem(section, -1, f"'{section}' must be a list, got {type(data[section]).__name__}")
    bad: set[tuple[str, int]] = set()
    for section, fields in SCHEMA.items():
        records = data.get(section)
        if not isinstance(records, list):
            continue
        for i, record in enumerate(records):
            where = f"{section}[{i}]"
            if not isinstance(record, dict):
                bad.add((section, i))
                yield Problem(section, i, f"{where} must be an object, got {shown(record)}")
                continue
            for name, spec in fields.items():
                if name not in record:
                    if spec.required:
                        bad.add((section, i))
                        yield Problem(section, i, f"{where} lacks '{name}'")
                    continue
                why = spec.check(record[name])
                if why is not None:
                    bad.add((section, i))
                    yield Problem(section, i, f"{where}.{name} {why}, got {shown(record[name])}")
    yield from _between_records(data, bad)


def _between_records(data: dict[str, Any], bad: set[tuple[str, int]]) -> Iterator[Problem]:
    """Unique ids, one id type per kind of id, annotations that refer to listed images and categories."""

    def good(section: str) -> list[tuple[int, dict[str, Any]]]:
        records = data.get(section)
        return [(i, r) for i, r in enumerate(records) if (section, i) not in bad] if isinstance(records, list) else []

    ids: dict[str, dict[Any, int]] = {}
    for section in ("images", "categories", "annotations"):
        seen: dict[Any, int] = {}
        types: dict[type, int] = {}
        for i, r in good(section):
            types.setdefault(type(r["id"]), i)
            if r["id"] in seen:
                yield Problem(
                    section, i, f"{section}[{i}].id {shown(r['id'])} is a duplicate ({section}[{seen[r['id']]}] has it too)"
                )
            else:
                seen[r["id"]] = i
        if len(types) > 1:
            (t1, i1), (t2, i2) = list(types.items())[:2]
            yield Problem(
                section,
                i2,
                f"{section} ids mix {t1.__name__} and {t2.__name__} ({section}[{i1}].id and {section}[{i2}].id): use one type",
            )
        ids[section] = seen
    names: dict[str, int] = {}
    for i, r in good("categories"):
        name = r.get("name")
        if isinstance(name, str) and name in names:
            yield Problem(
                "categories",
                i,
                f"categories[{i}].name {shown(name)} is a duplicate (categories[{names[name]}] has it too): "
                "a model's classes are matched to a data set's by name",
            )
        elif isinstance(name, str):
            names[name] = i
    broken = {target: _broken_ids(data, target, bad) for target in ("images", "categories")}
    for i, r in good("annotations"):
        for name, target in (("image_id", "images"), ("category_id", "categories")):
            if r[name] not in ids[target] and r[name] not in broken[target]:  # a broken record is reported once
                kind = target[:-1].replace("categorie", "category")
                yield Problem(
                    "annotations", i, f"annotations[{i}].{name}: unknown {kind} id {shown(r[name])} (not among the {target})"
                )


def _broken_ids(data: dict[str, Any], section: str, bad: set[tuple[str, int]]) -> set[Any]:
    """The ids the records of ``section`` with a problem meant (an id written as "9" means 9): annotations
    that refer to them are not reported again as referring to unknown ids."""
    meant: set[Any] = set()
    records = data.get(section)
    for i, r in enumerate(records if isinstance(records, list) else []):
        if (section, i) not in bad or not isinstance(r, dict) or "id" not in r:
            continue
        value = r["id"]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, (int, float, str)):
            meant.add(value)
    return meant


def check_results(rows: Any, path: Path) -> list[dict[str, Any]]:
    """A COCO results list (``dyhead predict``'s output) with every row checked; ``DyheadError`` naming the row."""
    if not isinstance(rows, list):
        raise DyheadError(f"{path} is not a COCO results list (a JSON array of detections)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DyheadError(f"{path}: [{i}] must be an object, got {shown(row)}")
        for name, spec in RESULT_FIELDS.items():
            if name not in row:
                raise DyheadError(f"{path}: [{i}] lacks '{name}'")
            why = spec.check(row[name])
            if why is not None:
                raise DyheadError(f"{path}: [{i}].{name} {why}, got {shown(row[name])}")
    return rows


def read_annotation_file(path: str | Path, require_annotations: bool = False) -> dict[str, Any]:
    """Load a COCO JSON file and validate every record (see the module docstring); ``DyheadError`` otherwise.

    'annotations' may be absent (test-dev style image lists) unless ``require_annotations``.
    """
    path = Path(path)
    data = load_json_object(path, "annotation file")
    if "annotations" not in data and not require_annotations:
        data["annotations"] = []
    for problem in record_problems(data, require_annotations):
        raise DyheadError(f"annotation file {path}: {problem.message}")
    if not data["categories"]:
        raise DyheadError(f"annotation file {path} has no categories")
    if not data["images"]:
        raise DyheadError(f"annotation file {path} lists no images")
    fill_evaluation_fields(data["annotations"])
    for cat in data["categories"]:
        cat.setdefault("name", str(cat["id"]))  # optional here (``data check`` warns): a category is then its id
    return data


def load_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; every way of failing is one ``DyheadError`` naming ``path``."""
    if path.is_dir():
        raise DyheadError(f"{what} {path} is a folder, not a JSON file")
    if not path.is_file():
        raise DyheadError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DyheadError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyheadError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise DyheadError(f"{what} {path} is nested too deeply to be a COCO file") from None
    if not isinstance(data, dict):
        raise DyheadError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def fill_evaluation_fields(annotations: list[dict[str, Any]]) -> None:
    """``iscrowd`` = 0 and ``area`` = box area where absent: COCO evaluation reads both (in memory only)."""
    for ann in annotations:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
