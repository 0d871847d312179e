"""Independent references and the comparison that fills the table's "verified" column.

The forward reference is the plain model on its own copy with temporary forward hooks
that *clone* each module output (so a later in-place op cannot change it); the gradient
reference is ``torch.autograd.grad`` of the loss with respect to those same outputs.
Neither uses fxstore.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["forward_reference", "gradient_reference", "check", "loss_of", "OUTPUT"]

OUTPUT = "output"
"""Key of the model's final output among the captured values."""


def loss_of(output: torch.Tensor) -> torch.Tensor:
    """The scalar loss every backward case uses."""
    return output.float().pow(2).mean()


def _capture(model: nn.Module, names: Sequence[str], store: Callable[[str, torch.Tensor], Any]) -> list[Any]:
    """Forward hooks calling ``store(name, output)``; a hook returning a tensor replaces the output."""
    modules = dict(model.named_modules())
    return [modules[n].register_forward_hook(lambda _m, _i, out, n=n: store(n, out)) for n in names]


def _keep_clone(found: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], None]:
    def store(name: str, out: torch.Tensor) -> None:  # returns None: the model's own output flows on
        found.setdefault(name, out.detach().clone())
    return store


def _probe(probes: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor | None]:
    """``out + zero probe`` on the first call: d loss / d probe is d loss / d out, even if a later
    in-place op (``ReLU(inplace=True)``) rewrites the output tensor."""
    def store(name: str, out: torch.Tensor) -> torch.Tensor | None:
        if name in probes:
            return None
        probes[name] = torch.zeros_like(out, requires_grad=True)
        return out + probes[name]
    return store


def forward_reference(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: module output}`` plus ``{"output": model(x)}``, on a hooked copy of ``model``."""
    twin = copy.deepcopy(model)
    found: dict[str, torch.Tensor] = {}
    handles = _capture(twin, names, _keep_clone(found))
    with torch.no_grad():
        found[OUTPUT] = twin(x)
    for handle in handles:
        handle.remove()
    return found


def gradient_reference(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: d loss / d module output}`` computed with ``torch.autograd.grad``."""
    twin = copy.deepcopy(model)
    probes: dict[str, torch.Tensor] = {}
    handles = _capture(twin, names, _probe(probes))
    with torch.enable_grad():
        loss = loss_of(twin(x))
        grads = torch.autograd.grad(loss, [probes[n] for n in names])
    for handle in handles:
        handle.remove()
    return dict(zip(names, grads, strict=True))


def check(got: Mapping[str, Any] | None, expected: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None,
          rtol: float = 0.0, atol: float = 0.0) -> str:
    """Compare captured values with the reference; the text for the "verified" column.

    Args:
        got: What the contender captured (a tensor, or a non-empty list of tensors whose
            last element is used, per key).
        expected: The reference.
        keys: The keys the contender must have captured (default: all of ``expected``).
        rtol: Relative tolerance; with ``atol`` both zero the values must be bit-identical.
        atol: Absolute tolerance.

    Returns:
        ``"exact"``, ``"close (max |Δ| …)"``, or ``"FAILED: …"`` naming the first problem.
    """
    keys = list(expected) if keys is None else list(keys)
    if not got:
        return "FAILED: captured nothing"
    worst = 0.0
    for key in keys:
        value = got.get(key)
        if isinstance(value, (list, tuple)):
            value = value[-1] if value else None
        if not isinstance(value, torch.Tensor):
            return f"FAILED: '{key}' not captured"
        ref = expected[key]
        if value.shape != ref.shape:
            return f"FAILED: '{key}' shape {tuple(value.shape)} != {tuple(ref.shape)}"
        value = value.detach().to(device=ref.device)
        ref = ref.to(dtype=value.dtype) if value.dtype != ref.dtype else ref
        if torch.equal(value, ref):
            continue
        diff = (value.double() - ref.double()).abs()
        bound = atol + rtol * ref.double().abs()
        if not bool((diff <= bound).all()):
            return f"FAILED: '{key}' max |Δ| {diff.max().item():.2g}"
        worst = max(worst, diff.max().item())
    return "exact" if worst == 0.0 else f"close (max |Δ| {worst:.1g})"
