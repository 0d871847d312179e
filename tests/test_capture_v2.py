"""Capture v2: every extractor its own compiled program, gradient taps for any shape, no global
state, the self-check against mis-traces, and the one-line errors of bad options."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxstore
from fxstore.capture._keys import parse_key


def _counting_backend():
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def _config_snapshot() -> dict[str, object]:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    snapshot = {f"dynamo.{k}": v for k, v in dynamo_config.get_config_copy().items()}
    snapshot.update({f"inductor.{k}": v for k, v in inductor_config.get_config_copy().items()})
    return {k: repr(v) for k, v in snapshot.items()}


def _reference_grads(model: nn.Module, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The independent reference: forward hooks on the plain model and ``torch.autograd.grad``."""
    acts: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: acts.__setitem__(name, out)) for name in layers]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    loss = out.logsumexp(1).sum()
    return out, list(torch.autograd.grad(loss, [acts[name] for name in layers]))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


# -- many extractors ----------------------------------------------------------------------


def test_twelve_extractors_each_compile_with_fullgraph(resnet):
    layers = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
              "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    x = torch.rand(1, 3, 32, 32)
    for layer in layers:
        ex = fxstore.FeatureExtractor(resnet, [layer])
        backend, graphs = _counting_backend()
        out, feats = torch.compile(ex, fullgraph=True, backend=backend)(x)
        assert len(graphs) == 1, layer
        assert torch.equal(out, resnet(x)) and set(feats) == {layer}


def test_each_extractor_has_its_own_forward_code(resnet):
    a, b = fxstore.FeatureExtractor(resnet, ["layer1"]), fxstore.FeatureExtractor(resnet, ["layer2"])
    assert a.forward.__code__ is not b.forward.__code__
    assert copy.deepcopy(a).forward.__code__ is not a.forward.__code__


# -- no process-wide state ------------------------------------------------------------------


def test_building_calling_and_compiling_a_grads_extractor_changes_no_global_config(resnet):
    before = _config_snapshot()
    ex = fxstore.FeatureExtractor(resnet, ["layer1"], grads=["layer2"])
    out, _ = ex(torch.rand(2, 3, 32, 32))
    out.sum().backward()
    ex.compile(backend="eager")
    out, _ = ex(torch.rand(3, 3, 32, 32))
    out.sum().backward()
    after = _config_snapshot()
    assert {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)} == {}


def test_an_unrelated_compiled_function_makes_as_many_graphs_with_fxstore_as_without(resnet):
    def graphs_for_batches() -> int:
        torch._dynamo.reset()  # dynamo remembers dynamic dims per code object: start both runs cold
        mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        backend, graphs = _counting_backend()
        compiled = torch.compile(mlp, backend=backend)
        for batch in range(2, 14):
            compiled(torch.rand(batch, 8))
        return len(graphs)

    without = graphs_for_batches()
    ex = fxstore.FeatureExtractor(resnet, grads=["layer1"])
    ex.compile(backend="eager")
    out, _ = ex(torch.rand(2, 3, 32, 32))
    out.sum().backward()
    with_fxstore = graphs_for_batches()
    assert with_fxstore == without <= 2


# -- gradient taps for any shape --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_compiled_grads_serve_twelve_batch_sizes_with_exact_gradients(resnet, dynamic):
    layers = ["layer2", "layer4"]
    ex = fxstore.FeatureExtractor(resnet, grads=layers)
    backend, graphs = _counting_backend()
    ex.compile(backend=backend, dynamic=dynamic)  # fullgraph=True by default
    for batch in range(1, 13):
        x = torch.rand(batch, 3, 32, 32)
        out, feats = ex(x)
        out.logsumexp(1).sum().backward()
        grads = ex.gradients(feats)
        ref_out, ref = _reference_grads(resnet, x, layers)
        assert torch.allclose(out, ref_out, atol=1e-6)
        for name, want in zip(layers, ref):
            assert grads[name].shape == want.shape
            assert torch.allclose(grads[name], want, rtol=1e-5, atol=1e-7), (batch, name)
    assert len(graphs) <= 2


def test_compiled_grads_of_a_train_mode_model_leave_batchnorm_as_one_plain_step():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    twin = copy.deepcopy(model)
    ex = fxstore.FeatureExtractor(model, grads=["layer3"])
    ex.compile(backend="eager")
    x = torch.rand(4, 3, 32, 32)
    out, feats = ex(x)
    out.logsumexp(1).sum().backward()
    ref_out, (ref,) = _reference_grads(twin, x, ["layer3"])
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(ex.gradients(feats)["layer3"], ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(model.bn1.running_mean, twin.bn1.running_mean)
    assert int(model.bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_plain_torch_compile_fullgraph_of_a_grads_extractor_serves_twelve_batch_sizes(resnet, dynamic):
    ex = fxstore.FeatureExtractor(resnet, grads=["layer3"])
    backend, graphs = _counting_backend()
    compiled = torch.compile(ex, fullgraph=True, backend=backend, dynamic=dynamic)
    for batch in range(1, 13):  # past dynamo's recompile limit of 8
        x = torch.rand(batch, 3, 32, 32)
        out, feats = compiled(x)
        out.logsumexp(1).sum().backward()
        ref_out, (ref,) = _reference_grads(resnet, x, ["layer3"])
        assert torch.allclose(out, ref_out, atol=1e-6)
        assert torch.allclose(ex.gradients(feats)["layer3"], ref, rtol=1e-5, atol=1e-7), batch
    assert len(graphs) <= 2, len(graphs)  # static then dynamic (or dynamic from the start): no break


# -- the self-check ---------------------------------------------------------------------------


class Scaled(nn.Module):
    """fx bakes the Python attribute ``k`` into the graph: changing it later is a silent mis-trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.k = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.k


def test_a_mis_traced_program_falls_back_to_the_next_frontend():
    model = Scaled().eval()
    ex = fxstore.FeatureExtractor(model, ["conv"])
    model.k = 3.0  # the fx graph still multiplies by 2
    x = torch.rand(2, 3, 8, 8)
    out, feats = ex(x)
    assert torch.equal(out, model(x))
    assert torch.equal(feats["conv"], model.conv(x))
    report = ex.trace_report
    assert report.frontend == "export"
    assert report.reasons["fx"].startswith("self-check: output differs from the plain model")


def test_a_mis_traced_program_with_an_explicit_frontend_raises():
    model = Scaled().eval()
    ex = fxstore.FeatureExtractor(model, ["conv"], frontend="fx")
    model.k = 3.0
    with pytest.raises(fxstore.TraceError, match=r"(?s)fx frontend captured Scaled wrongly.*Hint"):
        ex(torch.rand(2, 3, 8, 8))


def test_the_self_check_also_covers_truncated_extractors():
    model = Scaled().eval()
    ex = fxstore.FeatureExtractor(model, ["conv"], keep_output=False, frontend="fx")
    model.k = 3.0
    with pytest.raises(fxstore.TraceError, match="wrongly"):
        ex(torch.rand(2, 3, 8, 8))


def test_verify_false_skips_the_self_check():
    model = Scaled().eval()
    ex = fxstore.FeatureExtractor(model, ["conv"], verify=False)
    model.k = 3.0
    out, _ = ex(torch.rand(1, 3, 8, 8))
    assert ex.trace_report.frontend == "fx" and ex.trace_report.verified == "skipped: verify=False"


def test_the_self_check_runs_at_build_time_with_example_inputs():
    x = torch.rand(1, 3, 8, 8)
    ex = fxstore.FeatureExtractor(Scaled().eval(), ["conv"], example_inputs=(x,))
    assert ex.trace_report.verified == "exact"


def test_the_self_check_leaves_no_trace_on_buffers_or_the_random_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    twin = copy.deepcopy(model)
    ex = fxstore.FeatureExtractor(model, ["1"])
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(7)
    out, _ = ex(x)
    after_ex = torch.rand(3)
    torch.manual_seed(7)
    ref = twin(x)
    after_plain = torch.rand(3)
    assert ex.trace_report.verified == "exact"
    assert torch.equal(out, ref)  # same dropout mask: the check did not consume random numbers
    assert torch.equal(after_ex, after_plain)
    assert torch.equal(model[1].running_mean, twin[1].running_mean)  # statistics updated once
    assert int(model[1].num_batches_tracked) == 1


def test_graph_and_code_show_the_rewritten_program(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer1"], keep_output=False)
    targets = {str(n.target) for n in ex.graph.nodes if n.op == "call_module"}
    assert "layer1.0.conv1" in targets and not any(t.startswith("layer2") for t in targets)
    assert "return (None, (layer1_1_relu_1,), ())" in ex.code


def test_feature_keys_parse_back():
    for key in ["layer1", "relu_1", "rpn.head.conv@1", "block:0", "layer2:grad", "rpn.head.conv@2:1:grad"]:
        assert str(parse_key(key)) == key
    assert parse_key("rpn.head.conv@2:1:grad") == fxstore.FeatureKey("rpn.head.conv", 2, 1, True)


# -- one-line errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    (dict(transform=5), r"(?s)transform=5 is not callable\..*Hint"),
    (dict(dtype="bogus"), r"dtype='bogus' is not a torch dtype"),
    (dict(device="gpu"), r"device='gpu' is not a device"),
    (dict(layers=None, grads=["layer1"], keep_output=False), r"(?s)no gradient can ever reach the taps.*Hint"),
])
def test_bad_extractor_options_raise_config_errors(resnet, options, match):
    layers = options.pop("layers", ["layer1"])
    with pytest.raises(fxstore.ConfigError, match=match):
        fxstore.FeatureExtractor(resnet, layers, **options)


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has a cuda:7")
def test_a_cuda_device_that_is_not_there_is_refused_at_build(resnet):
    with pytest.raises(fxstore.ConfigError, match=r"(?s)device='cuda:7'.*Hint"):
        fxstore.FeatureExtractor(resnet, ["layer1"], device="cuda:7")


def test_backward_storage_checks_dtype_and_device_at_construction(resnet):
    with pytest.raises(fxstore.ConfigError, match="dtype='bogus'"):
        fxstore.BackwardModuleStorage(resnet, ["layer1"], dtype="bogus")
    with pytest.raises(fxstore.ConfigError, match="device='gpu'"):
        fxstore.BackwardModuleStorage(resnet, ["layer1"], device="gpu")


def test_a_generator_of_layers_is_read_once_for_every_group(resnet):
    storage = fxstore.ForwardModuleStorage(resnet, (name for name in ["layer1", "layer2"]))
    storage(torch.rand(1, 3, 32, 32))
    assert storage["layer1"][0].shape == (1, 64, 8, 8) and storage["layer2"][0].shape == (1, 128, 4, 4)


def test_reading_an_unknown_group_names_the_groups(resnet):
    storage = fxstore.ForwardModuleStorage(resnet, {"style": ["layer1"]})
    with pytest.raises(fxstore.LayerNotFoundError, match=r"(?s)'nogroup' is not a group.*\['style'\].*Hint"):
        storage["nogroup"]


def test_load_model_leaves_every_random_generator_as_it_was():
    from fxstore.cli.models import load_model

    state = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    load_model("resnet18", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    if cuda:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
