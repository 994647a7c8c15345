"""``dyhead visualize``: boxes on images, and pictures of what the DyHead blocks attend to (see command.py)."""

from dyhead_cli.commands.visualize.command import run

__all__ = ["run"]
