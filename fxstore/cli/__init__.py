"""The ``fxstore`` command line: commands, node table, model and data sources."""

from ._main import main

__all__ = ["main"]
