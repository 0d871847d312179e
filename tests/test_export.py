"""The torch.export frontend: Hugging Face transformers, ATen in-place safety, frontend choice and errors."""

import pytest
import torch
from _hooks import hooked_grads, hooked_outputs
from torch import nn

import fxstore
from fxstore import FeatureExtractor, trace_report

transformers = pytest.importorskip("transformers")


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)
    return transformers.GPT2Model(config).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100)
    return transformers.BertModel(config).eval()


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
CASES = {
    "gpt2": (gpt2, ["h.0", "h.1.attn", "h.1.mlp", "ln_f"], {"use_cache": False}),
    "bert": (bert, ["encoder.layer.0", "encoder.layer.1.attention", "encoder.layer.1.output", "pooler"], {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_picks_export_and_features_equal_hooks(name):
    build, layers, kwargs = CASES[name]
    model = build()
    ex = FeatureExtractor(model, layers)
    out, feats = ex(IDS, **kwargs)
    assert ex.trace_report.frontend == "export"
    assert "fx" in ex.trace_report.reasons
    ref_out, ref = hooked_outputs(model, layers, IDS, **kwargs)
    assert torch.equal(out.last_hidden_state, ref_out.last_hidden_state)
    assert list(feats) == layers
    for layer in layers:
        assert torch.equal(feats[layer], ref[layer][0]), layer


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_autograd_on_hooked_outputs(name):
    build, layers, kwargs = CASES[name]
    model = build()
    ex = FeatureExtractor(model, grads=layers[:3])
    out, feats = ex(IDS, **kwargs)
    out.last_hidden_state.pow(2).sum().backward()
    ref = hooked_grads(model, layers[:3], lambda o: o.last_hidden_state.pow(2).sum(), IDS, **kwargs)
    grads = ex.gradients(feats)
    for layer in layers[:3]:
        torch.testing.assert_close(grads[layer], ref[layer][0], rtol=0, atol=1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    build, layers, kwargs = CASES[name]
    model = build()
    ex = FeatureExtractor(model, layers[:2], grads=layers[2:3], example_inputs=((IDS,), kwargs))
    eager_out, eager = ex(IDS, **kwargs)
    ex.compile(backend="aot_eager")  # fullgraph; the gradient probes are made outside the graph
    out, feats = ex(IDS, **kwargs)
    torch.testing.assert_close(out.last_hidden_state, eager_out.last_hidden_state, rtol=0, atol=1e-6)
    for layer in layers[:2]:
        torch.testing.assert_close(feats[layer], eager[layer], rtol=0, atol=1e-6)
    out.last_hidden_state.sum().backward()
    ref = hooked_grads(model, layers[2:3], lambda o: o.last_hidden_state.sum(), IDS, **kwargs)
    torch.testing.assert_close(ex.gradients(feats)[layers[2]], ref[layers[2]][0], rtol=0, atol=1e-6)


def test_node_names_follow_module_paths():
    names = fxstore.node_names(gpt2(), example_inputs=((IDS,), {"use_cache": False}))
    assert "wte.embedding" in names and "h.0.attn.c_attn.addmm" in names and "h.1.mlp.act.tanh" in names


def test_node_name_selects_one_aten_node():
    model = gpt2()
    ex = FeatureExtractor(model, ["h.0.mlp.c_fc.addmm"])
    _, feats = ex(IDS, use_cache=False)
    _, ref = hooked_outputs(model, ["h.0.mlp.c_fc"], IDS, use_cache=False)
    assert torch.equal(feats["h.0.mlp.c_fc.addmm"].view(2, 8, -1), ref["h.0.mlp.c_fc"][0])  # Conv1D: addmm, then view


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        y.mul_(2)
        return self.act(y)


def test_aten_in_place_ops_do_not_change_stored_values():
    model = InPlace()
    x = torch.randn(3, 4)
    out, feats = FeatureExtractor(model, ["lin", "act"], frontend="export", example_inputs=x)(x)
    assert torch.equal(feats["lin"], model.lin(x))
    assert torch.equal(feats["act"], out) and torch.equal(out, model(x))


def test_new_input_shape_exports_again():
    model = gpt2()
    ex = FeatureExtractor(model, ["h.0"])
    for shape in ((2, 8), (1, 5)):
        ids = torch.randint(0, 100, shape)
        out, feats = ex(ids, use_cache=False)
        assert torch.equal(out.last_hidden_state, model(ids, use_cache=False).last_hidden_state)
        assert feats["h.0"].shape == (*shape, 64)


def test_forcing_fx_on_a_transformer_raises_trace_error():
    with pytest.raises(fxstore.TraceError, match=r"(?s)torch.fx could not trace module .*HookForwardModuleStorage"):
        FeatureExtractor(gpt2(), ["h.0"], frontend="fx")


def test_unknown_frontend_is_a_config_error():
    with pytest.raises(fxstore.ConfigError, match=r"(?s)frontend='onnx' is not a frontend.*Hint: use one of"):
        FeatureExtractor(gpt2(), ["h.0"], frontend="onnx")


def test_trace_report_without_example_inputs_asks_for_them():
    with pytest.raises(fxstore.ConfigError, match=r"(?s)needs example inputs.*Hint: pass example_inputs"):
        trace_report(gpt2())


class DataDependent(nn.Module):
    """No submodules, and control flow on a tensor value: no frontend can capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


def test_model_no_frontend_handles_names_each_reason_and_suggests_hooks():
    with pytest.raises(fxstore.TraceError,
                       match=r"(?s)any frontend:.*fx: .*DataDependent.*export: torch.export could not.*partial: .*"
                             r"Hint: .*HookForwardModuleStorage"):
        FeatureExtractor(DataDependent(), ["x"], example_inputs=torch.ones(2))


def test_forced_export_failure_names_the_model():
    with pytest.raises(fxstore.TraceError, match=r"torch.export could not export DataDependent.*\nHint:"):
        FeatureExtractor(DataDependent(), ["x"], frontend="export", example_inputs=torch.ones(2))
