"""Drawing and plots, a workflow above capture: the captured graph, patching grids, feature maps.

``FeatureExtractor.draw`` is registered here (see ``fxstore/_workflows.py``); the package root
imports this package, which imports neither graphviz nor matplotlib until something is drawn.
"""

from ._graph import FORMATS, STYLES, build, draw
from ._plots import plot_features, plot_patching

__all__ = ["draw", "build", "plot_patching", "plot_features", "STYLES", "FORMATS"]
