"""Workflows for language models built on the extractor: steering vectors (and generation).

Nothing here is imported by ``fxstore/capture``: this room builds on capture's public surface.
"""

from ._steering import steering_vectors

__all__ = ["steering_vectors"]
