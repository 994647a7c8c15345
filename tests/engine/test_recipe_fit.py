"""engine/recipe_fit.py: which recipe differences a checkpoint refuses, and how category lists differ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dyhead_cli.engine import recipes
from dyhead_cli.engine.recipe_fit import FREE_MODEL_KEYS, category_difference, checkpoint_category_ids, model_conflicts
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import to_dict


def stored_with(*overrides: str) -> dict:
    return to_dict(recipes.from_dict({}, list(overrides)))


def test_model_keys_that_change_the_function_conflict_and_free_ones_do_not() -> None:
    recipe = recipes.from_dict({}, ["model.head_options.score_thresh=0.3", "model.dyhead.impl='reference'"])
    assert model_conflicts(recipe.model, stored_with()) == []  # inference options and the implementation are free
    stored = stored_with("model.dyhead.offset_mode='aligned'", "model.pixel_mean=[1.0, 2.0, 3.0]", "model.fpn.p7_relu=false")
    assert [c[0] for c in model_conflicts(recipe.model, stored)] == [
        "model.fpn.p7_relu",
        "model.dyhead.offset_mode",
        "model.pixel_mean",
    ]
    assert ("model.dyhead.offset_mode", "official", "aligned") in model_conflicts(recipe.model, stored)
    # head defaults are compared resolved: None in the recipe equals the ATSS default stored explicitly
    assert model_conflicts(recipes.from_dict({}).model, stored_with("model.head_options.anchor_offset=0.5")) == []


def test_keys_one_side_does_not_know_and_unreadable_recipes_are_passed_over() -> None:
    recipe = recipes.from_dict({}, ["model.fpn.channels=64"])
    older = stored_with()
    del older["model"]["fpn"]["channels"]  # a checkpoint from a version without the key
    assert model_conflicts(recipe.model, older) == []
    assert model_conflicts(recipe.model, {"model": {"no_such_key": 1}}) == []


def test_free_keys_are_model_keys() -> None:
    model = to_dict(recipes.from_dict({}))["model"]

    def has(key: str) -> bool:
        node = model
        for part in key.split(".")[1:]:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert all(has(k) for k in FREE_MODEL_KEYS), [k for k in FREE_MODEL_KEYS if not has(k)]


def test_category_difference_in_words() -> None:
    a = [(1, "circle"), (3, "square"), (7, "cross")]
    assert category_difference(a, list(a)) == ""
    assert category_difference(a, [(1, "circle"), (3, "square")]) == "lacks 'cross' (id 7)"
    assert category_difference(a, [*a, (9, "star")]) == "adds 'star' (id 9)"
    assert category_difference(a, [(1, "disc"), (3, "square"), (7, "cross")]) == "calls id 1 'disc', not 'circle'"
    assert category_difference(a, [(3, "square"), (1, "circle"), (7, "cross")]) == "the same categories in another order"


def test_checkpoint_category_ids_by_name() -> None:
    meta = {"recipe": {"model": {"class_names": ["circle", "square"]}}, "category_ids": [1, 2]}
    same = SimpleNamespace(cat_ids=[1, 2], class_names=["circle", "square"], ann_file="v.json")
    assert checkpoint_category_ids(meta, same, "w") == [1, 2]
    swapped = SimpleNamespace(cat_ids=[4, 5], class_names=["square", "circle"], ann_file="v.json")
    assert checkpoint_category_ids(meta, swapped, "w") == [5, 4]  # label 0 (circle) is id 5 there
    other = SimpleNamespace(cat_ids=[1, 2], class_names=["circle", "person"], ann_file="v.json")
    with pytest.raises(DyheadError, match="v.json does not name the classes of w: .*calls id 2 'person', not 'square'"):
        checkpoint_category_ids(meta, other, "w")
    assert checkpoint_category_ids({}, other, "w") == [1, 2]  # no stored names: the data set's order
