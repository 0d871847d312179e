"""Generation: ex.generate against Hugging Face's model.generate with forward hooks doing the same edit.

Tiny random models (2 layers, hidden 32) of three families: GPT-2, Llama (GQA, RoPE) and Qwen2.
The reference is always the plain model's own ``generate``, steered and recorded by hooks.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import fxstore

D = 32


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=64, n_positions=128)
    return transformers.GPT2LMHeadModel(config).eval(), "transformer.h"


def _llama():
    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval(), "model.layers"


def _qwen2():
    config = transformers.Qwen2Config(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    return transformers.Qwen2ForCausalLM(config).eval(), "model.layers"


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def _hooked_generate(model, blocks, input_ids, attention_mask=None, add=None, positions=None, **kwargs):
    """model.generate with a forward hook adding ``add`` on block 0 (at absolute ``positions`` if given)
    and one recording block 1; returns (sequences, block 1 at every position)."""
    layers = model.get_submodule(blocks)
    seen, record = [0], []

    def steer(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        columns = torch.arange(seen[0], seen[0] + value.shape[1])
        seen[0] += value.shape[1]
        where = torch.ones(value.shape[1], dtype=torch.bool) if positions is None else torch.isin(
            columns, torch.tensor(positions))
        new = torch.where(where[None, :, None], value + add, value)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [layers[1].register_forward_hook(lambda m, a, o: record.append(o[0] if isinstance(o, tuple) else o))]
    if add is not None:
        handles.append(layers[0].register_forward_hook(steer))
    try:
        sequences = model.generate(input_ids, attention_mask=attention_mask, **{**GREEDY, **kwargs})
    finally:
        for h in handles:
            h.remove()
    return sequences, torch.cat(record, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_steered_greedy_tokens_and_features_equal_hooked_generate(family):
    model, blocks = FAMILIES[family]()
    vector = torch.randn(D)
    ex = fxstore.FeatureExtractor(model, [f"{blocks}.1"], edits={f"{blocks}.0": fxstore.Add(vector, scale=4.0)})
    ids = torch.randint(1, 64, (2, 7))
    out = ex.generate(ids, **GREEDY)
    sequences, record = _hooked_generate(model, blocks, ids, add=4.0 * vector)
    assert torch.equal(out.sequences, sequences)
    feats = out.features[f"{blocks}.1"]
    assert feats.shape == (2, 7 + 6 - 1, D) == record.shape
    torch.testing.assert_close(feats, record, rtol=0, atol=1e-6)
    plain, _ = _hooked_generate(model, blocks, ids)
    assert not torch.equal(out.sequences, plain)  # the steering changed the answer


def test_seeded_sampling_equals_model_generate_with_the_same_seed():
    model, blocks = _llama()
    vector = torch.randn(D)
    ex = fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(vector)})
    ids = torch.randint(1, 64, (3, 5))
    sampling = {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "max_new_tokens": 8}
    torch.manual_seed(11)
    out = ex.generate(ids, **sampling)
    torch.manual_seed(11)
    sequences, _ = _hooked_generate(model, blocks, ids, add=vector, **sampling)
    assert torch.equal(out.sequences, sequences) and out.sequences.shape == (3, 13)


def test_left_padded_rows_generate_what_they_generate_alone():
    model, blocks = _gpt2()
    ex = fxstore.FeatureExtractor(model, [f"{blocks}.1"], edits={f"{blocks}.0": fxstore.Add(torch.randn(D), scale=2.0)})
    long, short = torch.randint(1, 64, (1, 7)), torch.randint(1, 64, (1, 4))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    out = ex.generate(ids, attention_mask=mask, **GREEDY)
    for row, alone in ((0, long), (1, short)):
        single = ex.generate(alone, **GREEDY)
        pad = 7 - alone.shape[1]
        assert torch.equal(out.sequences[row, pad:], single.sequences[0])
        torch.testing.assert_close(out.features[f"{blocks}.1"][row, pad:], single.features[f"{blocks}.1"][0],
                                   rtol=1e-5, atol=1e-5)


def test_per_row_vectors_steer_each_row_as_alone():
    model, blocks = _llama()
    vectors = torch.randn(2, 1, D) * 3
    ids = torch.randint(1, 64, (2, 6))
    ex = fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(vectors)})
    out = ex.generate(ids, **GREEDY)
    for row in range(2):
        sequences, _ = _hooked_generate(model, blocks, ids[row:row + 1], add=vectors[row])
        assert torch.equal(out.sequences[row:row + 1], sequences)


def test_absolute_positions_in_prefill_and_decode_and_changed_between_calls():
    model, blocks = _gpt2()
    vector = torch.randn(D) * 4
    ex = fxstore.FeatureExtractor(model, [f"{blocks}.1"],
                                  edits={f"{blocks}.0": fxstore.Add(vector, index=(slice(None), [4, 10]))})
    ids = torch.randint(1, 64, (2, 7))  # position 10 is the fourth generated token
    out = ex.generate(ids, **GREEDY)
    sequences, record = _hooked_generate(model, blocks, ids, add=vector, positions=[4, 10])
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(out.features[f"{blocks}.1"], record, rtol=0, atol=1e-6)
    for choice, positions in (("generated", list(range(7, 20))), ("prompt", list(range(7))), (slice(2, 9), [*range(2, 9)])):
        out = ex.generate(ids, edit_positions=choice, **GREEDY)
        sequences, record = _hooked_generate(model, blocks, ids, add=vector, positions=positions)
        assert torch.equal(out.sequences, sequences), choice
        torch.testing.assert_close(out.features[f"{blocks}.1"], record, rtol=0, atol=1e-6)


def test_disabled_edit_gives_the_plain_model_generate():
    model, blocks = _qwen2()
    ex = fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(torch.randn(D) * 5)})
    ex.edits[f"{blocks}.0"].update(enabled=False)
    ids = torch.randint(1, 64, (2, 5))
    assert torch.equal(ex.generate(ids, **GREEDY).sequences, model.generate(ids, **GREEDY))


def test_compiled_generation_matches_hooks_and_never_recompiles_for_new_values():
    from torch._dynamo.testing import CompileCounterWithBackend

    model, blocks = _llama()
    vector = torch.randn(D)
    ex = fxstore.FeatureExtractor(model, [f"{blocks}.1"], edits={f"{blocks}.0": fxstore.Add(vector, scale=3.0)})
    counter = CompileCounterWithBackend("aot_eager")
    ex.compile(backend=counter)
    ids = torch.randint(1, 64, (2, 6))
    out = ex.generate(ids, **GREEDY)
    assert out.compiled
    sequences, record = _hooked_generate(model, blocks, ids, add=3.0 * vector)
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(out.features[f"{blocks}.1"], record, rtol=1e-5, atol=1e-5)
    graphs = counter.frame_count
    assert sum(1 for g in counter.graphs if len(g.graph.nodes)) == 2  # one prompt program, one decode program
    edit = ex.edits[f"{blocks}.0"]
    new = torch.randn(D) * 4
    for change, positions in (({"scale": 1.0}, None), ({"vector": new}, None), ({"enabled": False}, None),
                              ({"enabled": True}, "generated"), ({}, [2, 8])):
        edit.update(**change)
        out = ex.generate(ids[:, :4], edit_positions=positions, **GREEDY)  # another prompt length, too
        add = None if not bool(edit.enabled) else edit.scale * edit.vector
        where = list(range(4, 20)) if positions == "generated" else positions
        sequences, record = _hooked_generate(model, blocks, ids[:, :4], add=add, positions=where)
        assert torch.equal(out.sequences, sequences), change
        torch.testing.assert_close(out.features[f"{blocks}.1"], record, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == graphs  # 0 new graphs
    for new_tokens in (64, 6):  # a longer cache (128 columns), then the 64-column one again: a new cache each
        out = ex.generate(ids, **{**GREEDY, "max_new_tokens": new_tokens})
        sequences, _ = _hooked_generate(model, blocks, ids, add=edit.scale * edit.vector, max_new_tokens=new_tokens)
        assert torch.equal(out.sequences, sequences)


def test_errors_name_the_input_and_hint():
    model, blocks = _gpt2()
    ids = torch.randint(1, 64, (2, 5))
    with pytest.raises(fxstore.EditError, match=r"batch of 2 rows.*\n.*Hint"):
        fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(torch.randn(3, 1, D))}).generate(ids, **GREEDY)
    ex = fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(torch.randn(D), index=(slice(None), 10))})
    with pytest.raises(fxstore.EditError, match=r"position\(s\) \[10\].*\n.*Hint"):
        ex.generate(ids, **GREEDY)  # 5 + 6 - 1 = 10 positions run: 0..9
    with pytest.raises(fxstore.EditError, match="'sideways' is not a position choice"):
        fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(torch.randn(D))}).generate(
            ids, edit_positions="sideways", **GREEDY)
    with pytest.raises(fxstore.EditError, match="tensor index"):
        fxstore.FeatureExtractor(model, edits={f"{blocks}.0": fxstore.Add(torch.randn(D), index=torch.tensor([1, 2]))}
                                 ).generate(ids, **GREEDY)
    with pytest.raises(fxstore.ConfigError, match="grads= taps are refused"):
        fxstore.FeatureExtractor(model, [f"{blocks}.1"], grads=[f"{blocks}.0"]).generate(ids, **GREEDY)
    with pytest.raises(fxstore.ConfigError, match="right padding.*\n.*padding_side"):
        fxstore.FeatureExtractor(model, [f"{blocks}.1"]).generate(ids, attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))
    with pytest.raises(fxstore.ConfigError, match="num_beams=2"):
        fxstore.FeatureExtractor(model, [f"{blocks}.1"]).generate(ids, num_beams=2, **GREEDY)
    with pytest.raises(fxstore.LayerNotFoundError, match="names no module.*\n.*Hint"):
        fxstore.FeatureExtractor(model, [f"{blocks}.1.mlp.add"], frontend="export").generate(ids, **GREEDY)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(fxstore.ConfigError, match="not a Hugging Face causal language model.*\n.*Hint"):
        fxstore.FeatureExtractor(plain, ["0"]).generate(ids)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_compiled_padded_seeded_sampling_equals_hooked_generate(family):
    model, blocks = FAMILIES[family]()
    vector = torch.randn(D) * 2
    ex = fxstore.FeatureExtractor(model, [f"{blocks}.1"], edits={f"{blocks}.0": fxstore.Add(vector)})
    ex.compile(backend="aot_eager")
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    sampling = {"do_sample": True, "top_k": 16, "max_new_tokens": 6, "pad_token_id": 0}
    torch.manual_seed(5)
    out = ex.generate(ids, attention_mask=mask, **sampling)
    torch.manual_seed(5)
    sequences, record = _hooked_generate(model, blocks, ids, attention_mask=mask, add=vector, **sampling)
    assert out.compiled and torch.equal(out.sequences, sequences)
    real = mask.bool()[:, :, None].expand(-1, -1, D)  # padding columns: what the model computed there, cache-dependent
    feats = out.features[f"{blocks}.1"]
    torch.testing.assert_close(feats[:, :6][real], record[:, :6][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, 6:], record[:, 6:], rtol=1e-5, atol=1e-5)
