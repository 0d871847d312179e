"""Dataset extraction: batches, compute loop, sinks, output folder, manifest, reader, ranks."""

from ._extract import extract_dataset
from ._outdir import OutputError
from .loader import BatchLoader
from .manifest import read_manifest
from .reader import ShardedArray, load_features

__all__ = ["extract_dataset", "load_features", "read_manifest", "ShardedArray", "OutputError", "BatchLoader"]
