"""pytest-benchmark micro cases: one forward pass per contender (``pytest benchmarks --benchmark-only``).

Each contender's captured values are checked against the independent reference before
it is timed; the timings themselves are never asserted.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from . import _contenders as C
from ._models import STAGES, build
from ._timing import Contender
from ._verify import check, forward_reference

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
Builder = Callable[[nn.Module, list[str], torch.Tensor], Contender]
BUILDERS: dict[str, Builder] = {
    "plain": lambda m, names, x: C.plain(m, x),
    "fxstore": lambda m, names, x: C.extractor(m, names, x),
    "hooks": lambda m, names, x: C.hooks(m, names, x),
    "hook_backend": lambda m, names, x: C.hook_backend(m, names, x),
    "torchvision": lambda m, names, x: C.torchvision_extractor(m, names, x),
}


def _timed(benchmark: object, model: nn.Module, names: list[str], x: torch.Tensor, builder: Builder) -> None:
    contender = builder(model, names, x)
    got = contender.run()
    if got is not None:
        verdict = check(got, forward_reference(model, names, x))
        assert not verdict.startswith("FAILED"), verdict
    benchmark(contender.run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contender", list(BUILDERS))
def test_stage_outputs(benchmark: object, contender: str, device: str) -> None:
    """resnet18, batch 2, 64²: the four stage outputs plus the final output."""
    benchmark.group = f"stage outputs resnet18 {device}"
    model = build("resnet18").to(device)
    _timed(benchmark, model, list(STAGES), torch.rand(2, 3, 64, 64, device=device), BUILDERS[contender])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contender", list(BUILDERS))
def test_every_conv(benchmark: object, contender: str, device: str) -> None:
    """resnet18, batch 1, 32²: every Conv2d tapped (the per-tap overhead)."""
    benchmark.group = f"every Conv2d resnet18 {device}"
    model = build("resnet18").to(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    _timed(benchmark, model, names, torch.rand(1, 3, 32, 32, device=device), BUILDERS[contender])
