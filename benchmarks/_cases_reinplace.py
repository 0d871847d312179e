"""Case 16: the re-inplacing pass on and off, against hooks and the plain model.

"pass off" builds the extractor with ``fxstore.capture._reinplace.reinplace`` replaced by a
no-op (the graph as torch.fx records it: every ``out += identity`` out of place); "pass on"
is fxstore as shipped. Four runs, each interleaved with its own baseline:

- resnet50, every ``Conv2d`` stored (53 taps), against forward hooks keeping the same tensors;
- resnet50, the four stage outputs, against the plain model;
- a ViT, its encoder blocks, against the plain model (no residual ``+=`` there: nothing to win);
- resnet50, gradients tapped at the four stages, eager forward + backward against plain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import torch
from torch import nn

import fxstore
from fxstore.capture import _reinplace

from . import _contenders as C
from ._config import Profile
from ._measure import Failed, attempt, compare
from ._models import STAGES, build, vit_blocks
from ._report import Row
from ._timing import Contender, Features
from ._verify import forward_reference, gradient_reference, loss_of

__all__ = ["reinplace"]


@contextlib.contextmanager
def _pass(on: bool) -> Iterator[None]:
    with contextlib.nullcontext() if on else mock.patch.object(_reinplace, "reinplace", lambda graph, root: 0):
        yield


def _extractor(model: nn.Module, layers: Any, x: torch.Tensor, on: bool) -> Contender:
    name = f"fxstore, pass {'on' if on else 'off'}"
    with _pass(on):
        ex = fxstore.FeatureExtractor(model, layers)
        ex(x)  # the program is built (and kept) here, inside the patch

    def run() -> Features:
        with torch.no_grad():
            return C.features_of(*ex(x))

    return Contender(name, run, note=_rewritten(ex))


def _rewritten(ex: fxstore.FeatureExtractor) -> str:
    return f"{ex.code.count('fxstore_capture__reinplace_')} adds written in place"


def _input(b: int, r: int, device: torch.device) -> torch.Tensor:
    return torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(1)).to(device)


def _forward(case: str, model: nn.Module, layers: Any, names: Sequence[str], x: torch.Tensor, profile: Profile,
             device: torch.device, baseline: Contender | Failed) -> list[Row]:
    entries = [
        baseline,
        attempt("fxstore, pass on", lambda: _extractor(model, layers, x, True)),
        attempt("fxstore, pass off", lambda: _extractor(model, layers, x, False)),
    ]
    return compare(case, entries, forward_reference(model, names, x), profile, device)


def _gradients(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[Contender | Failed]:
    def plain() -> Contender:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss_of(model(x)).backward()

        return Contender("plain fwd+bwd", run)

    def extractor(on: bool) -> Callable[[], Contender]:
        def setup() -> Contender:
            with _pass(on):
                ex = fxstore.FeatureExtractor(model, [], grads=list(names))

            def run() -> Features:
                model.zero_grad(set_to_none=True)
                out, feats = ex(x)
                loss_of(out).backward()
                return ex.gradients(feats)

            return Contender(f"fxstore grads=, pass {'on' if on else 'off'}", run, note=_rewritten(ex))

        return setup

    return [attempt("plain fwd+bwd", plain), attempt("fxstore grads=, pass on", extractor(True)),
            attempt("fxstore grads=, pass off", extractor(False))]


def reinplace(profile: Profile, device: torch.device) -> list[Row]:
    """Case 16: the four runs above."""
    b, r = profile.eager_b, profile.eager_r
    model = build(profile.resnet).to(device)
    x = _input(b, r, device)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    rows = _forward(f"16 re-inplacing · {profile.resnet} b{b} {r}² · {len(convs)} Conv2d + output", model,
                    nn.Conv2d, convs, x, profile, device,
                    attempt("hooks keeping the same tensors", lambda: C.hooks(model, convs, x,
                                                                            name="hooks keeping the same tensors")))
    rows += _forward(f"16 re-inplacing · {profile.resnet} b{b} {r}² · 4 stages + output", model, list(STAGES),
                     list(STAGES), x, profile, device, C.plain(model, x))
    vit = build(profile.vit, image_size=profile.vit_r).to(device)
    vx = _input(profile.vit_b, profile.vit_r, device)
    blocks = vit_blocks(vit)
    rows += _forward(f"16 re-inplacing · {profile.vit} b{profile.vit_b} {profile.vit_r}² · {len(blocks)} blocks + "
                     "output", vit, blocks, blocks, vx, profile, device, C.plain(vit, vx))
    names = list(STAGES)
    rows += compare(f"16 re-inplacing · {profile.resnet} b{b} {r}² · eager fwd+bwd, grads of 4 stages",
                    _gradients(model, names, x), gradient_reference(model, names, x), profile, device,
                    rtol=1e-5, atol=1e-7)
    return rows
