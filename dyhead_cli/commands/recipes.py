"""``dyhead recipes`` lists the built-in recipes; ``dyhead recipes show NAME > my.toml`` writes one out.

The listing is a table on stdout: name, then what the recipe's first comment line says (or its model).
``show`` prints the TOML text exactly as shipped (no markup, no wrapping), ready to redirect and edit.
"""

from __future__ import annotations

import sys

from rich.table import Table

from dyhead_cli.commands.console import console
from dyhead_cli.recipe import builtin_recipe_names, builtin_recipe_text, tomllib


def describe(text: str) -> str:
    """The first comment line of a recipe (with the next ones while a bracket is open), else its head +
    backbone."""
    said = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            said = f"{said} {line.lstrip('#').strip()}".strip()
            if said.count("(") <= said.count(")"):
                return said
        elif said or line:
            break
    if said:
        return said
    model = tomllib.loads(text).get("model", {})
    return f"{model.get('head', 'atss')} on {model.get('backbone', {}).get('name', 'resnet50')}"


def list_recipes() -> list[str]:
    names = builtin_recipe_names()
    table = Table(title=None, show_edge=False, header_style="bold")
    table.add_column("recipe", no_wrap=True)
    table.add_column("what")
    for name in names:
        table.add_row(name, describe(builtin_recipe_text(name)))
    console.print(table)
    console.print(
        "run one: dyhead train NAME (e.g. dyhead train quickstart); edit one: dyhead recipes show NAME > my.toml "
        '(or start my.toml with extends = "NAME" and override keys)',
        markup=False,
        highlight=False,
    )
    return names


def show(name: str) -> str:
    text = builtin_recipe_text(name)
    sys.stdout.write(text)
    sys.stdout.flush()
    return text
