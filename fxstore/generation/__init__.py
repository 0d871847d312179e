"""Generation: steer and read a Hugging Face language model while it generates.

``FeatureExtractor.generate`` runs Hugging Face's own generation loop on the model with the
extractor's edits applied and its layers recorded at every position, prompt and generated
tokens alike, eagerly or (after ``ex.compile()``) as compiled programs with a static KV cache.
The package registers the implementation of the extractor's method when ``fxstore`` is imported.
"""

from ._generate import generate
from ._result import Generation

__all__ = ["Generation", "generate"]
