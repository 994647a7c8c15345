"""``dyhead convert SRC DST --from official|mmdet``: convert, then say what was mapped, dropped and noted."""

from __future__ import annotations

from pathlib import Path

from dyhead_cli.commands.console import note, say
from dyhead_cli.convert.checkpoint import ConvertSummary, convert_checkpoint


def run(
    src: Path,
    dst: Path,
    source: str,
    recipe: Path | None,
    offset_mode: str | None,
    resnet_style: str,
    approximate: bool,
    overrides: list[str],
    recipe_out: Path | None,
    force: bool = False,
) -> ConvertSummary:
    summary = convert_checkpoint(
        src, dst, source, recipe, offset_mode, resnet_style, approximate, overrides, recipe_out, force=force
    )
    say(
        f"converted {summary.num_source_keys} source tensors into {summary.num_tensors} ({summary.backbone}, "
        f"offset_mode {summary.offset_mode}): wrote {summary.dst} and {summary.recipe_toml}"
    )
    for reason, keys in summary.dropped.items():
        say(f"  dropped {len(keys)}: {reason}")
    for gap in summary.gaps:
        note("approximation", gap.describe())
    for text in summary.notes:
        say(f"  note: {text}")
    say(f"evaluate with: dyhead eval {summary.recipe_toml} --weights {summary.dst}")
    return summary
