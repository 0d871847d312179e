"""The optional drawing dependencies, imported only when something is drawn.

``graphviz`` (the Python package) builds the graph's source; its ``dot`` binary (the Debian /
Homebrew / conda package ``graphviz``) renders it to SVG, PNG or PDF. ``matplotlib`` draws the plots.
Each missing piece is an fxstore error whose hint says how to install it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError

__all__ = ["graphviz", "rendered", "figure_class"]

_EXTRA = "pip install 'fxstore[plot]'"
_DOT = ("install the graphviz system package, which provides 'dot': apt-get install graphviz (Debian/Ubuntu), "
        "brew install graphviz (macOS) or conda install -c conda-forge graphviz")


def graphviz() -> Any:
    """The ``graphviz`` module.

    Raises:
        ConfigError: it is not installed.
    """
    try:
        return importlib.import_module("graphviz")
    except ImportError as e:
        raise ConfigError(
            f"drawing the captured graph needs the Python package 'graphviz' ({e}).\nHint: {_EXTRA} "
            f"(and {_DOT})."
        ) from e


def rendered(digraph: Any, fmt: str) -> bytes:
    """``digraph`` rendered by ``dot`` in format ``fmt``.

    Raises:
        ConfigError: the ``dot`` binary is not on ``PATH``.
    """
    module = graphviz()
    try:
        return digraph.pipe(format=fmt)
    except module.ExecutableNotFound as e:
        raise ConfigError(
            f"rendering the drawing as {fmt} needs graphviz's 'dot' program, which is not on PATH.\n"
            f"Hint: {_DOT}; without it, draw() still returns the graph (its .source is the DOT text)."
        ) from e


def figure_class() -> type:
    """``matplotlib.figure.Figure`` (no pyplot: nothing global is touched).

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError as e:
        raise ConfigError(f"plotting needs matplotlib ({e}).\nHint: {_EXTRA}.") from e
