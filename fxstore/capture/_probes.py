"""Gradient probes made outside the compiled region, for any input shape.

``torch.compile`` cannot create a gradient-requiring leaf inside a graph once shapes are
dynamic, but zero probes made *before* the compiled call and passed in as inputs give
exact gradients for every shape. Making them needs the shape of each tapped value before
the model runs. :class:`ProbeMaker` finds those shapes once, symbolically: it runs the
program on fake tensors whose sizes are symbols, and keeps each probe's shape as a
formula of the input sizes plus the conditions (guards) under which the formulas hold.
A new input shape then costs a dictionary lookup, or evaluating a few formulas; only an
input that breaks a guard (or a size 0/1, which fake tensors specialise) runs the fake
program again, with concrete sizes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree

__all__ = ["ProbeMaker", "ProbeSpec"]

ProbeSpec = tuple[tuple[int, ...], torch.dtype, torch.device]
Signature = tuple[Any, ...]

_CACHE_SIZE = 64


class ProbeMaker:
    """Shapes of a program's gradient probes for given inputs, cached per input signature.

    Args:
        run: ``run(args, kwargs) -> probes``: the program with in-graph probes; called under
            a fake-tensor mode, so nothing real is computed.
        snapshot: ``snapshot() -> state`` with ``state.restore()``: taken before each fake run
            and restored after it (a 0-dim buffer such as batch norm's ``num_batches_tracked``
            is updated for real even under fake tensors).
    """

    def __init__(self, run: Callable[[tuple[Any, ...], dict[str, Any]], Sequence[torch.Tensor]],
                 snapshot: Callable[[], Any]) -> None:
        self._run = run
        self._snapshot = snapshot
        self._cache: collections.OrderedDict[Signature, list[ProbeSpec]] = collections.OrderedDict()
        self._symbolic: _Formulas | None = None
        self._symbolic_runs = 0
        self.fake_runs = 0  # how many times the program ran on fake tensors (observable cost)

    def make(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Fresh zero probes (``requires_grad=True``) for a call with ``args``/``kwargs``."""
        return [torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
                for shape, dtype, device in self.specs(args, kwargs)]

    def specs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[ProbeSpec]:
        """Shape, dtype and device of each probe for these inputs."""
        leaves, spec = _pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = _signature(leaves, spec)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        found = self._symbolic.evaluate(leaves) if self._symbolic is not None else None
        if found is None and self._symbolic_runs < 2 and (self._symbolic is None or self._symbolic.specialised(leaves)):
            # First call, or the formulas fixed a size to 0/1 that this input has larger: derive them again.
            self._symbolic_runs += 1
            try:
                found, self._symbolic = self._fake_run(args, kwargs, symbolic=True)
            except Exception:  # an op without a symbolic-shape rule: concrete fake runs still work
                self._symbolic_runs = 2
        if found is None:
            found = self._fake_run(args, kwargs, symbolic=False)[0]
        self._cache[key] = found
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return found

    def _fake_run(self, args: tuple[Any, ...], kwargs: dict[str, Any], symbolic: bool
                  ) -> tuple[list[ProbeSpec], _Formulas | None]:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        self.fake_runs += 1
        env = ShapeEnv(duck_shape=False) if symbolic else None
        mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
        leaves, spec = _pytree.tree_flatten((tuple(args), dict(kwargs)))
        fakes: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * leaf.dim()) if symbolic else None
                fakes.append(mode.from_tensor(leaf, symbolic_context=context) if symbolic else mode.from_tensor(leaf))
            else:
                fakes.append(leaf)
        fargs, fkwargs = _pytree.tree_unflatten(fakes, spec)
        state = self._snapshot()
        try:
            with mode:
                probes = list(self._run(fargs, fkwargs))
        finally:
            state.restore()
        concrete = [(tuple(int(s) for s in _hint(p.shape, env)), p.dtype, p.device) for p in probes]
        formulas = _Formulas(env, leaves, fakes, probes) if symbolic else None
        return concrete, formulas


def _hint(shape: Any, env: Any) -> list[int]:
    if env is None:
        return [int(s) for s in shape]
    values = getattr(env, "backed_var_to_val", None) or env.var_to_val
    return [int(s.node.expr.xreplace(values)) if isinstance(s, torch.SymInt) else int(s) for s in shape]


class _Formulas:
    """Probe shapes as formulas of the input sizes, valid where the recorded guards hold."""

    def __init__(self, env: Any, leaves: list[Any], fakes: list[Any], probes: list[torch.Tensor]) -> None:
        import sympy

        self._sympy = sympy
        self._env = env
        self._inputs: list[tuple[int, int, Any]] = []  # (leaf, dim, symbol or fixed int)
        for i, (leaf, fake) in enumerate(zip(leaves, fakes)):
            if isinstance(leaf, torch.Tensor):
                for d, size in enumerate(fake.shape):
                    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
                    self._inputs.append((i, d, env.simplify(expr)))
        self._probes = [
            ([env.simplify(s.node.expr) if isinstance(s, torch.SymInt) else sympy.Integer(int(s)) for s in p.shape],
             p.dtype, p.device)
            for p in probes
        ]
        self._guards = [env.simplify(g.expr) for g in env.guards]
        self._ranks = {i: leaf.dim() for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}

    def specialised(self, leaves: list[Any]) -> bool:
        """Whether these inputs are larger than 1 in a size the formulas fixed to 0 or 1."""
        sympy = self._sympy
        return any(isinstance(expr, sympy.Integer) and int(expr) in (0, 1) and i < len(leaves)
                   and isinstance(leaves[i], torch.Tensor) and d < leaves[i].dim() and leaves[i].shape[d] > 1
                   for i, d, expr in self._inputs)

    def evaluate(self, leaves: list[Any]) -> list[ProbeSpec] | None:
        """The probe specs for these input leaves, or ``None`` if the formulas do not apply."""
        sympy = self._sympy
        ranks = {i: leaf.dim() for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}
        if ranks != self._ranks:
            return None
        values: dict[Any, Any] = {}
        for i, d, expr in self._inputs:
            size = int(leaves[i].shape[d])
            if isinstance(expr, sympy.Integer):
                if int(expr) != size:
                    return None
            elif isinstance(expr, sympy.Symbol):
                if size < 2 or values.setdefault(expr, size) != size:  # 0/1 are specialised by fake tensors
                    return None
            else:  # a size the fake run related to others: check it holds
                values.setdefault(("check", i, d), (expr, size))
        checks = [v for k, v in values.items() if isinstance(k, tuple)]
        mapping = {k: sympy.Integer(v) for k, v in values.items() if not isinstance(k, tuple)}
        try:
            for expr, size in checks:
                if int(expr.xreplace(mapping)) != size:
                    return None
            for guard in self._guards:
                if not bool(guard.xreplace(mapping)):
                    return None
            return [(tuple(int(e.xreplace(mapping)) for e in shape), dtype, device)
                    for shape, dtype, device in self._probes]
        except (TypeError, ValueError):  # a formula that does not reduce to a number
            return None


def _signature(leaves: list[Any], spec: Any) -> Signature:
    parts: list[Any] = [spec]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            parts.append(leaf if isinstance(leaf, (bool, int, float, str, type(None))) else type(leaf))
    return tuple(parts)
