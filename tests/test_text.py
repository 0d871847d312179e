"""Token rows from language models: the values equal output_hidden_states of each document run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from text_helpers import BLOCKS, corpus, save

import fxstore
from fxstore.cli.hf import load_hf
from fxstore.errors import ConfigError, LayerNotFoundError

HELPERS = Path(__file__).parent
KINDS = ("gpt2", "llama", "bert")


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    return {kind: save(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


@pytest.fixture(scope="session")
def loaded(folders):
    return {kind: load_hf(folder) for kind, folder in folders.items()}


def arrays(out):
    return {k: torch.from_numpy(np.asarray(v)) if not isinstance(v[:0], torch.Tensor) else v[:]
            for k, v in fxstore.load_features(out).items()}


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_hidden_states_of_each_document_alone(kind, loaded, tmp_path):
    model, tok = loaded[kind]
    docs = corpus(24)
    layers = [BLOCKS[kind].format(0), BLOCKS[kind].format(1)]
    manifest = fxstore.extract_dataset(model, layers, docs, tmp_path, tokenizer=tok, batch_size=5, shard_size=64,
                                       progress=False)
    rows = arrays(tmp_path)
    encoded = [tok(d)["input_ids"] for d in docs]
    assert manifest["num_samples"] == len(rows["token_id"]) == sum(map(len, encoded))  # no padding row
    assert len(manifest["shards"]) > 1
    for i, ids in enumerate(encoded):
        mine = rows["sequence"] == i
        assert rows["token_id"][mine].tolist() == ids
        assert rows["position"][mine].tolist() == list(range(len(ids)))
        states = hidden_states(model, ids)
        for k, layer in enumerate(layers):
            torch.testing.assert_close(rows[layer][mine], states[k + 1][0], atol=2e-6, rtol=1e-5)


def test_padding_sides_are_the_tokenizers_own(loaded):
    assert loaded["gpt2"][1].padding_side == "right" and loaded["gpt2"][1].pad_token == "<|endoftext|>"
    assert loaded["llama"][1].padding_side == "left"
    assert loaded["llama"][1]("a cat")["input_ids"][0] == loaded["llama"][1].bos_token_id


def test_attention_and_mlp_outputs_equal_module_hooks(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    docs = corpus(6)
    layers = ["transformer.h.1.attn", "transformer.h.1.mlp", "transformer.h.2.ln_1"]
    fxstore.extract_dataset(model, layers, docs, tmp_path, tokenizer=tok, batch_size=4, progress=False)
    rows = arrays(tmp_path)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name in layers]
    try:
        for i, doc in enumerate(docs):
            hidden_states(model, tok(doc)["input_ids"])
            for name in layers:
                torch.testing.assert_close(rows[name][rows["sequence"] == i], seen[name][0], atol=2e-6, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_skip_special_drops_bos_cls_sep_rows(kind, loaded, tmp_path):
    model, tok = loaded[kind]
    docs = corpus(8)
    layer = BLOCKS[kind].format(0)
    fxstore.extract_dataset(model, [layer], docs, tmp_path, tokenizer=tok, skip_special=True, progress=False)
    rows = arrays(tmp_path)
    specials = {tok.bos_token_id, tok.eos_token_id, tok.cls_token_id, tok.sep_token_id} - {None}
    plain = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert len(rows["token_id"]) == sum(map(len, plain))
    assert not set(rows["token_id"].tolist()) & specials
    first = 1  # llama's BOS / bert's [CLS] sit at position 0: the stored positions start at 1
    for i, ids in enumerate(plain):
        mine = rows["sequence"] == i
        assert rows["position"][mine].tolist() == list(range(first, first + len(ids)))
        torch.testing.assert_close(rows[layer][mine], hidden_states(model, tok(docs[i])["input_ids"])[1][0, first:
                                   first + len(ids)], atol=2e-6, rtol=1e-5)


def test_max_length_cuts_documents(loaded, tmp_path):
    model, tok = loaded["bert"]
    docs = corpus(8)
    fxstore.extract_dataset(model, ["encoder.layer.0"], docs, tmp_path, tokenizer=tok, max_length=6, progress=False)
    rows = arrays(tmp_path)
    expected = [tok(d, truncation=True, max_length=6)["input_ids"] for d in docs]
    assert rows["token_id"].tolist() == [t for ids in expected for t in ids]
    assert int(rows["position"].max()) == 5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_context_length_windows_concatenate_documents_with_the_separator(kind, loaded, tmp_path):
    model, tok = loaded[kind]
    docs, n = corpus(12), 16
    layer = BLOCKS[kind].format(1)
    manifest = fxstore.extract_dataset(model, [layer], docs, tmp_path, tokenizer=tok, context_length=n,
                                       batch_size=3, progress=False)
    rows = arrays(tmp_path)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    prefix = [tok.bos_token_id] if kind == "llama" else []
    body = n - len(prefix)
    windows = [prefix + stream[k * body:(k + 1) * body] for k in range(len(stream) // body)]
    assert manifest["num_samples"] == len(windows) * n and manifest["text"]["dropped_tokens"] == len(stream) % body
    assert rows["token_id"].tolist() == [t for w in windows for t in w]
    assert rows["sequence"].tolist() == [k for k in range(len(windows)) for _ in range(n)]
    for k, window in enumerate(windows):
        torch.testing.assert_close(rows[layer][k * n:(k + 1) * n], hidden_states(model, window)[2][0], atol=2e-6,
                                   rtol=1e-5)


def test_pretokenized_input_ids_are_used_as_given(loaded, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, tok = loaded["gpt2"]
    ids = [tok(d)["input_ids"] for d in corpus(6)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "other": list(range(6))})
    fxstore.extract_dataset(model, ["transformer.h.0"], data, tmp_path, tokenizer=tok, progress=False)
    rows = arrays(tmp_path)
    assert rows["token_id"].tolist() == [t for x in ids for t in x]
    torch.testing.assert_close(rows["transformer.h.0"][rows["sequence"] == 2], hidden_states(model, ids[2])[1][0],
                               atol=2e-6, rtol=1e-5)


def test_bfloat16_is_cast_inside_the_graph(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    docs = corpus(4)
    m = fxstore.extract_dataset(model, ["transformer.h.0"], docs, tmp_path, tokenizer=tok, dtype="bfloat16",
                                progress=False)
    assert m["features"]["transformer.h.0"]["dtype"] == "bfloat16"
    rows = fxstore.load_features(tmp_path)
    assert rows["transformer.h.0"].torch(slice(0, 1)).dtype == torch.bfloat16
    ids = tok(docs[0])["input_ids"]
    torch.testing.assert_close(rows["transformer.h.0"].torch(slice(len(ids))), hidden_states(model, ids)[1][0].bfloat16(),
                               atol=1e-2, rtol=1e-2)


def test_manifest_records_tokenizer_and_model_fingerprints(loaded, tmp_path):
    model, tok = loaded["llama"]
    m = fxstore.extract_dataset(model, ["model.layers.0"], corpus(4), tmp_path, tokenizer=tok, progress=False)
    assert m["model"]["fingerprint"] == fxstore.dataset.manifest.model_fingerprint(model)
    assert m["text"]["tokenizer"]["fingerprint"].startswith("sha256:")
    assert m["text"]["tokenizer"]["padding_side"] == "left"
    assert {k: v.get("kind") for k, v in m["features"].items()} == {
        "model.layers.0": None, "token_id": "token", "sequence": "token", "position": "token"}


# -- bad inputs ----------------------------------------------------------------------------


def test_unknown_layer_names_close_matches(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    with pytest.raises(LayerNotFoundError, match="transformer.h.9"):
        fxstore.extract_dataset(model, ["transformer.h.9"], corpus(3), tmp_path, tokenizer=tok, progress=False)


def test_empty_document_is_refused_with_its_index(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    with pytest.raises(ConfigError, match="document 1 is empty"):
        fxstore.extract_dataset(model, ["transformer.h.0"], ["a cat", "", "a dog"], tmp_path, tokenizer=tok,
                                progress=False)
    with pytest.raises(ConfigError, match="holds no document"):
        fxstore.extract_dataset(model, ["transformer.h.0"], [], tmp_path, tokenizer=tok, progress=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["context_length", "max_length"])
def test_a_length_beyond_the_models_positions_is_refused_before_any_work(kind, option, loaded, tmp_path):
    model, tok = loaded[kind]
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or config.n_positions
    with pytest.raises(ConfigError, match=rf"{option}={positions + 1} is more than the {positions} positions of "
                                          rf"{type(model).__name__} \(config\.\w+\)\.\nHint: use {option}={positions} or less"):
        fxstore.extract_dataset(model, ["transformer.h.0" if kind == "gpt2" else BLOCKS[kind].format(0)], corpus(3),
                                tmp_path / "out", tokenizer=tok, progress=False, **{option: positions + 1})
    assert not (tmp_path / "out").exists()


def test_text_without_a_tokenizer_asks_for_one_and_token_ids_need_none(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    for data in (["a cat", "a dog"], [{"text": "a cat"}, {"text": "a dog"}], [("a cat", 0), ("a dog", 1)]):
        with pytest.raises(ConfigError, match=r"the data holds text \('a cat'\.\.\.\), and no tokenizer was given"
                                              r"\.\nHint: pass tokenizer="):
            fxstore.extract_dataset(model, ["transformer.h.0"], data, tmp_path / "out", progress=False)
    ids = torch.tensor([tok("a cat sat on the mat")["input_ids"]] * 3)
    fxstore.extract_dataset(model, ["transformer.h.0"], torch.utils.data.TensorDataset(ids), tmp_path / "ids",
                            progress=False, batch_size=2)
    stored = torch.from_numpy(np.asarray(fxstore.load_features(tmp_path / "ids")["transformer.h.0"][:]))
    torch.testing.assert_close(stored, hidden_states(model, ids[0].tolist())[1].expand(3, -1, -1), rtol=0,
                               atol=1e-5)


def test_unknown_text_field_lists_the_fields(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    with pytest.raises(ConfigError, match=r"no text field 'body'; its fields are \['text'\]"):
        fxstore.extract_dataset(model, ["transformer.h.0"], [{"text": "a cat"}], tmp_path, tokenizer=tok,
                                text_field="body", progress=False)


def test_layer_without_a_token_axis_is_refused(loaded, tmp_path):
    model, tok = loaded["bert"]
    with pytest.raises(ConfigError, match="not one value per token"):
        fxstore.extract_dataset(model, ["pooler"], corpus(3), tmp_path, tokenizer=tok, progress=False)
