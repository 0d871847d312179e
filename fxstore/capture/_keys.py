"""Feature-key naming, in one place: how a key is built and how it is read back.

A key is ``name[_N][@K][:I][:grad]``:

- ``name``: the layer's name (module path, node name or alias);
- ``_N``: the N-th call of a module called several times in one graph (torchvision's own
  suffix; ``relu``, ``relu_1``, ...);
- ``@K``: the K-th run of a part of the model kept as Python by the partial frontend
  (torch.export's mark for repeated module calls; ``rpn.head.conv@1``);
- ``:I``: element I of a module that returns several tensors (``block:0``, ``block:1``);
- ``:grad``: the gradient probe of a tapped layer (``layer1:grad``).
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["GRAD_SUFFIX", "FeatureKey", "parse_key", "call_key", "output_key", "repeat_key", "grad_key",
           "grad_source"]

GRAD_SUFFIX = ":grad"
"""Suffix of the keys that hold gradient probes (``"layer1:grad"``)."""

_PATTERN = re.compile(r"^(?P<base>.*?)(?:@(?P<run>\d+))?(?::(?P<index>\d+))?(?P<grad>:grad)?$")


@dataclasses.dataclass(frozen=True)
class FeatureKey:
    """A feature key read back into its parts (see :func:`parse_key`).

    Attributes:
        name: The layer part, repeated-call suffix ``_N`` included (``"layer1.0.relu_1"``).
        run: Which run of a partially traced part (``0`` for the first or only run).
        index: Element of a multi-output module, or ``None``.
        grad: Whether the key holds a gradient probe.
    """

    name: str
    run: int = 0
    index: int | None = None
    grad: bool = False

    def __str__(self) -> str:
        key = self.name + (f"@{self.run}" if self.run else "")
        key += f":{self.index}" if self.index is not None else ""
        return key + (GRAD_SUFFIX if self.grad else "")


def parse_key(key: str) -> FeatureKey:
    """Split a feature key into its parts; ``str()`` of the result gives the key back.

    Example:
        >>> parse_key("rpn.head.conv@1:0:grad")
        FeatureKey(name='rpn.head.conv', run=1, index=0, grad=True)
        >>> str(parse_key("layer1"))
        'layer1'
    """
    match = _PATTERN.match(key)
    if match is None:  # the pattern matches every string; kept for type checkers
        return FeatureKey(key)
    index = match.group("index")
    return FeatureKey(match.group("base"), int(match.group("run") or 0), None if index is None else int(index),
                      bool(match.group("grad")))


def repeat_key(name: str, call: int) -> str:
    """The key of the ``call``-th call of ``name`` inside one graph (``relu``, ``relu_1``, ...)."""
    return name if call == 0 else f"{name}_{call}"


def output_key(base: str, index: int) -> str:
    """The key of element ``index`` of a multi-output layer (``block:0``)."""
    return f"{base}:{index}"


def grad_key(key: str) -> str:
    """The key of the gradient probe of ``key``."""
    return key + GRAD_SUFFIX


def grad_source(key: str) -> str | None:
    """The key whose gradient probe ``key`` is, or ``None`` when ``key`` is not a probe.

    Example:
        >>> grad_source("layer1:grad"), grad_source("layer1")
        ('layer1', None)
    """
    return key[: -len(GRAD_SUFFIX)] if key.endswith(GRAD_SUFFIX) else None


def call_key(key: str, run: int) -> str:
    """The key of a feature in the ``run``-th run of its partially traced part (``conv:0`` -> ``conv@1:0``)."""
    if run == 0:
        return key
    base, sep, index = key.partition(":")
    return f"{base}@{run}{sep}{index}"
