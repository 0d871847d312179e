"""timm models trace out of the box: timm's not-traceable registries are merged automatically."""

import pytest
import torch
from _hooks import hooked_outputs

import fxstore
from fxstore import _registry
from fxstore.capture._tracing import TraceOptions
from fxstore.capture.extractor import FeatureExtractor

timm = pytest.importorskip("timm")


def test_registries_are_merged_into_every_trace():
    kwargs = TraceOptions().tracer_kwargs()
    assert set(timm.layers.get_notrace_modules()) <= set(kwargs["leaf_modules"])
    assert set(timm.layers.get_notrace_functions()) <= set(kwargs["autowrap_functions"])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "levit_128s", "convnext_atto", "efficientnet_b0"])
def test_timm_model_uses_fx_and_matches_hooks(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.rand(1, *model.pretrained_cfg["input_size"])
    layers = [n for n, _ in model.named_children()][:3]
    ex = FeatureExtractor(model, layers)
    assert ex.trace_report.frontend == "fx"
    out, feats = ex(x)
    ref_out, ref = hooked_outputs(model, layers, x)
    assert torch.equal(out, ref_out)
    for layer in layers:
        assert torch.equal(feats[layer], ref[layer][0]), layer


def test_without_the_registry_a_timm_model_does_not_trace(monkeypatch):
    model = timm.create_model("efficientvit_b0", pretrained=False)
    assert "stages.2.blocks.1.context_module.main" in fxstore.node_names(model, frontend="fx")  # a leaf
    monkeypatch.setattr(_registry, "_timm_layers", lambda: None)
    with pytest.raises(fxstore.TraceError, match=r"could not trace module 'stages.2.blocks.1.context_module.main' \(LiteMLA\)"):
        fxstore.node_names(model, frontend="fx")
