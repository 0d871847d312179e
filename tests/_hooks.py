"""Independent references for the partial/export tests: forward hooks and torch.autograd.grad.

Nothing here uses fxstore: outputs are recorded (cloned) by forward hooks on the plain
model, and gradients come from zero probes added to hooked outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def hooked_outputs(model: nn.Module, names: list[str], *args: Any, **kwargs: Any) -> tuple[Any, dict[str, list]]:
    """Model output and, per module, the first tensor of each call's output (cloned), in call order."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: seen[n].append(_tensors(out)[0].detach().clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return output, seen


def hooked_grads(model: nn.Module, names: list[str], loss_fn: Any, *args: Any, **kwargs: Any) -> dict[str, list]:
    """d loss / d (first tensor of each module call's output), via zero probes and torch.autograd.grad."""
    probes: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(_m: nn.Module, _i: Any, out: Any, n: str) -> Any:
        leaves, spec = tree_flatten(out)
        i = next(k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor))
        probe = torch.zeros_like(leaves[i], requires_grad=True)
        probes[n].append(probe)
        leaves[i] = leaves[i] + probe
        return tree_unflatten(leaves, spec)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    try:
        loss = loss_fn(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    flat = [p for n in names for p in probes[n]]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    out, k = {}, 0
    for n in names:
        out[n] = list(grads[k:k + len(probes[n])])
        k += len(probes[n])
    return out
