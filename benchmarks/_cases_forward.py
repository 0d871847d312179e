"""Eager forward cases: stage outputs (1), every Conv2d (2), truncated extraction (3)."""

from __future__ import annotations

import torch
from torch import nn

from . import _contenders as C
from ._config import Profile
from ._measure import Failed, attempt, compare
from ._models import STAGES, build
from ._report import Row
from ._timing import Contender
from ._verify import OUTPUT, forward_reference

__all__ = ["stage_outputs", "many_taps", "truncated"]


def _input(profile_b: int, r: int, device: torch.device) -> torch.Tensor:
    return torch.rand(profile_b, 3, r, r, generator=torch.Generator().manual_seed(1)).to(device)


def _torchlens(model: nn.Module, names: list[str], x: torch.Tensor, profile: Profile) -> Contender | Failed:
    reason = C.torchlens_status(profile.torchlens)
    if reason is not None:
        return Failed("TorchLens", reason)
    return attempt("TorchLens", lambda: C.torchlens(model, names, x, every=profile.slow_every))


def stage_outputs(profile: Profile, device: torch.device) -> list[Row]:
    """Case 1: the four stage outputs plus the final output, every contender."""
    model = build(profile.resnet).to(device)
    x = _input(profile.eager_b, profile.eager_r, device)
    names = list(STAGES)
    case = f"1 eager fwd · {profile.resnet} b{profile.eager_b} {profile.eager_r}² · 4 stages + output"
    entries = [
        C.plain(model, x),
        attempt("fxstore", lambda: C.extractor(model, names, x)),
        attempt("hooks (minimal recipe)", lambda: C.hooks(model, names, x)),
        attempt("fxstore hook backend", lambda: C.hook_backend(model, names, x)),
        attempt("torchvision create_feature_extractor", lambda: C.torchvision_extractor(model, names, x)),
        _torchlens(model, names, x, profile),
    ]
    return compare(case, entries, forward_reference(model, names, x), profile, device,
                   keys={"TorchLens": names})


def many_taps(profile: Profile, device: torch.device) -> list[Row]:
    """Case 2: every ``Conv2d`` tapped, batch 1, a small input: the per-tap overhead."""
    model = build(profile.resnet).to(device)
    x = _input(1, profile.taps_r, device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    case = f"2 eager fwd, many taps · {profile.resnet} b1 {profile.taps_r}² · {len(names)} Conv2d + output"
    entries = [
        C.plain(model, x),
        attempt("fxstore", lambda: C.extractor(model, nn.Conv2d, x, name="fxstore")),
        attempt("hooks (minimal recipe)", lambda: C.hooks(model, names, x)),
        attempt("fxstore hook backend", lambda: C.hook_backend(model, names, x)),
        attempt("torchvision create_feature_extractor", lambda: C.torchvision_extractor(model, names, x)),
    ]
    return compare(case, entries, forward_reference(model, names, x), profile, device)


def _prefix(model: nn.Module, layer: str) -> nn.Module:
    """The hand-written part of the model up to ``layer``: the least work truncation can do."""
    if layer.startswith("features."):
        return model.features[: int(layer.split(".")[1]) + 1]
    stem = [model.conv1, model.bn1, model.relu, model.maxpool]
    return nn.Sequential(*stem, model.layer1)


def _truncated_one(model_name: str, layer: str, b: int, r: int, profile: Profile, device: torch.device) -> list[Row]:
    model = build(model_name).to(device)
    x = _input(b, r, device)
    case = f"3 truncated · {model_name} b{b} {r}² · only {layer}"
    entries = [
        C.plain(model, x, name="plain model (full forward)"),
        C.plain(_prefix(model, layer), x, name=f"plain prefix up to {layer} (the floor)"),
        attempt("fxstore keep_output=False", lambda: C.extractor(model, [layer], x, keep_output=False,
                                                                   name="fxstore keep_output=False")),
        attempt("hooks (minimal recipe)", lambda: C.hooks(model, [layer], x)),
        attempt("torchvision create_feature_extractor",
                lambda: C.torchvision_extractor(model, [layer], x, keep_output=False)),
    ]
    only = {e.name: [layer] for e in entries if isinstance(e, Contender)}
    only["hooks (minimal recipe)"] = [layer, OUTPUT]
    return compare(case, entries, forward_reference(model, [layer], x), profile, device, keys=only)


def truncated(profile: Profile, device: torch.device) -> list[Row]:
    """Case 3: only an early layer, no final output, against the full forward and hooks."""
    rows = _truncated_one(profile.resnet, "layer1", profile.trunc_b, profile.trunc_r, profile, device)
    if profile.vgg:
        rows += _truncated_one(profile.vgg, "features.3", profile.vgg_b, profile.vgg_r, profile, device)
    return rows
