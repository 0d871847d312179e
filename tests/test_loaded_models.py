"""Models as users load them: dispatched and offloaded by accelerate, wrapped by nnsight, carrying
other libraries' instance ``forward`` wrappers or hooks, and the self-check that makes a capture
that misses a layer or an edit fail loudly instead of returning fewer features.

Every value is compared with a forward hook (or ``torch.autograd.grad``) on the same model object.
"""

import functools
import tempfile

import pytest
import torch
import transformers
from _loaded import (
    HIDDEN,
    VOCAB,
    assert_sweep_equals_hooks,
    gpt2,
    llama,
    lora,
    lora_prefix,
    nnsight_traced,
    offloaded_llama,
    quantized,
)
from _loaded import hooked as _hooked
from torch import nn

import fxstore
from fxstore import FeatureExtractor, LayerNotFoundError, TraceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_llama, _gpt2 = llama, gpt2


@pytest.fixture(scope="module")
def offloaded():
    return offloaded_llama()


@pytest.fixture(scope="module")
def nnsight_gpt2():
    """A GPT-2 after ``nnsight.NNsight(model)`` ran a trace (nnsight leaves its forward on every module)."""
    model = nnsight_traced(_gpt2(), lambda wrapped: wrapped.transformer.h[1])
    assert "forward" in vars(model.transformer.h[1])
    return model


def test_offloaded_model_reads_and_edits_like_forward_hooks(offloaded):
    ids = torch.randint(0, VOCAB, (2, 7))
    vector = torch.randn(HIDDEN)
    layers = ["model.layers.0", "model.layers.1"]
    ex = FeatureExtractor(offloaded, layers, edits={"model.layers.1": fxstore.Add(vector)})
    with torch.no_grad():
        out, feats = ex(ids)
    logits, seen = _hooked(offloaded, ids, layers, {"model.layers.1": lambda o: o + vector})
    assert torch.equal(out.logits, logits)
    assert set(feats) == set(layers)
    for layer in layers:
        assert torch.equal(feats[layer], seen[layer])
    report = ex.trace_report
    assert report.verified == "exact"
    assert "2 of 2 features against forward hooks" in report.checked and "their effect" in report.checked
    assert "wrapped by accelerate's AlignDevicesHook" in report.python_modules["model.layers.1"]
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # the model is as it was


@pytest.fixture(scope="module")
def dispatched():
    """The same Llama as users write it with accelerate: empty weights, then the checkpoint dispatched."""
    accelerate = pytest.importorskip("accelerate")
    folder, offload = tempfile.mkdtemp(), tempfile.mkdtemp()
    reference = _llama()
    reference.save_pretrained(folder)
    with accelerate.init_empty_weights():
        model = transformers.LlamaForCausalLM(reference.config)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = accelerate.load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=offload)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    return model.eval()


def test_dispatched_model_gradients_and_storage_equal_autograd_and_hooks(dispatched):
    ids = torch.randint(0, VOCAB, (1, 6))
    ex = FeatureExtractor(dispatched, ["model.layers.0"], grads=["model.layers.0"], frontend="partial")
    out, feats = ex(ids)
    out.logits.square().mean().backward()
    seen = {}
    handle = dispatched.model.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
    try:
        loss = dispatched(ids).logits.square().mean()
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(loss, seen["h"])
    torch.testing.assert_close(ex.gradients(feats)["model.layers.0"], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(feats["model.layers.0"], seen["h"])
    storage = fxstore.ForwardModuleStorage(dispatched, ["model.layers.0"], frontend="partial", detach=True)
    storage([ids, ids[:, :3]])
    assert [tuple(v.shape) for v in storage["model.layers.0"]] == [(1, 6, HIDDEN), (1, 3, HIDDEN)]
    assert torch.equal(storage["model.layers.0"][0], seen["h"].detach())


def test_nnsight_wrapped_model_reads_and_edits_like_forward_hooks(nnsight_gpt2):
    model = nnsight_gpt2
    ids = torch.randint(0, VOCAB, (2, 5))
    layers = ["transformer.h.0", "transformer.h.1"]
    ex = FeatureExtractor(model, layers, edits={"transformer.h.0": fxstore.Replace(torch.zeros(HIDDEN))})
    with torch.no_grad():
        out, feats = ex(ids)
    logits, seen = _hooked(model, ids, layers, {"transformer.h.0": torch.zeros_like})
    assert torch.equal(out.logits, logits)
    assert set(feats) == set(layers) and torch.equal(feats["transformer.h.1"], seen["transformer.h.1"])
    assert not feats["transformer.h.0"].any()
    assert ex.trace_report.verified == "exact"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = _Block(), _Block(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def _scaled_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Another library's instance-level wrapper: runs the module, then rescales its output."""
    return type(module).forward(module, x) * 3.0


def test_unknown_instance_wrapper_runs_as_a_leaf_with_its_output_stored_and_edited():
    net = _Net().eval()
    net.a.forward = functools.partial(_scaled_forward, net.a)
    x = torch.rand(3, 4)
    ex = FeatureExtractor(net, ["a", "b"], edits={"a": fxstore.Scale(0.5)})
    out, feats = ex(x)
    with torch.no_grad():
        a = net.a(x) * 0.5
        assert torch.equal(feats["a"], a) and torch.equal(out, net.head(net.b(a)))
    assert ex.trace_report.verified == "exact" and "forward" in vars(net.a)
    with pytest.raises(LayerNotFoundError, match=r"(?s)'a.fc' is inside 'a', which is wrapped by an instance-level "
                                                 r"forward \(partial\).*Hint: select 'a' itself"):
        FeatureExtractor(net, ["a.fc"])


def test_another_librarys_forward_hook_runs_on_real_values():
    net = _Net().eval()
    calls = []
    handle = net.b.register_forward_hook(lambda m, args, out: calls.append(out.shape) or out + 1.0)
    try:
        x = torch.rand(5, 4)
        out, feats = FeatureExtractor(net, ["b", "head"])(x)
        calls.clear()
        with torch.no_grad():
            expected = net(x)
        assert calls == [torch.Size([5, 4])]
        assert torch.equal(out, expected) and torch.equal(feats["head"], expected)
        assert torch.equal(feats["b"], net.b(net.a(x)))  # the hook's result is the module's output
    finally:
        handle.remove()


class _Detour(nn.Module):
    """Calls its child through a bound method kept from ``__init__`` (a partial capture's blind spot)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = _Block()
        self.run = self.inner.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 4:  # shape-dependent: torch.fx cannot trace the top level, torch.export can
            x = x + 1
        return self.run(x)


def test_self_check_refuses_a_capture_that_misses_a_stored_layer():
    with pytest.raises(TraceError, match="feature 'inner.fc' was not produced"):
        FeatureExtractor(_Detour(), ["inner.fc"], frontend="partial")(torch.rand(2, 4))


def test_self_check_refuses_an_edit_that_never_ran():
    with pytest.raises(TraceError, match="the edit on 'inner.act' was not applied"):
        FeatureExtractor(_Detour(), edits={"inner.act": fxstore.Scale(2.0)}, frontend="partial")(torch.rand(2, 4))


def test_auto_falls_back_past_a_capture_that_misses_a_layer():
    model = _Detour()
    x = torch.rand(2, 4)
    ex = FeatureExtractor(model, ["inner.fc"])
    out, feats = ex(x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
        assert torch.equal(feats["inner.fc"], model.inner.fc(x + 1))
    assert ex.trace_report.frontend == "export" and "1 of 1 features" in ex.trace_report.checked


@pytest.fixture(scope="module")
def lora_gpt2():
    return lora("gpt2")


@pytest.fixture(scope="module")
def lora_llama():
    return lora("llama")


@pytest.fixture(params=["gpt2", "llama"])
def lora_kind(request):
    """A LoRA model of each kind and where its blocks are."""
    return request.getfixturevalue(f"lora_{request.param}"), lora_prefix(request.param)


def test_peft_lora_reads_edits_and_trains_its_adapters(lora_kind):
    model, blocks = lora_kind
    model.train()
    for module in model.modules():  # deterministic in train mode
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    layer = f"{blocks}.1"
    ids = torch.randint(0, VOCAB, (2, 5))
    vector = torch.randn(HIDDEN)
    ex = FeatureExtractor(model, [layer], edits={layer: fxstore.Add(vector)})
    out, feats = ex(ids)
    loss = out.logits.square().mean()
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    got = torch.autograd.grad(loss, adapters)
    reference, seen = _hooked(model, ids, [layer], {layer: lambda o: o + vector}, grad=True)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats[layer], seen[layer], rtol=0, atol=1e-6)
    for g, want in zip(got, torch.autograd.grad(reference.square().mean(), adapters)):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    assert all(float(g.abs().max()) > 0 for g in got)  # every adapter gets gradients
    model.eval()


def test_peft_disable_adapter_changes_the_result_like_the_model(lora_kind):
    model, blocks = lora_kind
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    layer = f"{blocks}.0"
    ex = FeatureExtractor(model, [layer])
    with torch.no_grad():
        on, feats_on = ex(ids)
        with model.disable_adapter():
            off, feats_off = ex(ids)
            plain = model(ids, use_cache=False).logits
        again, _ = ex(ids)
        adapted = model(ids, use_cache=False).logits
    assert torch.equal(off.logits, plain) and torch.equal(on.logits, adapted) and torch.equal(again.logits, adapted)
    assert not torch.equal(feats_on[layer], feats_off[layer])


def test_a_base_model_name_on_a_peft_model_suggests_the_adapted_name(lora_kind):
    model, blocks = lora_kind
    base_name = blocks.removeprefix("base_model.model.") + ".1"
    with pytest.raises(LayerNotFoundError, match=f"Did you mean '{blocks}.1'"):
        FeatureExtractor(model.eval(), [base_name], example_inputs=torch.randint(0, VOCAB, (1, 4)))


@pytest.mark.compile
@pytest.mark.parametrize("kind", ["llama", "lora"])
def test_hugging_face_models_compile_on_their_first_call(kind, lora_gpt2):
    torch._dynamo.reset()
    model = _llama() if kind == "llama" else lora_gpt2.eval()
    layer = "model.layers.1" if kind == "llama" else "base_model.model.transformer.h.1"
    ex = FeatureExtractor(model, [layer])  # no example_inputs, no eager call
    assert ex.trace_report is None  # torch.export waits for inputs
    compiled = torch.compile(ex, fullgraph=True, backend="eager")  # one graph, no eager call: what is checked
    for shape in ((2, 7), (4, 9)):
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            out, feats = compiled(ids)
        logits, seen = _hooked(model, ids, [layer], {})
        hidden = seen[layer]
        torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[layer], hidden, rtol=1e-5, atol=1e-6)
    assert ex.exports == 1 and ex.trace_report.verified == "exact"


@pytest.fixture(scope="module")
def llama_folder():
    folder = tempfile.mkdtemp()
    llama(64).save_pretrained(folder)
    return folder


@pytest.mark.compile
@pytest.mark.parametrize("kind", ["torchao-int8-weight", "torchao-int8-dynamic", "bnb-8bit", "bnb-nf4"])
def test_quantized_models_read_and_edit_like_forward_hooks(kind, llama_folder):
    model = quantized(kind, llama_folder)
    layer, vector = "model.layers.1", torch.randn(64)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        model(ids)  # as users do: bitsandbytes 8-bit moves its weights into its state on the first call
    ex = FeatureExtractor(model, ["model.layers.0", layer], edits={layer: fxstore.Add(vector)})
    with torch.no_grad():
        out, feats = ex(ids)
    logits, seen = _hooked(model, ids, ["model.layers.0", layer], {layer: lambda o: o + vector})
    assert torch.equal(out.logits, logits)
    assert torch.equal(feats["model.layers.0"], seen["model.layers.0"]) and torch.equal(feats[layer], seen[layer])
    report = ex.trace_report
    assert report.verified == "exact" and "their effect against forward hooks" in report.checked
    if report.frontend == "partial":  # not one graph: the report says why torch.export could not take it
        assert "export" in report.reasons
        return
    torch._dynamo.reset()
    with torch.no_grad():  # torchao's kernels: one graph, the same values as the eager extractor
        compiled_out, compiled_feats = torch.compile(ex, fullgraph=True, backend="eager")(ids)
    assert torch.equal(compiled_out.logits, out.logits) and torch.equal(compiled_feats[layer], feats[layer])


@pytest.mark.compile
def test_a_plain_model_is_built_from_the_first_compiled_call_outside_the_trace():
    torch._dynamo.reset()
    model = _Detour().eval()
    x = torch.rand(3, 4)
    ex = FeatureExtractor(model, ["inner.fc"])
    assert ex.trace_report is None  # waits for inputs
    out, feats = torch.compile(ex, fullgraph=True, backend="eager")(x)
    with torch.no_grad():
        assert torch.equal(out, model(x)) and torch.equal(feats["inner.fc"], model.inner.fc(x + 1))
    assert ex.trace_report.frontend == "export" and ex.trace_report.verified == "exact"
    wrong = FeatureExtractor(model, ["inner.nope"])
    with pytest.raises(LayerNotFoundError, match="'inner.nope'"):  # fxstore's error, not dynamo's
        torch.compile(wrong, fullgraph=True, backend="eager")(x)


def test_patch_sweep_on_an_nnsight_wrapped_model_equals_patching_with_forward_hooks(nnsight_gpt2):
    model = nnsight_gpt2.eval()
    layers, positions = ["transformer.h.0", "transformer.h.1"], [0, 3]
    assert_sweep_equals_hooks(model, layers, positions)


def test_extract_dataset_from_a_lora_model_equals_forward_hooks(lora_gpt2, tmp_path):
    np = pytest.importorskip("numpy")
    model = lora_gpt2.eval()
    layer = "base_model.model.transformer.h.1"
    ids = torch.randint(0, VOCAB, (3, 6))
    fxstore.extract_dataset(model, [layer], torch.utils.data.TensorDataset(ids), tmp_path / "out", progress=False,
                            batch_size=2)
    stored = torch.from_numpy(np.asarray(fxstore.load_features(tmp_path / "out")[layer][:]))
    _, seen = _hooked(model, ids, [layer], {})
    torch.testing.assert_close(stored, seen[layer], rtol=0, atol=1e-6)


def test_first_call_with_edits_in_train_mode_is_one_run_of_the_edited_model():
    """The self-check's trial runs leave no trace: dropout draws and batch-norm statistics are those of
    one run of the model edited by a forward hook."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    twin = copy.deepcopy(model)
    x = torch.rand(6, 4)
    ex = FeatureExtractor(model, ["2"], edits={"0": fxstore.Scale(2.0)})
    torch.manual_seed(1)
    out, feats = ex(x)
    handle = twin[0].register_forward_hook(lambda m, a, o: o * 2.0)
    seen = {}
    twin[2].register_forward_hook(lambda m, a, o: seen.__setitem__("2", o))
    torch.manual_seed(1)
    try:
        expected = twin(x)
    finally:
        handle.remove()
    assert torch.equal(out, expected) and torch.equal(feats["2"], seen["2"])
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_nnsight_over_an_offloaded_model_reads_and_edits_like_forward_hooks():
    """nnsight's controller sits over accelerate's hook (nnsight runs the hook itself): both are rebound."""
    nnsight = pytest.importorskip("nnsight")
    model = offloaded_llama()
    ids = torch.randint(0, VOCAB, (2, 7))
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(ids):
        wrapped.model.layers[1].output.save()
    vector = torch.randn(HIDDEN)
    ex = FeatureExtractor(model, ["model.layers.0"], edits={"model.layers.1": fxstore.Add(vector)},
                          frontend="partial")
    with torch.no_grad():
        out, feats = ex(ids)
    logits, seen = _hooked(model, ids, ["model.layers.0"], {"model.layers.1": lambda o: o + vector})
    assert torch.equal(out.logits, logits) and torch.equal(feats["model.layers.0"], seen["model.layers.0"])
    assert ex.trace_report.python_modules["model.layers.1"] == "wrapped by nnsight's Controller with accelerate's hook"


def test_bfloat16_llama_reads_edits_and_taps_gradients_like_hooks_and_autograd():
    model = _llama().to(torch.bfloat16)
    layer, vector = "model.layers.0", torch.randn(HIDDEN, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 6))
    ex = FeatureExtractor(model, [layer], grads=[layer], edits={layer: fxstore.Add(vector)})
    out, feats = ex(ids)
    out.logits.float().square().mean().backward()
    logits, seen = _hooked(model, ids, [layer], {layer: lambda o: o + vector}, grad=True)
    (expected,) = torch.autograd.grad(logits.float().square().mean(), seen[layer])
    assert torch.equal(out.logits, logits) and torch.equal(feats[layer], seen[layer])
    torch.testing.assert_close(ex.gradients(feats)[layer], expected)  # bfloat16 tolerances: one ulp apart here
    assert feats[layer].dtype == torch.bfloat16 and ex.trace_report.verified == "exact"


def test_accelerate_hook_on_a_block_is_a_leaf_for_fx_and_captured_through_by_partial():
    hooks = pytest.importorskip("accelerate.hooks")
    net = _Net().eval()
    hooks.add_hook_to_module(net.a, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    with pytest.raises(LayerNotFoundError, match=r"(?s)'a.fc' is inside 'a', which is wrapped by accelerate's "
                                                 r"AlignDevicesHook.*Hint: use frontend='partial'"):
        FeatureExtractor(net, ["a.fc"], frontend="fx")
    x = torch.rand(3, 4)
    ex = FeatureExtractor(net, ["a.fc"], edits={"a.act": fxstore.Scale(-1.0)}, frontend="partial")
    out, feats = ex(x)
    with torch.no_grad():
        assert torch.equal(feats["a.fc"], net.a.fc(x)) and torch.equal(out, net.head(net.b(-net.a(x))))
    assert ex.trace_report.verified == "exact" and "forward" in vars(net.a)


class _Pair(nn.Module):
    """Kept as Python by the partial frontend (it branches on a shape) and returns two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x) if x.shape[-1] == 4 else x
        return y, y.tanh()


def test_self_check_accepts_a_python_module_whose_output_holds_several_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(_Pair()).eval()
    x = torch.rand(2, 4)
    ex = FeatureExtractor(model, ["0"], frontend="partial")
    _, feats = ex(x)
    with torch.no_grad():
        first, second = model[0](x)
    assert torch.equal(feats["0:0"], first) and torch.equal(feats["0:1"], second)
    assert ex.trace_report.verified == "exact"


@pytest.mark.compile
def test_compiled_extractor_follows_the_peft_model_across_adapter_states():
    """``torch.compile(ex, fullgraph=True)``, then ``disable_adapter()``, ``set_adapter``, merging: each
    state gets its program before dynamo traces, and its result is the model's (never a stale graph)."""
    peft = pytest.importorskip("peft")
    torch._dynamo.reset()
    model = lora("llama")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    layer = "base_model.model.model.layers.1"
    ex = FeatureExtractor(model, [layer], edits={layer: fxstore.Scale(2.0)})
    compiled = torch.compile(ex, fullgraph=True, backend="eager")
    ids = torch.randint(0, VOCAB, (2, 5))
    results = []

    def check() -> None:
        with torch.no_grad():
            out, feats = compiled(ids)
        logits, seen = _hooked(model, ids, [layer], {layer: lambda o: o * 2.0})
        torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[layer], seen[layer], rtol=1e-5, atol=1e-6)
        results.append(logits)

    check()
    with model.disable_adapter():
        check()
    model.set_adapter("other")
    check()
    model.set_adapter("default")
    model.merge_adapter()
    try:
        check()
    finally:
        model.unmerge_adapter()
    check()
    on, off, other, merged, again = results
    assert not torch.equal(on, off) and not torch.equal(on, other) and not torch.equal(off, other)
    torch.testing.assert_close(merged, on, rtol=1e-4, atol=1e-5)  # merged weights: the same model, rounded
    torch.testing.assert_close(again, on, rtol=1e-4, atol=1e-5)  # unmerged: the weights rounded back
