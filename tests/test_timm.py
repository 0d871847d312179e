"""timm models trace out of the box: timm's not-traceable registries are merged automatically."""

import pytest
import torch
from _hooks import hooked_outputs

import fxstore
from fxstore.capture import _registry
from fxstore.capture._tracing import TraceOptions
from fxstore.capture.extractor import FeatureExtractor

timm = pytest.importorskip("timm")


def test_registries_are_merged_into_every_trace():
    kwargs = TraceOptions().tracer_kwargs()
    assert set(timm.layers.get_notrace_modules()) <= set(kwargs["leaf_modules"])
    assert set(timm.layers.get_notrace_functions()) <= set(kwargs["autowrap_functions"])


def _called_once(model, x) -> list[str]:
    """Modules up to two levels deep (``blocks``, ``blocks.3``) called exactly once with a tensor output,
    in eager mode and in the traced graph (timm's ViT calls ``blocks.N`` one by one when traced, and
    an ``Identity`` has no output node of its own)."""
    traced = set(fxstore.trace_report(model).modules)
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1 and n in traced]
    calls = {n: 0 for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: calls.__setitem__(n, calls[n] + (1 if isinstance(o, torch.Tensor) else 2)))
        for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [n for n in names if calls[n] == 1]


BLOCKS = {  # blocks each model's test must include
    "vit_tiny_patch16_224": [f"blocks.{i}" for i in range(12)],  # every transformer block
    "levit_128s": ["stages.0", "stages.1", "stages.2"],
    "convnext_atto": ["stages.0", "stages.3"],
    "efficientnet_b0": ["blocks.0", "blocks.6"],
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_timm_model_uses_fx_and_matches_hooks(name):
    blocks = BLOCKS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.rand(1, *model.pretrained_cfg["input_size"])
    layers = _called_once(model, x)
    assert set(blocks) <= set(layers), sorted(set(blocks) - set(layers))
    ex = FeatureExtractor(model, layers)
    assert ex.trace_report.frontend == "fx"
    out, feats = ex(x)
    ref_out, ref = hooked_outputs(model, layers, x)
    assert torch.equal(out, ref_out)
    assert list(feats) == layers
    for layer in layers:
        assert torch.equal(feats[layer], ref[layer][0]), layer


def test_without_the_registry_a_timm_model_does_not_trace(monkeypatch):
    model = timm.create_model("efficientvit_b0", pretrained=False)
    assert "stages.2.blocks.1.context_module.main" in fxstore.node_names(model, frontend="fx")  # a leaf
    monkeypatch.setattr(_registry, "_timm_layers", lambda: None)
    with pytest.raises(fxstore.TraceError, match=r"could not trace module 'stages.2.blocks.1.context_module.main' \(LiteMLA\)"):
        fxstore.node_names(model, frontend="fx")
