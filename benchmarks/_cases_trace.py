"""Case 7: the one-off cost of tracing and rewriting a model.

The floor is ``torch.fx.symbolic_trace`` with torchvision's tracer (what both extractors
start from); fxstore and torchvision then select nodes, rewrite the graph and recompile.
Each built extractor is verified with one call on a small input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import feature_extraction as tv

import fxstore

from ._config import Profile
from ._measure import attempt, compare
from ._models import STAGES, build, vit_blocks
from ._report import Row
from ._timing import Contender, Features
from ._verify import check, forward_reference

__all__ = ["trace_time"]


def _built(name: str, build_fn: Callable[[], nn.Module], call: Callable[[nn.Module], Features],
           reference: dict[str, torch.Tensor], keys: list[str]) -> Contender:
    """A contender whose timed call builds an extractor; it is verified once, up front."""
    verdict = check(call(build_fn()), reference, keys)

    def run() -> None:
        build_fn()

    return Contender(name, run, verdict=f"{verdict} (one call of the built extractor)")


def _floor(model: nn.Module) -> Contender:
    def run() -> None:
        tracer = tv.NodePathTracer(**tv._set_default_tracer_kwargs({}))
        tracer.trace(model)

    return Contender("fx trace alone (torchvision NodePathTracer)", run)


def trace_time(profile: Profile, device: torch.device) -> list[Row]:
    """Case 7, for each model of the profile."""
    rows: list[Row] = []
    for model_name in profile.trace_models:
        r = 32 if "tiny" in model_name else 224 if model_name.startswith("vit_b") else 64
        model = build(model_name, image_size=r).to(device)
        names = vit_blocks(model) if model_name.startswith("vit") else list(STAGES)
        x = torch.rand(1, 3, r, r, generator=torch.Generator().manual_seed(1)).to(device)
        reference = forward_reference(model, names, x)

        def fx_call(ex: nn.Module, x: torch.Tensor = x) -> Features:
            with torch.no_grad():
                out, feats = ex(x)
            return feats

        def tv_call(ex: nn.Module, x: torch.Tensor = x) -> Features:
            with torch.no_grad():
                return ex(x)

        entries = [
            attempt("fx trace", lambda model=model: _floor(model)),
            attempt("fxstore.FeatureExtractor(...)", lambda model=model, names=names, ref=reference: _built(
                "fxstore.FeatureExtractor(...)", lambda: fxstore.FeatureExtractor(model, names), fx_call, ref, names)),
            attempt("torchvision create_feature_extractor(...)", lambda model=model, names=names, ref=reference: _built(
                "torchvision create_feature_extractor(...)",
                lambda: tv.create_feature_extractor(model, {n: n for n in names}), tv_call, ref, names)),
        ]
        case = f"7 trace + rewrite · {model_name} · {len(names)} layers (ratio: × fx trace alone)"
        rows += compare(case, entries, reference, profile, torch.device("cpu"))
    return rows
