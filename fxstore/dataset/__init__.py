"""Dataset extraction: the run skeleton, the compute/write loop, text, the output folder (``folder``), the
formats (``formats``), reading back (``reader``, ``loader``) and ranks."""

from ..errors import OutputError
from ._extract import extract_dataset
from ._reduce import REDUCTIONS
from .formats import NAMES as FORMATS
from .loader import BatchLoader
from .manifest import read_manifest
from .reader import ShardedArray, data_files, load_features, verify_folder

__all__ = ["extract_dataset", "load_features", "verify_folder", "read_manifest", "ShardedArray", "OutputError",
           "BatchLoader", "FORMATS", "REDUCTIONS", "data_files"]
