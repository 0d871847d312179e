"""Edits (``fxstore.Add``, ``Replace``, ``Ablate``, ``Scale``, ``Apply``) against the same edit done by a
forward hook on the plain model, written here by hand (clone + index assignment, boolean indexing,
a Python loop over rows), across torchvision and Hugging Face models, eager and compiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
import transformers
from torch import nn

import fxstore

VOCAB = 50


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2Model(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=32)
    return transformers.LlamaModel(config)


# name -> (build, edited layer, a layer after it, input, call kwargs)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, str, Callable[[], Any], dict]] = {
    "resnet18": (torchvision.models.resnet18, "layer2", "layer3", lambda: torch.rand(2, 3, 32, 32, generator=_gen(1)), {}),
    "vgg11": (torchvision.models.vgg11, "features.3", "features.6",  # features.4 is ReLU(inplace=True)
              lambda: torch.rand(2, 3, 32, 32, generator=_gen(2)), {}),
    "vit": (_vit, "encoder.layers.encoder_layer_0", "encoder.ln", lambda: torch.rand(2, 3, 32, 32, generator=_gen(3)), {}),
    "gpt2": (_gpt2, "h.0", "ln_f", lambda: torch.randint(0, VOCAB, (2, 7), generator=_gen(4)), {"use_cache": False}),
    "bert": (_bert, "encoder.layer.0", "encoder.layer.1", lambda: torch.randint(0, VOCAB, (2, 7), generator=_gen(5)), {}),
    "llama": (_llama, "layers.0", "norm", lambda: torch.randint(0, VOCAB, (2, 7), generator=_gen(6)),
              {"use_cache": False}),
}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _main(output: Any) -> torch.Tensor:
    """The model's main output tensor (``last_hidden_state`` of a Hugging Face model)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


def _shape(model: nn.Module, layer: str, x: Any, kwargs: dict) -> tuple[int, ...]:
    shapes = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: shapes.append(_first(o).shape))
    with torch.no_grad():
        model(x, **kwargs)
    handle.remove()
    return tuple(shapes[0])


def _cases(shape: tuple[int, ...]) -> dict[str, tuple[fxstore.Edit, Callable[[torch.Tensor], torch.Tensor]]]:
    """kind -> (the fxstore edit, the same edit written by hand for a forward hook)."""
    g = _gen(7)
    last = torch.randn(shape[-1], generator=g)
    channel = torch.randn((shape[1],) + (1,) * (len(shape) - 2), generator=g) if len(shape) == 4 else last
    mean = torch.randn(shape[1:], generator=g)
    mask = torch.rand(shape[:2], generator=g) > 0.5
    positions = torch.tensor([1, 0])
    gate = torch.randn(shape[-1], generator=g)

    def at(fn: Callable[[torch.Tensor], torch.Tensor], index: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(o: torch.Tensor) -> torch.Tensor:
            o2 = o.clone()
            o2[index] = fn(o[index])
            return o2
        return edit

    def masked(o: torch.Tensor) -> torch.Tensor:
        o2 = o.clone()
        o2[mask] = mean.expand(o.shape)[mask]
        return o2

    def per_row(o: torch.Tensor) -> torch.Tensor:
        o2 = o.clone()
        for row, p in enumerate(positions.tolist()):
            o2[row, p] = last
        return o2

    return {
        "add": (fxstore.Add(channel), lambda o: o + channel),
        "add_scaled_at": (fxstore.Add(last, scale=2.0, index=(slice(None), 1)), at(lambda o: o + 2.0 * last, (slice(None), 1))),
        "replace_at": (fxstore.Replace(last, index=(slice(None), 0)), at(lambda o: last.expand(o.shape), (slice(None), 0))),
        "ablate": (fxstore.Ablate(), torch.zeros_like),
        "mean_ablate_mask": (fxstore.Ablate(mean, index=mask), masked),
        "scale": (fxstore.Scale(0.5), lambda o: o * 0.5),
        "apply": (fxstore.Apply(lambda v, t: v * torch.sigmoid(t), gate), lambda o: o * torch.sigmoid(gate)),
        "replace_per_row": (fxstore.Replace(last, index=positions), per_row),
    }


def _hooked(model: nn.Module, layer: str, after: str, fn: Callable, x: Any, kwargs: dict
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, the edited layer's value, the later layer's value) with the edit done by a forward hook."""
    seen: dict[str, torch.Tensor] = {}

    def edit(module: nn.Module, inputs: Any, output: Any) -> Any:
        new = fn(_first(output))
        seen["edited"] = new.clone()
        return _with_first(output, new)

    handles = [model.get_submodule(layer).register_forward_hook(edit),
               model.get_submodule(after).register_forward_hook(
                   lambda m, i, o: seen.__setitem__("after", _first(o).clone()))]
    try:
        with torch.no_grad():
            out = _main(model(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, seen["edited"], seen["after"]


KINDS = list(_cases((2, 4, 3)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_edit_equals_a_forward_hook_on_the_plain_model(name, kind):
    build, layer, after, make_input, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = make_input()
    edit, by_hand = _cases(_shape(model, layer, x, kwargs))[kind]
    expected, edited, later = _hooked(model, layer, after, by_hand, x, kwargs)
    ex = fxstore.FeatureExtractor(model, [layer, after], edits={layer: edit}, example_inputs=((x,), kwargs))
    with torch.no_grad():
        out, feats = ex(x, **kwargs)
    assert torch.equal(_main(out), expected)
    assert torch.equal(_first(feats.get(layer, feats.get(layer + ":0"))), edited)  # stored after the edit
    assert torch.equal(_first(feats.get(after, feats.get(after + ":0"))), later)
    assert ex.trace_report.verified == "exact"


def test_model_object_is_never_modified():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        ex = fxstore.FeatureExtractor(model, edits={"layer1": fxstore.Ablate()})
        edited, _ = ex(x)
        assert not torch.equal(edited, before)
        assert torch.equal(model(x), before)
    assert not any(name.startswith("_fx_edit") for name, _ in model.named_modules())
    assert set(ex.state_dict()) == set(model.state_dict())


def test_in_place_relu_after_an_edit_corrupts_neither_the_edit_nor_the_stored_value():
    model = torchvision.models.vgg11().eval()  # features.4 = ReLU(inplace=True) writes into features.3's output
    x = torch.rand(1, 3, 32, 32)
    replacement = -torch.ones(128, 1, 1)  # every value negative: the in-place ReLU would zero it
    ex = fxstore.FeatureExtractor(model, ["features.3"], edits={"features.3": fxstore.Replace(replacement)})
    with torch.no_grad():
        _, feats = ex(x)
        _, again = ex(x)
    assert torch.equal(feats["features.3"], replacement.expand(1, 128, 16, 16))
    assert torch.equal(again["features.3"], feats["features.3"])
    assert torch.equal(ex.edits["features.3"].value, replacement)


def test_update_changes_the_values_in_place_and_the_output_follows():
    model = _gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=_gen(8))
    add = fxstore.Add(torch.zeros(32))
    ex = fxstore.FeatureExtractor(model, edits={"h.0": add}, example_inputs=((ids,), {"use_cache": False}))
    buffer = add.vector
    vector = torch.randn(32, generator=_gen(9))
    assert ex.edits["h.0"].update(vector=vector, scale=3.0) is add
    assert add.vector is buffer and torch.equal(buffer, vector)
    expected, _, _ = _hooked(model, "h.0", "ln_f", lambda o: o + 3.0 * vector, ids, {"use_cache": False})
    with torch.no_grad():
        assert torch.equal(ex(ids, use_cache=False)[0].last_hidden_state, expected)
    assert ex.exports == 1


def test_a_glob_spec_edits_every_match_and_ex_edits_is_keyed_by_the_spec():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    ex = fxstore.FeatureExtractor(model, edits={"layer1.*.relu_1": fxstore.Scale(0.0)})
    assert list(ex.edits) == ["layer1.*.relu_1"]
    assert ex.code.count("self._fx_edit_0(") == 2
    with torch.no_grad():
        _, feats = fxstore.FeatureExtractor(model, ["layer1.1.relu_1"], edits=ex.edits)(x)
    assert torch.equal(feats["layer1.1.relu_1"], torch.zeros(1, 64, 8, 8))


def test_edits_combine_with_stored_layers_and_gradient_taps():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 32, 32)
    vector = torch.randn(128, 1, 1)
    ex = fxstore.FeatureExtractor(model, ["layer3"], grads=["layer2", "layer3"], edits={"layer2": fxstore.Add(vector)})
    out, feats = ex(x)
    out[:, 3].sum().backward()
    grads = ex.gradients(feats)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(m: nn.Module, i: Any, o: torch.Tensor) -> torch.Tensor:
            o = o + vector if name == "layer2" else o
            seen[name] = o
            return o
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in ("layer2", "layer3")]
    reference = model(x)
    expected = torch.autograd.grad(reference[:, 3].sum(), [seen["layer2"], seen["layer3"]])
    for h in handles:
        h.remove()
    assert torch.equal(out, reference)
    torch.testing.assert_close(grads["layer2"], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["layer3"], expected[1], rtol=1e-5, atol=1e-6)


# -- gradients w.r.t. the edit's own tensors -------------------------------------------------


def _hook_grad(model: nn.Module, layer: str, vector: torch.Tensor, ids: torch.Tensor, metric: Callable) -> torch.Tensor:
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: _with_first(o, _first(o) + vector))
    try:
        return torch.autograd.grad(metric(model(ids, use_cache=False).last_hidden_state), vector)[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_gradient_of_a_metric_wrt_the_steering_vector_equals_autograd_through_a_hook(compiled):
    torch._dynamo.reset()
    model = _gpt2().eval()
    ids = torch.randint(0, VOCAB, (3, 6), generator=_gen(10))
    vector = torch.zeros(32, requires_grad=True)
    ex = fxstore.FeatureExtractor(model, edits={"h.0": fxstore.Add(vector)}, example_inputs=((ids,), {"use_cache": False}))
    run = torch.compile(ex, fullgraph=True, backend="aot_eager") if compiled else ex

    def metric(hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, -1, 0].sum() - hidden[:, -1, 1].sum()

    for _ in range(2):  # training the vector: the same buffer, new values
        got = torch.autograd.grad(metric(run(ids, use_cache=False)[0].last_hidden_state), ex.edits["h.0"].vector)[0]
        expected = _hook_grad(model, "h.0", vector, ids, metric)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            vector -= 0.5 * got
    assert got.abs().sum() > 0


# -- compile: one graph, no recompiles ------------------------------------------------------


class _Graphs:
    """A torch.compile backend that counts the graphs dynamo hands it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        self.count += 1
        return gm.forward


@pytest.mark.compile
def test_twelve_vectors_and_twelve_batch_sizes_compile_once_after_the_first_dynamic_graph():
    torch._dynamo.reset()
    model = _gpt2().eval()
    add = fxstore.Add(torch.zeros(32), scale=1.0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=_gen(11))
    ex = fxstore.FeatureExtractor(model, ["ln_f"], edits={"h.1": add}, example_inputs=((ids,), {"use_cache": False}))
    graphs = _Graphs()
    compiled = torch.compile(ex, fullgraph=True, backend=graphs)
    counts = []
    with torch.no_grad():
        for i, batch in enumerate(range(1, 13)):
            vector = torch.randn(32, generator=_gen(100 + i))
            add.update(vector=vector, scale=float(i % 3))  # scale 0: the edit is off, same program
            x = torch.randint(0, VOCAB, (batch, 6), generator=_gen(200 + i))
            out, _ = compiled(x, use_cache=False)
            expected, _, _ = _hooked(model, "h.1", "ln_f", lambda o, s=float(i % 3), v=vector: o + s * v, x,
                                     {"use_cache": False})
            torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
            counts.append(graphs.count)
    assert counts[-1] == counts[1] <= 2, counts  # the first static graph, then one dynamic graph serves all


@pytest.mark.compile
def test_inductor_compiled_edit_matches_the_hook_reference_and_ex_compile_too():
    torch._dynamo.reset()
    model = torchvision.models.resnet18().eval()
    vector = torch.randn(128, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    expected, _, _ = _hooked(model, "layer2", "layer3", lambda o: o + vector, x, {})
    ex = fxstore.FeatureExtractor(model, ["layer3"], edits={"layer2": fxstore.Add(torch.zeros(128, 1, 1))})
    with torch.no_grad():
        ex.edits["layer2"].update(vector=vector)
        out, _ = torch.compile(ex, fullgraph=True)(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        out2, _ = ex.compile(backend="eager")(x)
        torch.testing.assert_close(out2, expected, rtol=1e-5, atol=1e-5)


# -- the enabled switch -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_switched_off_is_bit_equal_to_the_plain_model_and_on_again_to_the_hook(kind):
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 32, 32, generator=_gen(13))
    edit, by_hand = _cases(_shape(model, "layer2", x, {}))[kind]
    ex = fxstore.FeatureExtractor(model, ["layer2", "layer3"], edits={"layer2": edit})
    plain, plain_layer2, plain_layer3 = _hooked(model, "layer2", "layer3", lambda o: o, x, {})
    edit.update(enabled=False)
    with torch.no_grad():
        out, feats = ex(x)
        assert torch.equal(out, plain)
        assert torch.equal(feats["layer2"], plain_layer2) and torch.equal(feats["layer3"], plain_layer3)
        assert "enabled=False" in repr(edit)
        edit.update(enabled=True)
        expected, _, _ = _hooked(model, "layer2", "layer3", by_hand, x, {})
        assert torch.equal(ex(x)[0], expected)


@pytest.mark.compile
def test_switching_edits_off_and_on_does_not_recompile():
    torch._dynamo.reset()
    model = _gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=_gen(14))
    edits = {"h.0": fxstore.Replace(torch.randn(32, generator=_gen(15)), index=torch.tensor([1, 0])),
             "h.1.mlp": fxstore.Ablate(),
             "ln_f": fxstore.Apply(lambda v, t: v * torch.sigmoid(t), torch.randn(32, generator=_gen(16)))}
    ex = fxstore.FeatureExtractor(model, ["h.1"], edits=edits, example_inputs=((ids,), {"use_cache": False}))
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ex, fullgraph=True, backend=counter)
    with torch.no_grad():
        plain = _main(model(ids, use_cache=False))
        for switches in [(True, True, True), (False, False, False), (True, False, True), (False, False, False)]:
            for edit, on in zip(edits.values(), switches):
                edit.update(enabled=on)
            out, _ = compiled(ids, use_cache=False)
            want, _ = ex(ids, use_cache=False)
            assert torch.equal(out.last_hidden_state, want.last_hidden_state)
            if not any(switches):
                assert torch.equal(out.last_hidden_state, plain)
    assert counter.frame_count == 1


def test_hook_backend_leaves_the_output_alone_when_the_edit_is_off():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 32, 32, generator=_gen(17))
    plain, plain_layer2, _ = _hooked(model, "layer2", "layer3", lambda o: o, x, {})
    edit = fxstore.Ablate().update(enabled=False)
    storage = fxstore.HookForwardModuleStorage(model, ["layer2"], edits={model.layer2: edit})
    try:
        with torch.no_grad():
            out = storage(x)
        assert torch.equal(out, plain) and torch.equal(storage["layer2"][0], plain_layer2)
    finally:
        storage.remove()


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return torchvision.models.resnet18().eval()


def test_vector_that_does_not_broadcast_is_an_error_naming_edit_node_and_shapes(resnet):
    ex = fxstore.FeatureExtractor(resnet, edits={"layer1": fxstore.Add(torch.ones(5))})
    with pytest.raises(fxstore.EditError, match=r"edit Add on 'layer1' \(node 'layer1.1.relu_1'\): vector of shape \(5,\) does not broadcast "
                                                r"to the value's shape \(1, 64, 8, 8\)\.\nHint"):
        ex(torch.rand(1, 3, 32, 32))


def test_update_with_another_shape_or_dtype_is_an_error():
    add = fxstore.Add(torch.zeros(4))
    with pytest.raises(fxstore.EditError, match=r"Add.update: vector must keep shape \(4,\) and dtype torch.float32"):
        add.update(vector=torch.zeros(5))
    with pytest.raises(fxstore.EditError, match="dtype"):
        add.update(vector=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(fxstore.EditError, match="'value' is not a tensor of this edit"):
        add.update(value=torch.zeros(4))


def test_index_out_of_range_is_an_error(resnet):
    ex = fxstore.FeatureExtractor(resnet, edits={"layer1": fxstore.Ablate(index=(slice(None), 99))})
    with pytest.raises(fxstore.EditError, match=r"edit Ablate on 'layer1' \(node 'layer1.1.relu_1'\): index \(slice\(None, None, None\), 99\) "
                                                r"is out of range for the value of shape \(1, 64, 8, 8\)"):
        ex(torch.rand(1, 3, 32, 32))
    rows = fxstore.FeatureExtractor(resnet, edits={"layer1": fxstore.Ablate(index=torch.tensor([70]))})
    with pytest.raises(fxstore.EditError, match=r"positions \[70\] do not index dimension 1"):
        rows(torch.rand(1, 3, 32, 32))


def test_edit_past_the_last_stored_layer_without_the_output_is_refused(resnet):
    with pytest.raises(fxstore.EditError, match=r"the edit on 'layer3' \(node 'layer3.1.relu_1'\) has no effect.*\n"
                                                r"Hint: keep the output"):
        fxstore.FeatureExtractor(resnet, ["layer2"], keep_output=False, edits={"layer3": fxstore.Scale(2.0)})


def test_two_edits_on_one_node_are_refused(resnet):
    with pytest.raises(fxstore.EditError, match=r"two edits on the node 'layer1.1.relu_1': 'layer1' and "
                                                r"'layer1.1.relu_1'"):
        fxstore.FeatureExtractor(resnet, edits={"layer1": fxstore.Scale(2.0), "layer1.1.relu_1": fxstore.Ablate()})


@pytest.mark.parametrize("edits, match", [
    ({"layer1": torch.zeros(3)}, "is a Tensor, not an fxstore edit"),
    ([fxstore.Ablate()], "is not a mapping"),
])
def test_an_edit_that_is_not_an_edit_is_refused(resnet, edits, match):
    with pytest.raises(fxstore.EditError, match=match):
        fxstore.FeatureExtractor(resnet, edits=edits)


def test_a_bad_index_or_value_is_refused():
    with pytest.raises(fxstore.EditError, match=r"index=\[1, 2\] is not an edit index"):
        fxstore.Add(torch.zeros(3), index=[1, 2])
    with pytest.raises(fxstore.EditError, match="vector='a' is not a tensor"):
        fxstore.Add("a")


def test_an_unknown_layer_is_a_layer_not_found_error(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match="Did you mean"):
        fxstore.FeatureExtractor(resnet, edits={"layer9": fxstore.Ablate()})


# -- the hook backend applies the same edits --------------------------------------------------


@pytest.mark.parametrize("kind", ["add", "replace_at", "mean_ablate_mask", "apply"])
def test_hook_backend_edits_equal_the_extractor_output_and_stored_values(kind):
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 32, 32, generator=_gen(12))
    edit, _ = _cases(_shape(model, "layer2", x, {}))[kind]
    ex = fxstore.FeatureExtractor(model, ["layer2", "layer3"], edits={"layer2": edit})
    storage = fxstore.HookForwardModuleStorage(model, ["layer2", "layer3"], edits={model.layer2: edit})
    try:
        with torch.no_grad():
            out, feats = ex(x)
            hooked = storage(x)
        assert torch.equal(hooked, out)
        assert torch.equal(storage["layer2"][0], feats["layer2"]) and torch.equal(storage["layer3"][0], feats["layer3"])
        assert list(storage.edits) == ["layer2"]
    finally:
        storage.remove()
    with torch.no_grad():  # outside the storage's calls (and after remove) the model runs unedited
        assert torch.equal(model(x), fxstore.FeatureExtractor(model)(x)[0])


def test_gradient_wrt_an_edit_tensor_equals_the_hook_backend():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 32, 32, generator=_gen(13))
    vector = torch.zeros(128, 1, 1, requires_grad=True)
    ex = fxstore.FeatureExtractor(model, edits={"layer2": fxstore.Add(vector, scale=0.5)})
    storage = fxstore.HookForwardModuleStorage(model, [], edits={"layer2": fxstore.Add(vector, scale=0.5)})
    try:
        expected = torch.autograd.grad(storage(x)[:, 5].sum(), vector)[0]
    finally:
        storage.remove()
    got = torch.autograd.grad(ex(x)[0][:, 5].sum(), ex.edits["layer2"].vector)[0]
    assert ex.edits["layer2"].vector is vector
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().sum() > 0


class _Loop(nn.Module):
    """Untraceable (a loop count read from the data): kept as Python; its ``lin`` is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for _ in range(int(h.abs().sum() > 0) + 1):
            h = torch.tanh(self.lin(h))
        return h


class _Untraceable(nn.Module):
    """The partial frontend's case: an untraceable top level around traceable children."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.branch = _Loop()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if h.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace the top
            h = self.branch(h)
        return self.head(h)


# layer -> where it lives: a traced part's output, a node inside a traced part, a module kept as Python,
# a traced part inside a module kept as Python
PARTIAL_LAYERS = {"stem": "part", "stem.1": "node in a part", "branch": "python", "branch.lin": "part in python"}


@pytest.mark.parametrize("layer", list(PARTIAL_LAYERS))
@pytest.mark.parametrize("kind", ["add", "ablate", "scale", "mean_ablate_mask", "apply"])
def test_partial_frontend_edits_equal_a_forward_hook(layer, kind):
    torch.manual_seed(0)
    model = _Untraceable().eval()
    x = torch.rand(3, 8, generator=_gen(21))
    edit, by_hand = _cases(_shape(model, layer, x, {}))[kind]
    ex = fxstore.FeatureExtractor(model, ["head"], edits={layer: edit}, frontend="partial")
    assert ex.trace_report.frontend == "partial"
    expected, _, stored = _hooked(model, layer, "head", by_hand, x, {})
    out, feats = ex(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(feats["head"], stored, rtol=0, atol=0)
    assert not torch.equal(out, model(x))  # the edit changed something


def test_partial_frontend_edits_take_new_values_switch_off_and_carry_gradients():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    x = torch.rand(3, 8, generator=_gen(22))
    vector = torch.zeros(16, requires_grad=True)
    ex = fxstore.FeatureExtractor(model, ["branch"], edits={"branch": fxstore.Add(vector)}, frontend="partial")
    out, feats = ex(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # a zero vector: the plain model
    new = torch.randn(16, generator=_gen(23))
    ex.edits["branch"].update(vector=new)
    expected, stored, _ = _hooked(model, "branch", "branch", lambda o: o + new, x, {})
    out, feats = ex(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(feats["branch"], stored, rtol=0, atol=0)  # stored after the edit
    ex.edits["branch"].update(enabled=False)
    torch.testing.assert_close(ex(x)[0], model(x), rtol=0, atol=0)
    ex.edits["branch"].update(enabled=True)
    got = torch.autograd.grad(ex(x)[0][:, 1].sum(), ex.edits["branch"].vector)[0]
    storage = fxstore.HookForwardModuleStorage(model, [], edits={"branch": fxstore.Add(new.clone().requires_grad_())})
    try:
        reference = storage.edits["branch"].vector
        want = torch.autograd.grad(storage(x)[:, 1].sum(), reference)[0]
    finally:
        storage.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert want.abs().sum() > 0


def test_partial_frontend_edit_on_a_detection_backbone_equals_a_forward_hook():
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 96, 128, generator=_gen(24))]
    layer = "backbone.features.0.0"
    ex = fxstore.FeatureExtractor(model, edits={layer: fxstore.Scale(0.5)}, frontend="partial")
    assert ex.trace_report.frontend == "partial"
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: o * 0.5)
    try:
        with torch.no_grad():
            expected = model(images)
    finally:
        handle.remove()
    with torch.no_grad():
        got = ex(images)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_partial_frontend_refuses_an_edit_it_would_skip():
    class Gate(nn.Module):  # traced with its default; called with another value, it runs as plain Python
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x) * scale

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x, 2.0) if x.sum() > -1e9 else x

    ex = fxstore.FeatureExtractor(Top().eval(), edits={"gate.lin": fxstore.Ablate()}, frontend="partial",
                                  verify=False)
    with pytest.raises(fxstore.EditError, match=r"(?s)'gate' was called with a non-default value.*without its edits"):
        ex(torch.rand(2, 8))


