"""Compiled cases: resnet (4) and the ViT case (8, eager and compiled).

Compile time is the setup plus first call of each compiled contender, against an empty
inductor cache when the profile asks for it; steady state is timed afterwards,
interleaved. Hooks under ``torch.compile`` are verified like everything else: hooks
that the compiled graph skipped capture nothing and are reported as FAILED.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fxstore

from . import _contenders as C
from ._config import Profile
from ._measure import Failed, attempt, compare, compile_contender
from ._models import STAGES, build, vit_blocks
from ._report import Row
from ._timing import Contender, Features
from ._verify import forward_reference

__all__ = ["compiled_resnet", "vit", "isolated_copy", "RTOL", "ATOL"]

# Inductor reorders float reductions, and under dynamo nn.MultiheadAttention leaves its
# fused inference fast path: compiled (and TorchLens-traced) values are compared with a tolerance.
RTOL, ATOL = 1e-3, 1e-4


def _compile(fn: Any, profile: Profile, **kwargs: Any) -> Any:
    return torch.compile(fn, backend=profile.compile_backend, **kwargs)


def isolated_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose class is a fresh subclass of the model's class.

    Dynamo guards a compiled module call on the module's type, not on its hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards`` is on by default). A hooked copy of
    the same class as the already compiled plain model would silently reuse the plain
    model's graph, hooks skipped. The fresh class makes the copy compile on its own, as
    it would in a process of its own.
    """
    twin = copy.deepcopy(model)
    twin.__class__ = type(f"Hooked{type(model).__name__}", (type(model),), {})
    return twin


def _no_grad(fn: Callable[[], Features | None]) -> Callable[[], Features | None]:
    def run() -> Features | None:
        with torch.no_grad():
            return fn()

    return run


def _setups(model: nn.Module, names: Sequence[str], x: torch.Tensor, profile: Profile,
            with_torchvision: bool = True) -> dict[str, Callable[[], Callable[[], Features | None]]]:
    """Setup functions of the compiled contenders; each returns the steady-state call."""

    def plain() -> Callable[[], Features | None]:
        compiled = _compile(model, profile)
        return _no_grad(lambda: (compiled(x), None)[1])

    def extractor() -> Callable[[], Features | None]:
        compiled = _compile(fxstore.FeatureExtractor(model, list(names)), profile, fullgraph=True)
        return _no_grad(lambda: C.features_of(*compiled(x)))

    def hooks_before() -> Callable[[], Features | None]:
        recipe = C.HookRecipe(isolated_copy(model), names)
        compiled = _compile(recipe.model, profile)
        return _no_grad(lambda: recipe(x, compiled))

    def hooks_after() -> Callable[[], Features | None]:
        twin = isolated_copy(model)
        compiled = _compile(twin, profile)
        with torch.no_grad():
            compiled(x)
        recipe = C.HookRecipe(twin, names)
        return _no_grad(lambda: recipe(x, compiled))

    def torchvision() -> Callable[[], Features | None]:
        nodes = {**{n: n for n in names}}
        compiled = _compile(create_feature_extractor(model, return_nodes=nodes), profile)
        return _no_grad(lambda: compiled(x))

    setups = {
        "plain model, compiled": plain,
        "fxstore, compiled fullgraph=True": extractor,
        "hooks registered before compile": hooks_before,
        "hooks registered after compile": hooks_after,
    }
    if with_torchvision:
        setups["torchvision extractor, compiled"] = torchvision
    return setups


def _compiled_rows(case: str, model: nn.Module, names: Sequence[str], x: torch.Tensor, profile: Profile,
                   device: torch.device, with_torchvision: bool = True, cold: bool = True) -> list[Row]:
    entries: list[Contender | Failed] = []
    for index, (name, setup) in enumerate(_setups(model, names, x, profile, with_torchvision).items()):
        # cold: only the plain model and fxstore (the compile-time comparison that matters), to save minutes
        entries.append(compile_contender(name, setup, profile, cold=cold and index < 2)[0])
    keys = {"torchvision extractor, compiled": list(names)}
    return compare(case, entries, forward_reference(model, names, x), profile, device, keys=keys, rtol=RTOL, atol=ATOL)


def compiled_resnet(profile: Profile, device: torch.device) -> list[Row]:
    """Case 4: compiled extractor vs compiled plain model vs compiled hooked model."""
    model = build(profile.small_resnet).to(device)
    x = torch.rand(profile.compile_b, 3, profile.compile_r, profile.compile_r,
                   generator=torch.Generator().manual_seed(1)).to(device)
    case = (f"4 torch.compile ({profile.compile_backend}) · {profile.small_resnet} b{profile.compile_b} "
            f"{profile.compile_r}² · 4 stages + output")
    return _compiled_rows(case, model, list(STAGES), x, profile, device)


def vit(profile: Profile, device: torch.device) -> list[Row]:
    """Case 8: a ViT's block outputs, eager and compiled."""
    model = build(profile.vit, image_size=profile.vit_r).to(device)
    names = vit_blocks(model)
    x = torch.rand(profile.vit_b, 3, profile.vit_r, profile.vit_r, generator=torch.Generator().manual_seed(1)).to(device)
    label = f"{profile.vit} b{profile.vit_b} {profile.vit_r}² · {len(names)} blocks + output"
    entries: list[Contender | Failed] = [
        C.plain(model, x),
        attempt("fxstore", lambda: C.extractor(model, names, x)),
        attempt("hooks (minimal recipe)", lambda: C.hooks(model, names, x)),
        attempt("torchvision create_feature_extractor", lambda: C.torchvision_extractor(model, names, x)),
    ]
    reason = C.torchlens_status(profile.torchlens)
    entries.append(Failed("TorchLens", reason) if reason else
                   attempt("TorchLens", lambda: C.torchlens(model, names, x, every=profile.slow_every)))
    reference = forward_reference(model, names, x)
    rows = compare(f"8 ViT eager · {label}", entries, reference, profile, device, keys={"TorchLens": names},
                   rtol=RTOL, atol=ATOL)
    if not profile.vit_compiled:
        return rows
    rows += _compiled_rows(f"8 ViT torch.compile ({profile.compile_backend}) · {label}", model, names, x, profile,
                           device, with_torchvision=False, cold=False)
    return rows

