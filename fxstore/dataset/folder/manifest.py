"""The manifest: what a finished output folder holds, checked against its schema before use.

``manifest.json`` is written last, by rank 0, once every shard is durable and checksummed;
its presence means the folder is complete. It is data, not instructions: before anything
is opened, :func:`validate` checks that every file is a plain name inside the folder of the
form its format writes, that the shards cover the samples in order, and that shapes, dtypes
and checksums are well formed. Whether the files agree with it is :mod:`.reader`'s check.

Deterministic content: the data files (shards, ``.npy``) depend only on the identity and
the computed values, never on time, host or number of processes. ``manifest.json`` holds
no timestamp either; only ``command`` and ``versions`` can differ between equivalent runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from ..._version import __version__
from ...capture import model_fingerprint
from ...errors import OutputError
from ..formats import FORMATS, NAMES, arrays_of, get
from .checksums import ALGORITHM, is_digest
from .files import atomic_write_json, cut, plain_stat, read_json
from .names import CLAIM, MANIFEST, RUN_FILE

__all__ = ["MANIFEST", "read_manifest", "validate", "model_fingerprint"]

VERSION = 2

_NAMES = {
    "format": "output format",
    "model": "model (class or weights)",
    "features": "layers, their shapes or dtypes",
    "target": "target field",
    "num_samples": "number of samples",
    "shard_size": "shard size",
    "batch_size": "batch size",
    "data": "data",
    "text": "tokenizer or text options",
}
_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
           "complex64", "complex128", "uint16", "uint32", "uint64"}


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a finished output folder, validated against its schema.

    Raises:
        OutputError: the folder holds no finished extraction, or its manifest is not valid.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> from fxstore.dataset.folder.manifest import read_manifest
        >>> out = tempfile.mkdtemp()
        >>> _ = extract_dataset(torch.nn.Linear(4, 2), "linear", torch.rand(2, 3, 4), out, progress=False)
        >>> read_manifest(out)["num_samples"]
        6
    """
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        what = "does not exist" if not Path(out).exists() else "is not a folder"
        raise OutputError(f"'{cut(out)}' {what}.\nHint: pass the output folder of an extraction (its out=...).")
    if plain_stat(Path(out) / RUN_FILE) is not None:
        raise OutputError(
            f"'{cut(out)}' holds no finished extraction: a run or a repair of it has not finished (its {RUN_FILE} "
            "is there: it is running, or was interrupted).\n"
            "Hint: wait for that run to finish, or run the same extraction again (it resumes), then load it."
        )
    if not os.path.lexists(path):
        kept = plain_stat(Path(out) / CLAIM) is not None
        why = f"it was deleted, and the run's {CLAIM} can rebuild it" if kept else "nothing fxstore wrote is in it"
        raise OutputError(
            f"'{cut(out)}' holds no finished extraction (no {MANIFEST}); {why}.\n"
            "Hint: run the extraction (again: it resumes) to completion, then load it."
        )
    manifest, problem = parse(path)
    if problem is not None:
        raise OutputError(
            f"'{cut(path)}' is not a valid fxstore manifest: {problem}.\n"
            "Hint: fxstore reads only manifests it wrote; run the extraction again into a new folder."
        )
    return manifest


def parse(path: Path) -> tuple[dict[str, Any], str | None]:
    """``(manifest, None)``, or ``({}, why it is not a valid fxstore manifest)``."""
    try:
        manifest = read_json(path)
    except OSError as e:  # a link, FIFO, device, or too large: never opened or read past the limit
        return {}, f"not readable JSON ({e.strerror or e})"
    except (UnicodeDecodeError, ValueError) as e:
        return {}, f"not readable JSON ({type(e).__name__}{': ' + str(e) if 'nested' in str(e) else ''})"
    problem = validate(manifest)
    return (manifest, None) if problem is None else ({}, problem)


def validate(m: Any) -> str | None:
    """Why ``m`` is not a valid manifest (``None``: it is).

    Example:
        >>> from fxstore.dataset.folder.manifest import validate
        >>> validate([1, 2])
        'a JSON list, not an object'
    """
    try:
        _check(m)
    except _Invalid as e:
        return cut(e, 300)  # a name of 50 MB in a manifest is not printed whole
    return None


class _Invalid(Exception):
    pass


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise _Invalid(reason)


def _count(value: Any, what: str) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{what} is {value!r}, not a count")
    return int(value)


def _check(m: Any) -> None:
    _require(isinstance(m, dict), f"a JSON {'list' if isinstance(m, list) else type(m).__name__}, not an object")
    _require(m.get("fxstore_manifest") == VERSION, f"fxstore_manifest is {m.get('fxstore_manifest')!r}, not {VERSION}")
    fmt = m.get("format")
    _require(fmt in FORMATS, f"format {fmt!r} is not one of {NAMES}")
    writer = get(fmt)
    n = _count(m.get("num_samples"), "num_samples")
    features = m.get("features")
    _require(isinstance(features, dict) and len(features) > 0, "features is not a non-empty object")
    arrays = arrays_of(m)
    files: set[str] = set()
    for key, entry in arrays.items():
        _require(isinstance(entry, dict), f"the entry of {key!r} is not an object")
        shape = entry.get("shape")
        _require(isinstance(shape, list), f"the shape of {key!r} is not a list")
        for size in shape:
            _count(size, f"a dimension of {key!r}")
        _require(entry.get("dtype") in _DTYPES, f"the dtype of {key!r} is {entry.get('dtype')!r}")
        problem = writer.validate_array(key, entry, files)
        _require(problem is None, str(problem))
    shards = m.get("shards")
    _require(isinstance(shards, list), "shards is not a list")
    start = 0
    for k, shard in enumerate(shards):
        _require(isinstance(shard, dict), f"shard {k} is not an object")
        _require(_count(shard.get("start"), f"the start of shard {k}") == start,
                 f"shard {k} starts at {shard.get('start')}, not at {start} where shard {k - 1} ended")
        start += _count(shard.get("count"), f"the count of shard {k}")
        inputs = shard.get("inputs")
        _require(inputs is None or is_digest(inputs), f"shard {k} has a malformed inputs digest")
        problem = writer.validate_shard(k, shard, arrays)
        _require(problem is None, str(problem))
    _require(start == n, f"the shards hold {start} samples, num_samples says {n}")
    identity = m.get("identity")
    _require(isinstance(identity, dict) and identity.get("format") == fmt, "identity is missing or of another format")
    recorded = {k: (v.get("shape"), v.get("dtype")) for k, v in features.items()}
    _require({k: (v.get("shape"), v.get("dtype")) for k, v in identity.get("features", {}).items()} == recorded,
             "features differ from the run identity")


def consistency(m: dict[str, Any]) -> list[str]:
    """How a (valid) manifest's counts, shards and target disagree with its own run identity.

    The identity fixes the number of samples, whether a target is stored and, for map-style
    datasets and shuffled text, every shard's rows (``shard_size`` each, the last one the rest).
    A manifest that lost shards, rows or its target is caught here.
    """
    identity, problems = m["identity"], []
    n = identity.get("num_samples")
    if n is not None and m["num_samples"] != n:
        problems.append(f"{MANIFEST} lists {m['num_samples']} samples, its run identity {n}")
    if (m.get("target") is None) != (identity.get("target") is None):
        problems.append(f"{MANIFEST} {'drops' if m.get('target') is None else 'adds'} the target of its run identity")
    if set(m["features"]) != set(identity.get("features", {})):
        problems.append(f"{MANIFEST} lists other features than its run identity")
    text = identity.get("text")
    fixed = (identity.get("batch_size") is not None and text is None) or (text or {}).get("shuffle") is not None
    size = identity.get("shard_size")
    if n is not None and fixed and isinstance(size, int) and size > 0:
        layout = [(k * size, min(size, n - k * size)) for k in range(-(-n // size))]
        if [(s["start"], s["count"]) for s in m["shards"]] != layout:
            problems.append(f"{MANIFEST} lists {len(m['shards'])} shards, its run identity gives {len(layout)} "
                            f"of {size} samples")
    return problems


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two run identities."""
    out = []
    for key, label in _NAMES.items():
        if key == "text" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict) \
                and {**old[key], "tokens": None} == {**new[key], "tokens": None} and old[key] != new[key]:
            out.append(f"data: its tokens differ ({str(old[key].get('tokens'))[:19]} before, "
                       f"{str(new[key].get('tokens'))[:19]} now: the text was changed)")
        elif old.get(key) != new.get(key):
            a, b = _short(old.get(key)), _short(new.get(key))
            out.append(f"{label}: {a} before, {b} now")
    return out


def _short(value: Any) -> str:
    if isinstance(value, dict) and "fingerprint" in value:
        return f"{value.get('name')} {value['fingerprint'][:19]}"
    if isinstance(value, dict):
        return str({k: (v.get("shape"), v.get("dtype")) if isinstance(v, dict) else v for k, v in value.items()})
    return repr(value)


def write(out: Path, identity: dict[str, Any], files: dict[str, dict[str, Any]], shards: list[dict[str, Any]],
          command: str | None) -> dict[str, Any]:
    """Write ``manifest.json`` (rank 0, last, atomically) and return it.

    For a format whose files do not name their run, the same document is first written to
    :data:`~.names.CLAIM`, which stays: if ``manifest.json`` is lost, it still proves the files
    fxstore's, and the same run rebuilds the manifest from it after checking every row.
    """
    manifest: dict[str, Any] = {
        "fxstore_manifest": VERSION,
        "format": identity["format"],
        "num_samples": sum(s["count"] for s in shards),
        "features": {k: {**v, **files.get(k, {})} for k, v in identity["features"].items()},
        "target": None if identity["target"] is None else {**identity["target"], **files.get("target", {})},
        "shards": shards,
        "checksum": ALGORITHM,
        "model": identity["model"],
        **({"text": identity["text"]} if "text" in identity else {}),
        "data": identity["data"],
        "command": command if command is not None else " ".join(sys.argv),
        "versions": {"fxstore": _fxstore_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "safetensors": safetensors.__version__, "python": sys.version.split()[0]},
        "identity": identity,
    }
    if not get(identity["format"]).self_describing:
        atomic_write_json(out / CLAIM, manifest)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _fxstore_version() -> str:
    return __version__
