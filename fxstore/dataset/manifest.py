"""The manifest: what an output folder holds, and whether a run may resume into it.

``manifest.json`` is written last, by rank 0, once every shard is durable; its presence
means the folder is complete. While a run is in progress, ``.fxstore-run.json`` holds the
run's *identity* (format, model fingerprint, features with shapes and dtypes, sample
count, shard and batch size, data): a later run resumes only if its identity is equal.

Deterministic content: the data files (shards, ``.npy``) depend only on the identity and
the computed values, never on time, host or number of processes. ``manifest.json`` holds
no timestamp either; only ``command`` and ``versions`` can differ between equivalent runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from torch import nn

from ._outdir import TEMP_SUFFIX, OutputError, atomic_write_json
from ._sinks import NpySink, SafetensorsSink, file_stem

__all__ = ["MANIFEST", "read_manifest", "model_fingerprint"]

MANIFEST = "manifest.json"
RUN_FILE = ".fxstore-run.json"
VERSION = 1

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


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 over the class, parameter and buffer names, dtypes, shapes and values.

    Example:
        >>> import copy, torch
        >>> from fxstore.dataset.manifest import model_fingerprint
        >>> a = torch.nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(copy.deepcopy(a))
        True
        >>> model_fingerprint(a).startswith("sha256:")
        True
    """
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "sha256:" + digest.hexdigest()


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a finished output folder.

    Raises:
        OutputError: the folder holds no finished extraction.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> from fxstore.dataset.manifest import read_manifest
        >>> out = tempfile.mkdtemp()
        >>> _ = extract_dataset(torch.nn.Linear(4, 2), "linear", torch.rand(2, 3, 4), out, progress=False)
        >>> read_manifest(out)["num_samples"]
        6
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        running = (Path(out) / RUN_FILE).is_file()
        why = "an interrupted run is in it" if running else "nothing fxstore wrote is in it"
        raise OutputError(
            f"'{out}' holds no finished extraction (no {MANIFEST}); {why}.\n"
            "Hint: run the extraction (again: it resumes) to completion, then load it."
        )
    return json.loads(path.read_text())


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two run identities."""
    out = []
    for key, label in _NAMES.items():
        if old.get(key) != new.get(key):
            a, b = _short(old.get(key)), _short(new.get(key))
            out.append(f"{label}: {a} before, {b} now")
    return out


def _short(value: Any) -> str:
    if isinstance(value, dict) and "fingerprint" in value:
        return f"{value.get('name')} {value['fingerprint'][:19]}"
    if isinstance(value, dict):
        return str({k: (v.get("shape"), v.get("dtype")) if isinstance(v, dict) else v for k, v in value.items()})
    return repr(value)


def state(out: Path, identity: dict[str, Any], overwrite: bool) -> str:
    """Decide what a run does with ``out``: ``"fresh"``, ``"resume"`` or ``"complete"``.

    Raises:
        OutputError: ``out`` holds a different run, or files fxstore did not write.
    """
    if overwrite:
        clean(out)
    recorded = _recorded_identity(out)
    if recorded is not None:
        differences = describe_mismatch(recorded, identity)
        if differences:
            raise OutputError(
                f"refusing to resume into '{out}': it holds a different extraction ("
                + "; ".join(differences) + ").\n"
                "Hint: use a new output folder, or overwrite=True (CLI: --overwrite) to start over."
            )
        return "complete" if (out / MANIFEST).is_file() else "resume"
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name)) if out.is_dir() else []
    if foreign:
        raise OutputError(
            f"the output folder '{out}' is not empty and holds no fxstore extraction ({', '.join(foreign[:3])}"
            + (", ..." if len(foreign) > 3 else "") + ").\nHint: choose a new or empty folder."
        )
    return "fresh"


def _recorded_identity(out: Path) -> dict[str, Any] | None:
    manifest, run = out / MANIFEST, out / RUN_FILE
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("identity")
    if run.is_file():
        return json.loads(run.read_text())
    return None


def _ours(name: str) -> bool:
    return (name in (MANIFEST, RUN_FILE, NpySink.PROGRESS) or name.endswith(TEMP_SUFFIX) or name.endswith(".partial")
            or re.fullmatch(r"shard-\d{5,}\.safetensors", name) is not None)


def clean(out: Path) -> None:
    """Remove every file an earlier fxstore run wrote into ``out`` (and nothing else)."""
    if not out.is_dir():
        return
    recorded = _recorded_identity(out) or {}
    npy_files = {file_stem(key) + ".npy" for key in list(recorded.get("features", {})) + ["target"]}
    for path in out.iterdir():
        if path.name == NpySink.PROGRESS:
            shutil.rmtree(path)
        elif _ours(path.name) or path.name in npy_files:
            path.unlink()


def write_run_file(out: Path, identity: dict[str, Any]) -> None:
    """Record the identity of a starting run (rank 0)."""
    atomic_write_json(out / RUN_FILE, identity)


def write(out: Path, identity: dict[str, Any], shards: dict[int, tuple[int, int]], files: dict[str, str],
          command: str | None) -> dict[str, Any]:
    """Write ``manifest.json`` (rank 0, last) and remove the run file; return the manifest."""
    manifest: dict[str, Any] = {
        "fxstore_manifest": VERSION,
        "format": identity["format"],
        "num_samples": sum(count for _, count in shards.values()),
        "features": {k: {**v, **({"file": files[k]} if k in files else {})} for k, v in identity["features"].items()},
        "target": None if identity["target"] is None else {
            **identity["target"], **({"file": files["target"]} if "target" in files else {})},
        "shards": [
            {"file": SafetensorsSink.shard_file(k) if identity["format"] == "safetensors" else None,
             "start": start, "count": count}
            for k, (start, count) in sorted(shards.items())
        ],
        "model": identity["model"],
        **({"text": identity["text"]} if "text" in identity else {}),
        "data": identity["data"],
        "command": command if command is not None else " ".join(sys.argv),
        "versions": {"fxstore": _fxstore_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "safetensors": safetensors.__version__, "python": sys.version.split()[0]},
        "identity": identity,
    }
    if identity["format"] != "safetensors":
        for shard in manifest["shards"]:
            del shard["file"]
    atomic_write_json(out / MANIFEST, manifest)
    (out / RUN_FILE).unlink(missing_ok=True)
    return manifest


def _fxstore_version() -> str:
    from .. import __version__

    return __version__
