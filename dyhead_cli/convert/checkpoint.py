"""The whole conversion (``convert_state_dict``) and ``dyhead convert``'s file I/O (``convert_checkpoint``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dyhead_cli.convert.capabilities import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    REFERENCE_SETTINGS,
    Conversion,
    Gap,
    default_model_section,
    find_gaps,
    gaps_advice,
    get_dotted,
)
from dyhead_cli.convert.mapping import check_complete, map_state_dict
from dyhead_cli.convert.reading import read_reference_checkpoint
from dyhead_cli.convert.reference import check_source, describe_reference
from dyhead_cli.errors import DyheadError

# ---------------------------------------------------------------------------------------------------
# the whole conversion


# [model] fields a --recipe may set otherwise than the weights were trained with (input handling and the DyHead
# offsets: the weights load either way, and give other numbers); each is the ReferenceModel attribute of its
# last part
RECIPE_INPUTS = {
    "input_format": "the channel order the weights expect",
    "pixel_mean": "the normalisation the weights were trained with",
    "pixel_std": "the normalisation the weights were trained with",
    "dyhead.offset_mode": "how DyHead reads its offsets: other numbers on the same weights",
}


def convert_state_dict(
    state: dict[str, Tensor],
    source: str,
    meta: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    offset_mode: str | None = None,
    resnet_style: str = "auto",
) -> Conversion:
    """Convert a reference detector's weights; returns our state dict, the [model] table, gaps and drops.

    ``model``: a [model] table to convert into (from ``--recipe``) instead of the one read from the
    checkpoint. Gaps that leave the weights usable are returned (the caller decides); the others raise.
    """
    from dyhead_cli.models.build import build_model
    from dyhead_cli.recipe import ModelConfig, from_dict

    check_source(state, source)
    ref = describe_reference(state, source, meta, resnet_style, offset_mode)
    notes = list(ref.notes)
    if model is None:
        model = default_model_section(ref)
        gaps = find_gaps(ref, model, set_fields=True)
    else:
        model = json.loads(json.dumps(model))
        model["backbone"].update(pretrained=False, pretrained_file="")  # the weights come from the checkpoint
        if offset_mode is not None:
            model["dyhead"]["offset_mode"] = offset_mode
        gaps = find_gaps(ref, model, set_fields=False)
        for key, what in RECIPE_INPUTS.items():  # what the weights were trained with, set otherwise: other numbers
            ours, wanted = get_dotted(model, key), getattr(ref, key.rsplit(".", 1)[-1])
            if ours != wanted:
                gaps.append(Gap(key, wanted, ours, what, approximable=True, in_recipe=True))
        if not model.get("class_names") and model.get("num_classes") == len(ref.class_names):
            model["class_names"] = list(ref.class_names)
    hard = [g for g in gaps if not g.approximable]
    if hard:
        raise DyheadError("cannot convert: " + "; ".join(g.describe() for g in hard) + f" - {gaps_advice(hard)}")
    model_cfg = from_dict(ModelConfig, model, "model.")
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        target = build_model(model_cfg).state_dict()
    out_norms = any(k.startswith("backbone.out_norms.") for k in target)
    mp = map_state_dict(state, ref, target, out_norms)
    for gap in gaps:
        if gap.key == "backbone.out_norm":
            for key in state:
                if re.search(r"(?:^|\.)norm[123]\.(weight|bias)$", key) and key not in mp.used:
                    mp.drop(key, "Swin output-level LayerNorms (approximation: our backbone has none)")
    check_complete(mp, target)
    dropped = {reason: sorted(keys) for reason, keys in mp.dropped.items()}
    for reason, keys in mp.filled.items():
        if keys:
            notes.append(f"filled {len(keys)} tensors: {reason}")
    return Conversion(dict(mp.out), model, ref, gaps, dropped, notes)


def one_line(name: str) -> str:
    """A file name inside a TOML comment: line breaks and other control characters as ``?``."""
    return "".join("?" if ord(c) < 32 or c == "\x7f" else c for c in name)


@dataclass
class ConvertSummary:
    dst: Path
    recipe_toml: Path | None
    num_tensors: int
    num_source_keys: int
    dropped: dict[str, list[str]]
    gaps: list[Gap]
    notes: list[str]
    offset_mode: str
    backbone: str


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    source: str,
    recipe_path: str | Path | None = None,
    offset_mode: str | None = None,
    resnet_style: str = "auto",
    approximate: bool = False,
    overrides: list[str] | None = None,
    recipe_out: str | Path | None = None,
    force: bool = False,
) -> ConvertSummary:
    """``dyhead convert``: read ``src`` safely, convert, write ``dst`` (+ its recipe as TOML next to it).

    Output rules (``engine.paths``), checked before anything is read: neither output may be ``src`` or the
    ``--recipe`` file, they may not be one file, and an existing one is replaced only with ``force``.
    """
    from dyhead_cli.engine import recipes
    from dyhead_cli.engine.checkpoint import load_model_weights, save_weights
    from dyhead_cli.engine.inference import build_for_weights
    from dyhead_cli.engine.paths import check_distinct, check_output_file, write_text_atomic, writing
    from dyhead_cli.recipe import Recipe, dump_toml, load_recipe, recipe_from_dict, to_dict

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise DyheadError(f"the destination must be a .safetensors file, got {dst}")
    toml_path = Path(recipe_out) if recipe_out is not None else dst.with_suffix(".toml")
    inputs = [("source checkpoint SRC", src), ("--recipe", recipe_path)]
    check_distinct({"DST": dst, "the recipe TOML": toml_path})
    check_output_file(dst, "DST", inputs, force=force, force_flag="--force")
    check_output_file(
        toml_path,
        "--recipe-out" if recipe_out is not None else "the recipe TOML (DST with .toml)",
        inputs,
        force=force,
        force_flag="--force",
    )
    state, info = read_reference_checkpoint(src)
    if recipe_path is not None:
        recipe = to_dict(load_recipe(recipe_path))
        model = recipe["model"]
    else:
        recipe = to_dict(Recipe(name=dst.stem))
        model = None
    conv = convert_state_dict(state, source, info.get("meta"), model, offset_mode, resnet_style)
    if conv.gaps and not approximate:
        raise DyheadError(
            f"cannot convert {src.name} faithfully: "
            + "; ".join(g.describe() for g in conv.gaps)
            + f". To convert faithfully, {gaps_advice(conv.gaps)}; --approximate converts anyway (numbers will "
            "differ: a starting point for fine-tuning, not the published AP)"
        )
    recipe["model"] = conv.model
    settings = REFERENCE_SETTINGS[source]
    if recipe_path is not None:
        if recipe["model"]["head_options"].get("postprocess") != settings["postprocess"]:
            conv.notes.append(
                f"head_options.postprocess = {settings['postprocess']!r}, as the reference (was {recipe['model']['head_options'].get('postprocess')!r})"
            )
        if recipe["data"]["size_divisibility"] != conv.reference.size_divisibility:
            conv.notes.append(
                f"data.size_divisibility = {conv.reference.size_divisibility}, as the reference "
                f"(was {recipe['data']['size_divisibility']})"
            )
        if recipe["data"].get("resize_backend", "cv2") != conv.reference.resize_backend:
            conv.notes.append(
                f"data.resize_backend = {conv.reference.resize_backend!r}, as the reference "
                f"(was {recipe['data'].get('resize_backend', 'cv2')!r})"
            )
    recipe["model"]["head_options"]["postprocess"] = settings["postprocess"]
    recipe["data"]["size_divisibility"] = conv.reference.size_divisibility
    recipe["data"]["resize_backend"] = conv.reference.resize_backend
    recipe = to_dict(recipes.from_dict(recipe, list(overrides or [])))
    detector = build_for_weights(recipe_from_dict(recipe).model)
    load_model_weights(detector, conv.state_dict, source=f"the converted {src.name} (after --set)")
    dropped = dict(conv.dropped)
    if info.get("containers"):
        dropped["top-level entries other than the weights (optimizer, scheduler, meta...)"] = list(info["containers"])
    if info.get("not_tensors"):
        dropped["non-tensor entries in the weights"] = list(info["not_tensors"])
    extra = {
        "converted_from": {
            "file": src.name,
            "source": source,
            "reference_backbone": conv.reference.backbone,
            "offset_mode": recipe["model"]["dyhead"]["offset_mode"],
            "approximations": [dataclasses.asdict(g) for g in conv.gaps],
            "dropped": {reason: len(keys) for reason, keys in dropped.items()},
            "notes": conv.notes,
        },
        # the ids predictions are written with (a folder has no annotation file to take them from): COCO's
        # for COCO's 80 classes, else 1..K; without them they came from whatever data.val_ann the working
        # folder held
        "category_ids": list(COCO_CATEGORY_IDS)
        if tuple(recipe["model"]["class_names"]) == COCO_CLASSES
        else list(range(1, int(recipe["model"]["num_classes"]) + 1)),
    }
    with writing(dst):
        save_weights(dst, detector, recipe, extra)
    write_text_atomic(
        toml_path,
        f"# written by: dyhead convert {one_line(src.name)} {one_line(dst.name)} --from {source}\n"
        f"# evaluate with: dyhead eval {one_line(toml_path.name)} --weights {one_line(dst.name)}\n" + dump_toml(recipe),
    )
    return ConvertSummary(
        dst=dst,
        recipe_toml=toml_path,
        num_tensors=len(conv.state_dict),
        num_source_keys=len(state),
        dropped=dropped,
        gaps=conv.gaps,
        notes=conv.notes,
        offset_mode=recipe["model"]["dyhead"]["offset_mode"],
        backbone=recipe["model"]["backbone"]["name"],
    )
