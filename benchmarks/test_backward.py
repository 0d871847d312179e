"""pytest-benchmark micro cases: forward + loss + backward with gradients captured at four stages."""

from __future__ import annotations

import pytest
import torch

import fxstore

from ._models import STAGES, build
from ._verify import check, gradient_reference, loss_of


@pytest.mark.parametrize("contender", ["plain", "fxstore"])
def test_backward_with_gradient_taps(benchmark: object, contender: str) -> None:
    """resnet18, batch 2, 64²; fxstore's gradients are checked against ``torch.autograd.grad``."""
    benchmark.group = "backward resnet18"
    model = build("resnet18")
    x = torch.rand(2, 3, 64, 64)
    ex = fxstore.FeatureExtractor(model, [], grads=list(STAGES))

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()

    def extractor() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out, feats = ex(x)
        loss_of(out).backward()
        return ex.gradients(feats)

    if contender == "fxstore":
        verdict = check(extractor(), gradient_reference(model, list(STAGES), x), rtol=1e-5, atol=1e-7)
        assert not verdict.startswith("FAILED"), verdict
    benchmark(plain if contender == "plain" else extractor)
