"""Case 9 (CUDA only): storing the four stage outputs in CPU memory.

Contenders: features kept on the GPU (no copy, the floor of capture); ``.cpu()`` of each
feature after the call; fxstore copying inside the graph (``device="cpu"``) blocking and
with ``non_blocking=True`` (``Tensor.to`` then writes into pinned memory; one
``torch.cuda.synchronize()`` before the values are read); hooks calling ``.cpu()``; hooks
copying into pre-allocated pinned buffers with ``non_blocking=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fxstore

from . import _contenders as C
from ._config import Profile
from ._measure import attempt, compare
from ._models import STAGES, build
from ._report import Row
from ._timing import Contender, Features
from ._verify import forward_reference

__all__ = ["copy_to_cpu"]


def _fx(model: nn.Module, x: torch.Tensor, name: str, after: Callable[[dict[str, torch.Tensor]], Features],
        **options: Any) -> Contender:
    ex = fxstore.FeatureExtractor(model, list(STAGES), keep_output=False, **options)

    def run() -> Features:
        with torch.no_grad():
            return after(ex(x)[1])

    return Contender(name, run)


def _synchronized(features: dict[str, torch.Tensor]) -> Features:
    torch.cuda.synchronize()
    return features


def _pinned_hooks(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> Contender:
    """Hooks copying each output into a pinned buffer with ``non_blocking=True``."""
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    buffers: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def store(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            if name not in buffers:
                buffers[name] = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            buffers[name].copy_(out, non_blocking=True)

        return store

    for n in names:
        modules[n].register_forward_hook(hook(n))

    def run() -> Features:
        with torch.no_grad():
            twin(x)
        torch.cuda.synchronize()
        return dict(buffers)

    return Contender("hooks, pinned buffers non_blocking", run, note="buffers reused every call")


def _cpu_hooks(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> Contender:
    recipe = C.HookRecipe(copy.deepcopy(model), names)

    def run() -> Features:
        with torch.no_grad():
            stored = recipe(x)
        return {n: v[-1].cpu() for n, v in stored.items() if n in names}

    return Contender("hooks, .cpu() of each output", run)


def copy_to_cpu(profile: Profile, device: torch.device) -> list[Row]:
    """Case 9; a single "skipped" row without a CUDA device."""
    case = f"9 store on CPU (CUDA) · {profile.resnet} b{profile.copy_b} {profile.copy_r}² · 4 stages"
    if device.type != "cuda":
        return [Row(case, "(all)", None, None, None, None, "skipped: needs --device cuda")]
    model = build(profile.resnet).to(device)
    x = torch.rand(profile.copy_b, 3, profile.copy_r, profile.copy_r,
                   generator=torch.Generator().manual_seed(1)).to(device)
    names = list(STAGES)
    entries = [
        attempt("fxstore, features left on GPU", lambda: _fx(model, x, "fxstore, features left on GPU", dict)),
        attempt("fxstore + .cpu() after the call", lambda: _fx(
            model, x, "fxstore + .cpu() after the call", lambda f: {k: v.cpu() for k, v in f.items()})),
        attempt("fxstore device='cpu'", lambda: _fx(model, x, "fxstore device='cpu'", dict, device="cpu")),
        attempt("fxstore device='cpu', non_blocking=True", lambda: _fx(
            model, x, "fxstore device='cpu', non_blocking=True", _synchronized, device="cpu", non_blocking=True)),
        attempt("hooks, .cpu() of each output", lambda: _cpu_hooks(model, names, x)),
        attempt("hooks, pinned buffers non_blocking", lambda: _pinned_hooks(model, names, x)),
    ]
    reference = forward_reference(model, names, x)
    return compare(case, entries, reference, profile, device, keys={e.name: names for e in entries
                                                                       if isinstance(e, Contender)})
