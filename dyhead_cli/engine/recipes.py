"""The one way every command loads a recipe: read and type-check the TOML (``recipe.py``), then resolve
and check the model part against the choices defined where each is implemented (``models.build``).

After loading, a recipe holds concrete values only (each head's defaults filled in), so what a run writes
to its ``recipe.toml`` rebuilds exactly the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dyhead_cli.models.build import resolve_model_config
from dyhead_cli.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict


def resolve(recipe: Recipe) -> Recipe:
    """``recipe`` with its model section checked and resolved (in place; returned for chaining)."""
    recipe.model = resolve_model_config(recipe.model)
    return recipe


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file with ``--set`` overrides, checked and resolved."""
    return resolve(load_recipe(path, list(overrides or [])))


def from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """A recipe from a dict (e.g. a checkpoint's metadata) with overrides, checked and resolved."""
    return resolve(recipe_from_dict(apply_overrides(values, list(overrides or []))))
