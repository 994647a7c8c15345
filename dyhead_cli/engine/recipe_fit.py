"""Does a recipe describe the model a checkpoint holds, and do two annotation files name the same classes?

``dyhead eval RECIPE --weights W`` (and ``predict --recipe``) build the model from RECIPE, then load W's
tensors. Many model keys change what the network computes without changing a tensor's shape
(``dyhead.offset_mode``, ``input_format``, ``pixel_mean``, ``anchor_scale``, ``fpn.p7_relu``...): a recipe that
differs from the one the weights were trained with there loads without a complaint and gives wrong
numbers. Checkpoints carry their recipe, so the two are compared key by key, apart from ``FREE_MODEL_KEYS``.

Labels are positions among a file's sorted category ids, so a validation file whose categories differ
from the training file's (or from a checkpoint's class names) would score each class against another's
boxes: ``category_difference`` says how two lists differ, for a one-line refusal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dyhead_cli.engine import recipes
from dyhead_cli.engine.run_dir import flatten
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import resolve_model_config
from dyhead_cli.recipe import ModelConfig, Recipe, _toml_value, to_dict

# Model keys that may differ from the checkpoint's: how detections are picked at inference, what training
# alone reads (losses, assignment, initialisation, frozen layers), where pretrained weights come from, the
# implementation of the same function; the classes are matched separately (by name).
FREE_MODEL_KEYS = frozenset(
    {
        "model.num_classes",
        "model.class_names",
        "model.backbone.pretrained",
        "model.backbone.pretrained_file",
        "model.backbone.frozen_stages",
        "model.backbone.norm_eval",
        "model.backbone.frozen_norm",
        "model.dyhead.zero_init_offset",
        "model.dyhead.impl",
        "model.head_options.prior_prob",
        "model.head_options.atss_topk",
        "model.head_options.focal_alpha",
        "model.head_options.focal_gamma",
        "model.head_options.box_loss",
        "model.head_options.smooth_l1_beta",
        "model.head_options.box_loss_weight",
        "model.head_options.center_sampling_radius",
        "model.head_options.score_thresh",
        "model.head_options.nms_thresh",
        "model.head_options.pre_nms_top_n",
        "model.head_options.detections_per_img",
        "model.head_options.postprocess",
        "model.rcnn.rpn_pre_nms_top_n_train",
        "model.rcnn.rpn_pre_nms_top_n_test",
        "model.rcnn.rpn_post_nms_top_n",
        "model.rcnn.roi_batch_size_per_image",
    }
)


def model_conflicts(model: ModelConfig, stored: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, ``model``'s value, the stored recipe's value) for each model key outside ``FREE_MODEL_KEYS`` where
    they differ; both resolved (head defaults filled in). Keys one side does not know (another version) are
    passed over, and so is a stored recipe this version cannot read."""
    try:
        saved = recipes.from_dict(stored)
        model = resolve_model_config(model)
    except DyheadError:
        return []
    here, there = flatten(dataclasses.asdict(model), "model."), flatten(to_dict(saved)["model"], "model.")
    raw = flatten(stored.get("model", {}), "model.")
    return [(k, here[k], there[k]) for k in here if k in raw and k not in FREE_MODEL_KEYS and here[k] != there[k]]


def check_recipe_fits(recipe: Recipe, meta: dict[str, Any], recipe_path: Path, weights: Path) -> None:
    """Refuse, in one line, a recipe whose model differs from the one ``weights`` were trained with."""
    stored = meta.get("recipe")
    if not isinstance(stored, dict):
        return  # a checkpoint without its recipe: nothing to compare with
    conflicts = model_conflicts(recipe.model, stored)
    if not conflicts:
        return
    key, _, there = conflicts[0]
    raise DyheadError(
        f"recipe {recipe_path} does not describe the model in {weights}: "
        f"{first_conflict(conflicts, 'in the recipe', 'in the checkpoint')}; the weights only work with the "
        f"checkpoint's value: give the run's recipe.toml, or --set {key}={_toml_value(there)}"
    )


def first_conflict(conflicts: list[tuple[str, Any, Any]], here: str, there: str) -> str:
    """``model_conflicts``' first row in words: "KEY is A <here> but B <there> (and N more: ...)"."""
    key, a, b = conflicts[0]
    rest = [c[0] for c in conflicts[1:]]
    shown = ", ".join(rest[:3]) + (", ..." if len(rest) > 3 else "")
    more = f" (and {len(rest)} more: {shown})" if rest else ""
    return f"{key} is {a!r} {here} but {b!r} {there}{more}"


def category_difference(want: list[tuple[Any, str]], have: list[tuple[Any, str]], limit: int = 4) -> str:
    """How the (id, name) list ``have`` differs from ``want``, in a few words ("" when they are equal)."""
    if want == have:
        return ""
    want_d, have_d = dict(want), dict(have)
    parts = []
    missing, extra = [i for i in want_d if i not in have_d], [i for i in have_d if i not in want_d]
    renamed = [i for i in want_d if i in have_d and want_d[i] != have_d[i]]
    if missing:
        parts.append(f"lacks {_ids(missing, want_d, limit)}")
    if extra:
        parts.append(f"adds {_ids(extra, have_d, limit)}")
    if renamed:
        shown = "calls " + ", ".join(f"id {i} {have_d[i]!r}, not {want_d[i]!r}" for i in renamed[:limit])
        parts.append(shown + (f" (+{len(renamed) - limit} more)" if len(renamed) > limit else ""))
    return "; ".join(parts) or "the same categories in another order"


def _ids(ids: list[Any], names: dict[Any, str], limit: int) -> str:
    shown = ", ".join(f"{names[i]!r} (id {i})" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def checkpoint_category_ids(meta: dict[str, Any], dataset: Any, weights: Path) -> list[Any]:
    """The category id of each of the checkpoint's labels in ``dataset`` (a ``CocoDetection``), matched by
    the class names the checkpoint's recipe stores; refuses a data set that does not name those classes.
    Without stored names: the data set's own order (the weights' shapes check the count)."""
    from dyhead_cli.engine.inference import match_categories  # inference checks recipes with this module

    stored = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    names = (stored.get("model") or {}).get("class_names") or []
    have = list(zip(dataset.cat_ids, dataset.class_names))
    if not names or list(dataset.class_names) == list(names):
        return list(dataset.cat_ids)
    # the same classes under other ids: matched by name as predict matches an annotation file's, but every
    # category of the file must be one of the model's (an extra one would count as missed in the AP)
    cats = match_categories(list(names), True, [{"id": i, "name": n} for i, n in have])
    if cats is not None and len(cats) == len(have):
        return [c["id"] for c in cats]
    ids = meta.get("category_ids")
    want = list(zip(ids, names)) if isinstance(ids, list) and len(ids) == len(names) else list(enumerate(names, 1))
    raise DyheadError(
        f"annotation file {dataset.ann_file} does not name the classes of {weights}: against the checkpoint's it "
        f"{category_difference(want, have)}"
    )
