"""Dataset extraction: batches, compute loop, sinks, output folder, manifest, reader, ranks."""

from ._extract import extract_dataset
from ..errors import OutputError
from .loader import BatchLoader
from .manifest import read_manifest
from .reader import ShardedArray, load_features, verify_folder

__all__ = ["extract_dataset", "load_features", "verify_folder", "read_manifest", "ShardedArray", "OutputError",
           "BatchLoader"]
