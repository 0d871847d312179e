"""The self-check: a captured program must reproduce the plain model's output.

``torch.fx`` can trace a model *silently wrong* (a Python branch taken at trace time that
the real inputs would not take; torchvision's ``mvit_v2_s`` is one). So once, on the first
call (or at build time when example inputs are given), the extractor runs the plain model
and compares. Both runs leave no trace: buffers (batch-norm statistics) and the random
generators are restored, so the real call that follows behaves as if it were the only one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

__all__ = ["Snapshot", "compare"]


class Snapshot:
    """The model's buffers and the random generators' states, to put back after a trial run.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> state = Snapshot(bn, ())
        >>> _ = bn(torch.rand(4, 2))
        >>> state.restore()
        >>> bn.running_mean
        tensor([0., 0.])
    """

    def __init__(self, model: nn.Module, inputs: Any) -> None:
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._devices = sorted({t.device.index or 0 for t in _tensors((inputs, list(model.parameters())))
                                if t.device.type == "cuda"})
        self._cpu = torch.random.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in self._devices]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        torch.random.set_rng_state(self._cpu)
        for device, state in zip(self._devices, self._cuda):
            torch.cuda.set_rng_state(state, device)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in _pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def compare(expected: Any, actual: Any) -> tuple[bool, str]:
    """Whether ``actual`` reproduces ``expected`` (same structure, values equal or very close).

    Returns:
        ``(ok, verdict)``: ``"exact"``, ``"close (max |Δ| 3e-07)"``, or why it differs.

    Example:
        >>> compare(torch.ones(2), torch.ones(2))
        (True, 'exact')
        >>> compare(torch.ones(2), torch.zeros(2))
        (False, 'output differs from the plain model (max |Δ| 1)')
    """
    want, want_spec = _pytree.tree_flatten(expected)
    got, got_spec = _pytree.tree_flatten(actual)
    if len(want) != len(got):
        return False, f"output structure differs from the plain model ({got_spec} vs {want_spec})"
    worst = 0.0
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False, f"output differs from the plain model ({type(b).__name__} vs {type(a).__name__})"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False, f"output differs from the plain model ({b!r} vs {a!r})"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, (f"output differs from the plain model (shape {tuple(b.shape)} {b.dtype} vs "
                           f"{tuple(a.shape)} {a.dtype})")
        if torch.equal(a, b) or a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().to(a.device).double()
        same_nan = torch.isnan(a64) == torch.isnan(b64)
        if not bool(same_nan.all()):
            return False, "output differs from the plain model (NaN in different places)"
        finite = ~torch.isnan(a64)
        delta = float((a64 - b64)[finite].abs().max()) if bool(finite.any()) else 0.0
        scale = float(a64[finite].abs().max()) if bool(finite.any()) else 0.0
        if delta > _tolerance(a.dtype) * max(1.0, scale):
            return False, f"output differs from the plain model (max |Δ| {delta:.3g})"
        worst = max(worst, delta)
    return True, "exact" if worst == 0.0 else f"close (max |Δ| {worst:.1g})"
