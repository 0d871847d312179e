"""The statistics of one layer over a dataset (:class:`FeatureStatistics`), their file, and the Fréchet distance."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, OutputError

__all__ = ["FeatureStatistics", "frechet_distance", "save_all", "load_all"]

_ARRAYS = ("mean", "cov", "fired", "top_values", "top_indices", "top_positions")
_KIND = "fxstore.feature_statistics"


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """The statistics of one layer's rows over a whole dataset (what :func:`fxstore.feature_statistics` gives).

    Attributes:
        layer: The feature key.
        count: Rows seen (images: samples; language models: real tokens, padding excluded).
        mean: ``[D]`` float64.
        cov: ``[D, D]`` float64, unbiased (like ``numpy.cov(rows, rowvar=False)``); ``None`` with ``moments=False``.
        fired: ``[D]`` int64: rows where the unit is ``> 0``.
        top_values: ``[D, top_k]`` float64: per unit, the largest values, best first.
        top_indices: ``[D, top_k]`` int64: the sample (image, or sequence for text) of each value; among
            equal values the lower index comes first.
        top_positions: ``[D, top_k]`` int64: the token position of each value (language models), else ``None``.
        identity: What the statistics were computed from: model fingerprint, data, layers and options.
    """

    layer: str
    count: int
    mean: torch.Tensor
    cov: torch.Tensor | None
    fired: torch.Tensor
    top_values: torch.Tensor
    top_indices: torch.Tensor
    top_positions: torch.Tensor | None = None
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def frequency(self) -> torch.Tensor:
        """``[D]`` float64: the fraction of rows where each unit fires (``> 0``)."""
        return self.fired.to(torch.float64) / self.count

    @property
    def dim(self) -> int:
        """``D``, the number of units."""
        return int(self.mean.shape[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write these statistics to ``path`` (safetensors, with the run's identity in its metadata).

        Example:
            >>> import tempfile, torch, fxstore
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
            >>> data = torch.utils.data.TensorDataset(torch.rand(8, 3))
            >>> s = fxstore.feature_statistics(net, ["0"], data, batch_size=4, progress=False)["0"]
            >>> path = s.save(tempfile.mkdtemp() + "/ref.safetensors")
            >>> fxstore.FeatureStatistics.load(path).count
            8
        """
        return save_all({self.layer: self}, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], layer: str | None = None) -> FeatureStatistics:
        """Read statistics written by :meth:`save` (or ``fxstore stats --out``).

        Args:
            path: The file.
            layer: Which layer, when the file holds several (default: its only one).

        Raises:
            OutputError: the file is missing or not a statistics file.
            ConfigError: ``layer`` is not in the file, or the file holds several and none was named.
        """
        found = load_all(path)
        if layer is None and len(found) == 1:
            return next(iter(found.values()))
        if layer in found:
            return found[layer]
        raise ConfigError(
            f"layer={layer!r}: '{path}' holds the statistics of {sorted(found)}.\n"
            f"Hint: pass layer= one of {sorted(found)}."
        )


def save_all(stats: dict[str, FeatureStatistics], path: str | os.PathLike[str]) -> Path:
    """Write several layers' statistics to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"kind": _KIND, "layers": {}}
    for name, s in stats.items():
        for field in _ARRAYS:
            value = getattr(s, field)
            if value is not None:
                tensors[f"{name}/{field}"] = value.contiguous()
        meta["layers"][name] = {"count": s.count}
        meta.setdefault("identity", s.identity)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(temp), metadata={"fxstore": json.dumps(meta)})
        os.replace(temp, path)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}.\nHint: check the folder exists and is writable.") from e
    return path


def load_all(path: str | os.PathLike[str]) -> dict[str, FeatureStatistics]:
    """Every layer's statistics in a file written by :func:`save_all`.

    Raises:
        OutputError: the file is missing or not a statistics file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fxstore", "{}"))
            if meta.get("kind") != _KIND:
                raise OutputError(f"'{path}' is not an fxstore statistics file.\n"
                                  "Hint: write one with fxstore.feature_statistics(...)[layer].save(path) "
                                  "or `fxstore stats ... --out FILE`.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise OutputError(f"cannot read statistics from '{path}': {e}.\n"
                          "Hint: pass a file written by FeatureStatistics.save or `fxstore stats --out`.") from e
    identity = meta.get("identity", {})
    return {name: FeatureStatistics(name, int(info["count"]),
                                    **{field: tensors.get(f"{name}/{field}") for field in _ARRAYS},
                                    identity=identity)
            for name, info in meta["layers"].items()}


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """The Fréchet distance between two Gaussians fitted to feature rows (the FID formula), in float64.

    ``|mean_a - mean_b|² + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^½)``, the trace of the square root
    taken as the sum of the square roots of the eigenvalues of ``cov_a @ cov_b`` (as torchmetrics does).

    Args:
        a: Statistics of one dataset (computed with ``moments=True``).
        b: Statistics of the other, over the same layer of the same model.

    Returns:
        The distance, a Python float.

    Raises:
        ConfigError: statistics without a covariance, from fewer than two rows, or of different widths.

    Example:
        >>> import torch, fxstore
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> def stats(x):
        ...     return fxstore.feature_statistics(net, ["0"], torch.utils.data.TensorDataset(x), progress=False)["0"]
        >>> a, b = stats(torch.rand(32, 4)), stats(torch.rand(32, 4) + 1)
        >>> fxstore.frechet_distance(a, a) < 1e-9, fxstore.frechet_distance(a, b) > 0.1
        (True, True)
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, FeatureStatistics):
            raise ConfigError(f"{name} is a {type(s).__name__}, not FeatureStatistics.\n"
                              "Hint: pass fxstore.feature_statistics(...)[layer] or FeatureStatistics.load(path).")
        if s.cov is None:
            raise ConfigError(f"{name} ({s.layer!r}) has no covariance: it was computed with moments=False.\n"
                              "Hint: compute it with moments=True (the default).")
        if s.count < 2:
            raise ConfigError(f"{name} ({s.layer!r}) holds {s.count} row(s): a covariance needs at least 2.\n"
                              "Hint: use more data.")
    if a.dim != b.dim:
        raise ConfigError(f"a has {a.dim} units and b has {b.dim}: they are not the same layer's statistics.\n"
                          "Hint: compare statistics of the same layer of the same model.")
    mu_a, mu_b = a.mean.to(torch.float64), b.mean.to(torch.float64)
    cov_a, cov_b = a.cov.to(torch.float64), b.cov.to(torch.float64)
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace
    return float(value)
