"""Resuming a statistics run: each rank's accumulators and finished shards, saved after every shard.

A run with ``checkpoint=PATH`` writes, after each shard it finishes, one safetensors file per rank
(``PATH``, or ``PATH.rank{r}-of-{w}`` under torchrun): the float64 accumulators of every layer, the
shards they cover and the run identity. Run the same call again and each rank starts from its file
and computes only the shards left; a finished run's files give the result without a forward pass.
A run whose identity differs (other data, model, layers or options) or another number of
processes is refused, naming the difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..dataset.batches import Ranks
from ..errors import OutputError
from ._partials import Accumulator

__all__ = ["Checkpoint"]

_KIND = "fxstore.feature_statistics.checkpoint"


class Checkpoint:
    """One rank's saved progress (``path`` ``None``: nothing is saved, the run starts from scratch)."""

    def __init__(self, path: str | os.PathLike[str] | None, identity: dict[str, Any], ranks: Ranks,
                 top_k: int, moments: bool) -> None:
        self.identity, self.top_k, self.moments = identity, top_k, moments
        self.done: set[int] = set()
        self.inputs: dict[int, str] = {}  # shard -> digest of its model inputs (map-style data)
        self.accumulators: dict[str, Accumulator] = {}
        self.path = None if path is None else _rank_path(Path(path), ranks)
        if self.path is not None:
            _refuse_other_world(Path(path), ranks)
            if self.path.exists():
                self._load()

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("fxstore", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (OSError, SafetensorError, json.JSONDecodeError) as e:
            raise OutputError(f"cannot read the checkpoint '{self.path}': {e}.\n"
                              "Hint: delete it to start over, or pass another checkpoint=.") from e
        if meta.get("kind") != _KIND:
            raise OutputError(f"'{self.path}' is not a statistics checkpoint.\nHint: pass another checkpoint= path.")
        differences = _differences(meta.get("identity", {}), self.identity)
        if differences:
            raise OutputError(
                f"refusing to resume from '{self.path}': it holds another run (" + "; ".join(differences) + ").\n"
                "Hint: pass the same model, data, layers and options, or another checkpoint= path."
            )
        self.done = set(meta["done"])
        self.inputs = {int(k): v for k, v in meta.get("inputs", {}).items()}
        for layer, count in meta["counts"].items():
            acc = Accumulator(self.top_k, self.moments)
            acc.count = int(count)
            acc.tensors = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == layer}
            self.accumulators[layer] = acc

    def save(self, shard: int, accumulators: dict[str, Accumulator], inputs: str | None = None) -> None:
        """Record ``shard`` as done with the accumulators that now cover it (atomic: a kill keeps the last save);
        ``inputs``: the digest of its model inputs."""
        self.done.add(shard)
        if inputs is not None:
            self.inputs[shard] = inputs
        if self.path is None:
            return
        from safetensors.torch import save_file

        tensors = {f"{layer}/{k}": v.detach().to("cpu").contiguous()
                   for layer, acc in accumulators.items() for k, v in acc.tensors.items()}
        meta = {"kind": _KIND, "identity": self.identity, "done": sorted(self.done),
                "inputs": {str(k): v for k, v in sorted(self.inputs.items())},
                "counts": {layer: acc.count for layer, acc in accumulators.items()}}
        temp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(temp), metadata={"fxstore": json.dumps(meta)})
            os.replace(temp, self.path)
        except OSError as e:
            raise OutputError(f"cannot write the checkpoint '{self.path}': {e.strerror or e}.\n"
                              "Hint: check the folder exists and is writable, or pass checkpoint=None.") from e


def _rank_path(path: Path, ranks: Ranks) -> Path:
    return path if ranks.world == 1 else path.with_name(f"{path.name}.rank{ranks.rank}-of-{ranks.world}")


def _refuse_other_world(path: Path, ranks: Ranks) -> None:
    """A checkpoint left by another number of processes cannot be split among these: refuse it."""
    others = [p for p in [path, *path.parent.glob(f"{path.name}.rank*-of-*")]
              if p.exists() and p != _rank_path(path, ranks) and not p.name.endswith(f"-of-{ranks.world}")]
    if others:
        raise OutputError(
            f"the checkpoint '{path}' was written by another number of processes ({others[0].name}); "
            f"this run has {ranks.world}.\n"
            "Hint: resume with the same number of processes, or pass another checkpoint= path."
        )


def _differences(recorded: dict[str, Any], current: dict[str, Any], where: str = "") -> list[str]:
    found = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{where}{key}.")
        elif a != b:
            found.append(f"{where}{key}: {a!r} then, {b!r} now")
    return found


def to_device(accumulators: dict[str, Accumulator], device: torch.device) -> None:
    """Move loaded accumulators to the run's device."""
    for acc in accumulators.values():
        acc.tensors = {k: v.to(device) for k, v in acc.tensors.items()}
