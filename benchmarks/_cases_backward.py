"""Case 5: forward + loss + backward with gradients captured at the four stages.

References are ``torch.autograd.grad`` of the same loss with respect to the stage
outputs (:func:`benchmarks._verify.gradient_reference`). Hook contenders run on their
own copies; every contender zeroes its parameter gradients each call, like a training
step would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fxstore

from ._cases_compile import ATOL, RTOL, isolated_copy
from ._config import Profile
from ._measure import Failed, attempt, compare, compile_contender
from ._models import STAGES, build
from ._report import Row
from ._timing import Contender, Features
from ._verify import gradient_reference, loss_of

__all__ = ["backward"]

Call = Callable[[torch.Tensor], Any]


def _full_backward_hooks(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The classic recipe: ``register_full_backward_hook`` storing ``grad_output[0]``."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for n in names:
        modules[n].register_full_backward_hook(lambda _m, _gi, go, n=n: store.__setitem__(n, go[0]))
    return store


def _tensor_hooks(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The lighter recipe: a forward hook that registers a tensor hook on the output."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def forward_hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            out.register_hook(lambda g: store.__setitem__(name, g))

        return hook

    for n in names:
        modules[n].register_forward_hook(forward_hook(n))
    return store


def _step(model: nn.Module, call: Call, x: torch.Tensor) -> Any:
    model.zero_grad(set_to_none=True)
    out = call(x)
    loss_of(out[0] if isinstance(out, tuple) else out).backward()
    return out


def _setups(model: nn.Module, names: Sequence[str], x: torch.Tensor,
            wrap: Callable[..., Call]) -> dict[str, Callable[[], Callable[[], Features | None]]]:
    """Setups of the contenders; ``wrap(module, **kw)`` is identity (eager) or a compilation
    (``torch.compile(ex, fullgraph=True)`` for the extractor, gradient taps included)."""

    def plain() -> Callable[[], Features | None]:
        call = wrap(model)
        return lambda: (_step(model, call, x), None)[1]

    def extractor() -> Callable[[], Features | None]:
        ex = fxstore.FeatureExtractor(model, [], grads=list(names))
        call = wrap(ex, fullgraph=True)

        def run() -> Features:
            _, feats = _step(model, call, x)
            return ex.gradients(feats)

        return run

    def with_hooks(recipe: Callable[[nn.Module, Sequence[str]], dict[str, torch.Tensor]]) -> Callable[..., Any]:
        def setup() -> Callable[[], Features | None]:
            twin = isolated_copy(model)
            store = recipe(twin, names)
            call = wrap(twin)

            def run() -> Features:
                store.clear()
                _step(twin, call, x)
                return dict(store)

            return run

        return setup

    return {
        "plain fwd+bwd": plain,
        "fxstore grads=": extractor,
        "full backward hooks": with_hooks(_full_backward_hooks),
        "tensor hooks (out.register_hook)": with_hooks(_tensor_hooks),
    }


def backward(profile: Profile, device: torch.device) -> list[Row]:
    """Case 5, eager then compiled."""
    model = build(profile.small_resnet).to(device)
    x = torch.rand(profile.backward_b, 3, profile.backward_r, profile.backward_r,
                   generator=torch.Generator().manual_seed(1)).to(device)
    names = list(STAGES)
    reference = gradient_reference(model, names, x)
    label = f"{profile.small_resnet} b{profile.backward_b} {profile.backward_r}² · grads of 4 stages"

    eager: list[Contender | Failed] = [
        attempt(name, lambda setup=setup, name=name: Contender(name, setup()))
        for name, setup in _setups(model, names, x, lambda m, **_: m).items()
    ]
    rows = compare(f"5 backward eager · {label}", eager, reference, profile, device, rtol=1e-5, atol=1e-7)

    def compiled(module: nn.Module, **kwargs: Any) -> Call:
        return torch.compile(module, backend=profile.backward_compile_backend, **kwargs)

    entries = [compile_contender(name, setup, profile, cold=False)[0]
               for name, setup in _setups(model, names, x, compiled).items()]
    rows += compare(f"5 backward torch.compile ({profile.backward_compile_backend}) · {label}", entries, reference, profile,
                    device, rtol=RTOL, atol=ATOL)
    return rows


