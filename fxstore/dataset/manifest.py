"""The manifest of an output folder (kept importable here: it lives in :mod:`fxstore.dataset.folder.manifest`)."""

from .folder.manifest import MANIFEST, consistency, describe_mismatch, model_fingerprint, read_manifest, validate

__all__ = ["MANIFEST", "read_manifest", "validate", "model_fingerprint", "consistency", "describe_mismatch"]
