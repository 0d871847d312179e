"""Hugging Face models called as users call them: ``model(ids)``, no ``use_cache=False``.

References: the model's own ``output_hidden_states`` (hidden state ``i + 1`` is block ``i``'s
output for every block but the last) and ``torch.autograd.grad`` with respect to it.
"""

from __future__ import annotations

import pytest
import torch

import fxstore

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval(), "transformer.h.0"


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval(), "model.layers.0"


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _hidden(model, ids, mask=None):
    out = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states[1]


@pytest.mark.parametrize("name", MODELS)
def test_a_plain_call_is_captured_and_block_zero_equals_output_hidden_states(name):
    model, block = MODELS[name]()
    ids = torch.randint(0, 50, (2, 7))
    ex = fxstore.FeatureExtractor(model, [block])
    out, feats = ex(ids)
    logits, hidden = _hidden(model, ids)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert torch.allclose(_first(feats[block]), hidden, atol=1e-5)
    assert any("use_cache=False" in note for note in ex.trace_report.notes)
    assert "note: called with use_cache=False" in str(ex.trace_report)


@pytest.mark.parametrize("name", MODELS)
def test_trace_report_and_node_names_of_a_plain_call(name):
    model, block = MODELS[name]()
    ids = torch.randint(0, 50, (1, 5))
    report = fxstore.trace_report(model, example_inputs=(ids,))
    assert report.frontend == "export" and block in report.modules
    assert fxstore.node_names(model, example_inputs=(ids,))


@pytest.mark.parametrize("name", MODELS)
def test_forward_storage_passes_keyword_arguments_to_the_model(name):
    model, block = MODELS[name]()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    storage = fxstore.ForwardModuleStorage(model, [block])
    storage(ids, attention_mask=mask)
    _, hidden = _hidden(model, ids, mask)
    assert torch.allclose(_first(storage[block][0]), hidden, atol=1e-5)
    grouped = fxstore.ForwardModuleStorage(model, {"early": [block]})
    grouped(ids, "early", attention_mask=mask)
    assert torch.allclose(_first(grouped["early"][block]), hidden, atol=1e-5)


def test_backward_storage_on_a_plain_gpt2_call_equals_autograd():
    model, block = _gpt2()
    ids = torch.randint(0, 50, (2, 6))
    storage = fxstore.BackwardModuleStorage(model, [block])
    out = storage(ids)
    out.logits.logsumexp(-1).sum().backward()
    ref = model(ids, output_hidden_states=True, use_cache=False)
    (want,) = torch.autograd.grad(ref.logits.logsumexp(-1).sum(), ref.hidden_states[1])
    assert torch.allclose(storage[block][0], want, atol=1e-6)


def test_an_explicit_fx_frontend_on_an_untraceable_root_suggests_export_not_the_root_as_a_leaf():
    model, block = _gpt2()
    with pytest.raises(fxstore.TraceError, match=r"(?s)module '<model>'.*Hint: .*use frontend='auto' or 'export'") as e:
        fxstore.FeatureExtractor(model, [block], frontend="fx")
    assert "leaf_modules=[GPT2LMHeadModel]" not in str(e.value)


def test_export_from_keyword_inputs_is_dynamic_and_onnx_keeps_the_mask_with_named_axes(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, block = _gpt2()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    ex = fxstore.FeatureExtractor(model, [block], keep_output=False)
    report = ex.export(tmp_path / "k.pt2", ((), {"input_ids": ids, "attention_mask": mask}))
    assert report.metadata["dynamic"]["batch"][0] == 1 and "sequence" in report.metadata["dynamic"]
    program = torch.export.load(str(tmp_path / "k.pt2")).module()
    ids5, mask5 = torch.randint(0, 50, (5, 4)), torch.ones(5, 4, dtype=torch.long)
    _, hidden = _hidden(model, ids5, mask5)
    assert torch.allclose(_first(program(ids5, mask5)[block]), hidden, atol=1e-5)
    ex.export(tmp_path / "k.onnx", ((), {"input_ids": ids, "attention_mask": mask}), format="onnx")
    graph = onnx.load(str(tmp_path / "k.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "sequence", 32]


def test_cli_nodes_and_export_of_a_plain_gpt2_folder(tmp_path, capsys):
    from fxstore.cli import main

    model, block = _gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    assert main(["nodes", f"hf:{tmp_path / 'gpt2'}", "--filter", "transformer.h.0*"]) == 0
    assert "transformer.h.0" in capsys.readouterr().out
    assert main(["export", f"hf:{tmp_path / 'gpt2'}", "--layers", block, "--format", "exported",
                 "--out", str(tmp_path / "g.pt2")]) == 0
    assert "max abs difference 0" in capsys.readouterr().out
