"""pytest-benchmark micro cases: the one-off cost of building an extractor."""

from __future__ import annotations

import pytest
from torchvision.models import feature_extraction as tv

import fxstore

from ._models import STAGES, build, vit_blocks


@pytest.mark.parametrize("model_name", ["resnet50", "vit_b_16"])
@pytest.mark.parametrize("builder", ["fxstore", "torchvision"])
def test_trace_and_rewrite(benchmark: object, builder: str, model_name: str) -> None:
    """Trace, select, rewrite and recompile (resnet50 target: under 0.2 s)."""
    benchmark.group = f"build {model_name}"
    model = build(model_name)
    names = vit_blocks(model) if model_name.startswith("vit") else list(STAGES)
    if builder == "fxstore":
        benchmark(fxstore.FeatureExtractor, model, names)
    else:
        benchmark(tv.create_feature_extractor, model, {n: n for n in names})
