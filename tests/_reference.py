"""Independent references the tests compare fxstore against.

They share nothing with fxstore's rewrite passes: the graph comes from torchvision's own
``NodePathTracer`` and runs in ``torch.fx.Interpreter`` (node by node, at run time), values
are cloned the moment they are produced, and gradients come from ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torchvision.models import feature_extraction as tv


def traced_reference(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """torchvision's tracer on a shallow copy of ``model`` (constants fx adds stay off the model)."""
    twin = copy.copy(model)
    tracer = tv.NodePathTracer(**tv._set_default_tracer_kwargs(None))
    graph = tracer.trace(twin)
    return fx.GraphModule(tracer.root, graph), dict(tracer.node_to_qualname)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: dict[fx.Node, str], wanted: Iterable[str], probe: bool) -> None:
        super().__init__(gm)
        self.names, self.wanted, self.probe = names, set(wanted), probe
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        name = self.names.get(n)
        if name in self.wanted and isinstance(value, torch.Tensor):
            if self.probe:
                leaf = torch.zeros_like(value, requires_grad=True)
                self.values[name] = leaf
                return value + leaf
            self.values[name] = value.detach().clone()
        return value


def node_values(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Model output and the value of each named node at the moment it was produced."""
    gm, node_names = traced_reference(model)
    rec = _Recorder(gm, node_names, names, probe=False)
    with torch.no_grad():
        out = rec.run(x)
    return out, rec.values


def node_grads(model: nn.Module, x: torch.Tensor, names: Iterable[str], loss_fn: Any) -> dict[str, torch.Tensor]:
    """d loss / d (node output) for each named node, via ``torch.autograd.grad``."""
    gm, node_names = traced_reference(model)
    rec = _Recorder(gm, node_names, names, probe=True)
    out = rec.run(x)
    leaves = list(rec.values.values())
    grads = torch.autograd.grad(loss_fn(out), leaves, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(rec.values.items(), grads)}


def hook_outputs(model: nn.Module, x: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Module outputs via forward hooks, cloned at once (the careful hook recipe)."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = [m.register_forward_hook(lambda _m, _i, o, k=k: store[k].append(o.detach().clone()))
               for k, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return store


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (segmentation models return a dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"]
    if isinstance(out, tuple):
        return out[0]
    raise TypeError(type(out))


def scalar_loss(out: Any) -> torch.Tensor:
    """A loss with non-trivial gradients everywhere (fixed weights, no sum symmetry)."""
    t = output_tensor(out)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(t.shape, generator=g, dtype=t.dtype)
    return (t * w).sum()
