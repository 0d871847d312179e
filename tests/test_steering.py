"""``fxstore.steering_vectors`` against the same numbers computed by hand from each sequence alone:
the model's own ``output_hidden_states`` and ``torch.linalg.svd``, on GPT-2 and a Llama (GQA, RoPE) from configs."""

from __future__ import annotations

import pytest
import torch
import transformers
from text_helpers import WORDS, _tokenizer
from torch import nn

import fxstore
from fxstore import ConfigError

VOCAB = 40


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"gpt2": (_gpt2, "transformer.h.{}"), "llama": (_llama, "model.layers.{}")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def lm(request) -> tuple[nn.Module, str, str]:
    build, block = MODELS[request.param]
    return build(), block, request.param


def _pairs(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` pairs of token-id sequences of lengths 2 to 9 (the two sides of a pair differ in length too)."""
    g = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        return torch.randint(0, VOCAB, (int(torch.randint(2, 10, (), generator=g)),), generator=g)

    pairs = [(one(), one()) for _ in range(n)]
    return [p for p, _ in pairs], [q for _, q in pairs]


def _alone(model: nn.Module, ids: torch.Tensor, block: int, position: int | str) -> torch.Tensor:
    """One sequence, unpadded, through the plain model: block ``block``'s output from ``output_hidden_states``."""
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states[block + 1][0]
    return hidden.mean(0) if position == "mean" else hidden[position]


def _by_hand(model: nn.Module, pos: list[torch.Tensor], neg: list[torch.Tensor], block: int, position: int | str,
             method: str) -> torch.Tensor:
    diffs = torch.stack([_alone(model, p, block, position) - _alone(model, q, block, position)
                         for p, q in zip(pos, neg)])
    mean = diffs.mean(0)
    if method == "mean_diff":
        return mean
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    return vh[0] if torch.dot(vh[0], mean) >= 0 else -vh[0]


@pytest.mark.parametrize("position", [-1, "mean", 0, -2])
def test_mean_diff_equals_the_hidden_states_of_each_sequence_alone(lm, position):
    model, block, _ = lm
    pos, neg = _pairs(7, seed=1)
    layers = [block.format(0), block.format(1)]
    vecs = fxstore.steering_vectors(model, pos, neg, layers, position=position, batch_size=4)
    assert list(vecs) == layers
    for i, layer in enumerate(layers):
        # hidden_states[-1] of both families is after the final norm: block 1 is the last block, compare before it
        if i == len(layers) - 1:
            continue
        torch.testing.assert_close(vecs[layer], _by_hand(model, pos, neg, i, position, "mean_diff"),
                                   rtol=1e-5, atol=1e-5)


def test_last_block_equals_a_forward_hook(lm):
    model, block, _ = lm
    pos, neg = _pairs(5, seed=2)
    layer = block.format(1)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o)[0, -1].clone()))
    with torch.no_grad():
        for ids in pos + neg:
            model(ids[None])
    handle.remove()
    expected = (torch.stack(seen[:5]) - torch.stack(seen[5:])).mean(0)
    vecs = fxstore.steering_vectors(model, pos, neg, [layer])
    torch.testing.assert_close(vecs[layer], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", [-1, "mean"])
def test_pca_is_the_first_principal_component_of_the_centred_differences(lm, position):
    model, block, _ = lm
    pos, neg = _pairs(9, seed=3)
    layer = block.format(0)
    vec = fxstore.steering_vectors(model, pos, neg, [layer], method="pca", position=position, batch_size=3)[layer]
    expected = _by_hand(model, pos, neg, 0, position, "pca")
    torch.testing.assert_close(vec, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vec.norm(), torch.tensor(1.0))
    mean = fxstore.steering_vectors(model, pos, neg, [layer], position=position)[layer]
    assert float(vec @ mean) > 0  # the sign follows the mean difference


def test_batch_size_and_padding_do_not_change_the_vectors(lm):
    model, block, _ = lm
    pos, neg = _pairs(6, seed=4)
    layer = block.format(0)
    one = fxstore.steering_vectors(model, pos, neg, [layer], batch_size=1)[layer]
    many = fxstore.steering_vectors(model, pos, neg, [layer], batch_size=12)[layer]
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(1, 8, (), generator=g)),),
                                                          generator=g)) for _ in range(n)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_strings_with_a_tokenizer_padded_on_either_side(family, side):
    tok = _tokenizer(family)  # the Llama tokenizer adds <s>: read it as it tokenizes
    tok.padding_side = side
    model = MODELS[family][0]()
    layer = MODELS[family][1].format(0)
    positive, negative = _texts(5, seed=5), _texts(5, seed=6)
    ids = lambda texts: [torch.tensor(tok(t)["input_ids"]) for t in texts]  # noqa: E731
    for position in (-1, "mean"):
        vec = fxstore.steering_vectors(model, positive, negative, [layer], tokenizer=tok, position=position)[layer]
        expected = _by_hand(model, ids(positive), ids(negative), 0, position, "mean_diff")
        torch.testing.assert_close(vec, expected, rtol=1e-5, atol=1e-5)


def test_the_vector_steers_like_a_forward_hook_adding_it():
    model = _gpt2()
    pos, neg = _pairs(4, seed=7)
    vec = fxstore.steering_vectors(model, pos, neg, ["transformer.h.0"])["transformer.h.0"]
    ex = fxstore.FeatureExtractor(model, edits={"transformer.h.0": fxstore.Add(vec, scale=4.0)})
    handle = model.transformer.h[0].register_forward_hook(lambda m, i, o: o + 4.0 * vec)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
        handle.remove()
        torch.testing.assert_close(ex(ids)[0].logits, expected, rtol=1e-5, atol=1e-5)


def test_aliases_name_the_vectors_and_the_model_is_left_alone():
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pos, neg = _pairs(3, seed=8)
    vecs = fxstore.steering_vectors(model, pos, neg, {model.transformer.h[0]: "first"})
    assert list(vecs) == ["first"]
    torch.testing.assert_close(vecs["first"], _by_hand(model, pos, neg, 0, -1, "mean_diff"), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


@pytest.mark.parametrize("call, match", [
    (dict(negative="short"), "2 positive and 1 negative"),
    (dict(positive=[], negative=[]), "0 positive and 0 negative"),
    (dict(positive=["a b"], negative=["b a"]), "no tokenizer"),
    (dict(method="svd"), "method='svd' is not a method"),
    (dict(position="last"), "position='last' is not a position"),
    (dict(position=1.5), "position=1.5"),
    (dict(position=True), "position=True"),
    (dict(position=5), "position=5 is beyond"),
    (dict(method="pca", positive=[torch.tensor([1, 2])], negative=[torch.tensor([3])]), "at least two pairs"),
    (dict(positive=[torch.tensor([[1, 2]]), torch.tensor([1])]), r"positive\[0\] is not a 1-D token-id tensor"),
    (dict(positive=[torch.tensor([1.0, 2.0]), torch.tensor([1])]), r"positive\[0\] is not a 1-D"),
    (dict(positive=[torch.tensor([], dtype=torch.long), torch.tensor([1])]), r"positive\[0\] has no tokens"),
    (dict(positive=["a", torch.tensor([1])]), "mixes strings"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(layers=[]), "no layers"),
    (dict(layers=["transformer.h.*"]), r"is \d+ nodes.*one node per layer"),
])
def test_bad_inputs_raise_config_errors_with_a_hint(call, match):
    model = _gpt2()
    args = dict(positive=[torch.tensor([1, 2, 3]), torch.tensor([4, 5])],
                negative=[torch.tensor([1, 2]), torch.tensor([6, 7, 8])], layers=["transformer.h.0"])
    if call.get("negative") == "short":
        call = dict(negative=[torch.tensor([1])], positive=[torch.tensor([1]), torch.tensor([2])])
    args.update(call)
    with pytest.raises(ConfigError, match=match) as info:
        fxstore.steering_vectors(model, args.pop("positive"), args.pop("negative"), args.pop("layers"), **args)
    assert "Hint:" in str(info.value)


def test_a_value_without_a_token_dimension_is_refused():
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Flatten(), nn.Linear(24, 4)).eval()
    with pytest.raises(ConfigError, match=r"shape \(4, 4\).*\[batch, tokens, \.\.\.\]"):
        fxstore.steering_vectors(model, [torch.tensor([1, 2, 3])] * 2, [torch.tensor([3, 2, 1])] * 2, ["2"])
