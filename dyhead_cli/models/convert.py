"""Old import path of the DyHead key map: ``convert_dyhead`` lives in ``dyhead_cli/convert/dyhead_keys.py``."""

from dyhead_cli.convert.dyhead_keys import SOURCES, convert_dyhead

__all__ = ["SOURCES", "convert_dyhead"]
