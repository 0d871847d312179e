"""Workflows for language models built on the extractor: generation and steering vectors.

``FeatureExtractor.generate`` runs Hugging Face's own generation loop on the model with the
extractor's edits applied and its layers recorded at every position, prompt and generated
tokens alike, eagerly or (after ``ex.compile()``) as compiled programs with a static KV cache;
the package registers the implementation of the extractor's method when ``fxstore`` is imported.
:func:`steering_vectors` computes steering vectors from contrastive pairs on the read path.
Nothing here is imported by ``fxstore/capture``: this room builds on capture's public surface.
"""

from ._generate import generate
from ._result import Generation
from ._steering import steering_vectors

__all__ = ["Generation", "generate", "steering_vectors"]
