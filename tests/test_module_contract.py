"""The extractor behaves like any ``nn.Module``: subclassing, copying, ``torch.compile`` with taps.

References: a subclass written the way users (and torchvision's feature-extraction tests) write
adapters, forward hooks on the plain model, ``torch.autograd.grad`` and Captum's
``LayerGradientXActivation``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import fxstore


def _hooked(model: nn.Module, names: list[str], x: torch.Tensor,
            clone: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward hooks on the plain model; ``clone``: copy each value when produced (a later
    ``ReLU(inplace=True)`` cannot change it), else keep it in the autograd graph."""
    acts: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: acts.__setitem__(n, o.clone() if clone else o)) for n in names]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, acts


class FeaturesOnly(fxstore.FeatureExtractor):
    """The adapter users write: a ``forward`` that returns only the features dict."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)[1]


class Pooled(fxstore.FeatureExtractor):
    """A subclass with its own ``__init__`` argument and post-processing."""

    def __init__(self, model, layers, scale=1.0):
        super().__init__(model, layers)
        self.scale = scale

    def forward(self, x):
        out, feats = super().forward(x)
        return out, {k: v.mean(dim=(2, 3)) * self.scale for k, v in feats.items()}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_a_subclass_forward_runs_and_super_forward_reaches_the_extractor(resnet):
    x = torch.rand(2, 3, 32, 32)
    _, want = _hooked(resnet, ["layer1", "layer2"], x)
    feats = FeaturesOnly(resnet, ["layer1", "layer2"])(x)
    assert isinstance(feats, dict) and list(feats) == ["layer1", "layer2"]
    assert all(torch.equal(feats[k], want[k]) for k in feats)


def test_a_subclass_with_its_own_init_keeps_its_attributes_and_forward(resnet):
    x = torch.rand(2, 3, 32, 32)
    out, feats = Pooled(resnet, ["layer3"], scale=2.0)(x)
    ref_out, want = _hooked(resnet, ["layer3"], x)
    assert torch.equal(out, ref_out)
    assert torch.equal(feats["layer3"], want["layer3"].mean(dim=(2, 3)) * 2.0)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_of_a_subclass_keep_the_subclass_behaviour(resnet, clone):
    x = torch.rand(1, 3, 32, 32)
    ex = Pooled(resnet, ["layer2"], scale=3.0)
    twin = clone(ex)
    assert type(twin) is Pooled and twin.scale == 3.0
    assert twin.forward is not ex.forward  # its own bound forward (its own compiled identity)
    a, b = ex(x), twin(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["layer2"], b[1]["layer2"])


def test_an_instance_attribute_forward_set_by_the_user_still_wins(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer1"], keep_output=False)
    original = ex.forward
    ex.forward = lambda x: original(x)[1]["layer1"].sum()
    assert ex(torch.rand(1, 3, 32, 32)).dim() == 0


def test_subclass_train_eval_switch_and_state_dict_keys(resnet):
    ex = FeaturesOnly(resnet, ["layer1"])
    assert set(ex.state_dict()) == set(resnet.state_dict())
    ex.train()
    feats = ex(torch.rand(2, 3, 32, 32))
    ex.eval()
    assert ex.training is False and resnet.training is False and list(feats) == ["layer1"]
    resnet.eval()


def test_many_compiled_subclass_instances_each_compile_their_own_program(resnet):
    x = torch.rand(1, 3, 32, 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layers = ["layer1", "layer2", "layer3", "layer4", "conv1", "bn1", "relu", "maxpool", "avgpool", "fc"]
    compiled = [torch.compile(FeaturesOnly(resnet, [name], keep_output=False), fullgraph=True, backend=backend)
                for name in layers]  # more than dynamo's recompile limit of 8
    for name, c in zip(layers, compiled):
        _, want = _hooked(resnet, [name], x)
        assert torch.equal(c(x)[name], want[name]), name
    assert len(graphs) == len(layers)


def test_compile_returns_the_extractor(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer1"])
    c = ex.compile(backend="eager")
    assert c is ex
    out, feats = c(torch.rand(1, 3, 32, 32))
    assert list(feats) == ["layer1"]


# -- torch.compile(ex, fullgraph=True) with gradient taps -----------------------------------------


def _grads_reference(model, x, names):
    out, acts = _hooked(model, names, x, clone=False)
    return out, torch.autograd.grad(out.logsumexp(1).sum(), [acts[n] for n in names])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_of_grads_taps_matches_autograd(resnet, backend):
    names = ["layer2", "layer4"]
    ex = fxstore.FeatureExtractor(resnet, grads=names)
    breaks = torch._dynamo.utils.counters["graph_break"]
    before = sum(breaks.values())
    compiled = torch.compile(ex, fullgraph=True, backend=backend, dynamic=True)
    for batch in (2, 3):
        x = torch.rand(batch, 3, 32, 32)
        out, feats = compiled(x)
        out.logsumexp(1).sum().backward()
        ref_out, ref = _grads_reference(resnet, x, names)
        grads = ex.gradients(feats)
        assert torch.allclose(out, ref_out, atol=1e-5)
        for name, want in zip(names, ref):
            assert torch.allclose(grads[name], want, rtol=1e-4, atol=1e-6), (backend, batch, name)
    assert sum(breaks.values()) == before


def test_gradient_taps_work_on_a_frozen_model_and_an_input_without_grad(resnet):
    model = copy.deepcopy(resnet).requires_grad_(False)
    x = torch.rand(2, 3, 32, 32)
    ex = fxstore.FeatureExtractor(model, grads=["layer3"])
    out, feats = ex(x)
    out.logsumexp(1).sum().backward()
    h = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: h.__setitem__("v", o.requires_grad_()))
    ref_out = model(x)
    handle.remove()
    (want,) = torch.autograd.grad(ref_out.logsumexp(1).sum(), h["v"])
    assert torch.equal(ex.gradients(feats)["layer3"], want)
    assert all(p.grad is None for p in model.parameters())


def test_gradients_accumulate_over_two_backward_passes_like_grad(resnet):
    ex = fxstore.FeatureExtractor(resnet, grads=["layer4"])
    out, feats = ex(torch.rand(1, 3, 32, 32))
    out.sum().backward(retain_graph=True)
    first = ex.gradients(feats)["layer4"].clone()
    out.sum().backward()
    assert torch.equal(ex.gradients(feats)["layer4"], 2 * first)


def test_a_dropped_features_dict_releases_its_gradients(resnet):
    import gc

    from fxstore.capture import _taps

    ex = fxstore.FeatureExtractor(resnet, grads=["layer4"])
    before = len(_taps._slots)
    out, feats = ex(torch.rand(1, 3, 32, 32))
    out.sum().backward()
    assert len(_taps._slots) == before + 1
    del out, feats
    gc.collect()
    assert len(_taps._slots) == before


@pytest.mark.parametrize("how", ["torch.compile(step)", "extractor.compile()"])
def test_backward_storage_with_compiled_gradient_taps_equals_autograd(resnet, how):
    storage = fxstore.BackwardModuleStorage(resnet, [resnet.layer2, resnet.layer3])
    if how == "extractor.compile()":
        for extractor in storage.extractors.values():
            extractor.compile(backend="aot_eager")  # fullgraph=True by default
        step = storage
    else:
        step = torch.compile(lambda x: storage(x), fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        x = torch.rand(batch, 3, 32, 32)
        out = step(x)
        out.logsumexp(1).sum().backward()
        _, ref = _grads_reference(resnet, x, ["layer2", "layer3"])
        assert torch.allclose(storage[resnet.layer2][-1], ref[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(storage[resnet.layer3][-1], ref[1], rtol=1e-5, atol=1e-7)
    assert len(storage[resnet.layer2]) == 2


# -- attributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attributions_equal_captums_layer_gradient_x_activation(resnet, compiled):
    captum_attr = pytest.importorskip("captum.attr")
    x = torch.rand(2, 3, 32, 32)
    target = 3
    ex = fxstore.FeatureExtractor(resnet, ["layer3", "layer4"], grads=["layer3", "layer4"])
    run = torch.compile(ex, fullgraph=True, backend="aot_eager") if compiled else ex
    out, feats = run(x)
    out[:, target].sum().backward()
    attrs = ex.attributions(feats)
    for name in ("layer3", "layer4"):
        want = captum_attr.LayerGradientXActivation(resnet, resnet.get_submodule(name)).attribute(x, target=target)
        assert torch.allclose(attrs[name], want, rtol=1e-5, atol=1e-7), name


def test_attributions_of_a_layer_that_is_not_stored_say_how_to_store_it(resnet):
    ex = fxstore.FeatureExtractor(resnet, grads=["layer4"])
    out, feats = ex(torch.rand(1, 3, 32, 32))
    out.sum().backward()
    with pytest.raises(fxstore.ConfigError, match=r"(?s)'layer4', which is not stored.*Hint: select it in layers="):
        ex.attributions(feats)


def test_gradients_before_backward_raise_not_ready(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer4"], grads=["layer4"])
    _, feats = ex(torch.rand(1, 3, 32, 32))
    with pytest.raises(fxstore.GradientNotReadyError, match=r"(?s)'layer4'.*Hint: call backward"):
        ex.attributions(feats)


@pytest.mark.parametrize("root", ["", "model"], ids=["empty-name", "model-object"])
def test_selecting_the_root_module_is_refused_with_the_true_reason(resnet, root):
    spec = resnet if root == "model" else root
    with pytest.raises(fxstore.LayerNotFoundError, match=r"(?s)the model itself .* is not one of its layers.*Hint: "
                                                          r"read it from `output, features = ex\(x\)`"):
        fxstore.FeatureExtractor(resnet, [spec])
