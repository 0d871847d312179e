"""torch.compile: zero graph breaks, same forward features, same gradients."""

import pytest
import torch
import torch._dynamo
import torchvision
from _reference import node_grads, node_values, scalar_loss
from torch import nn

import fxstore

pytestmark = [pytest.mark.compile, pytest.mark.xdist_group("compile")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


LAYERS = ["layer1", "layer2.0.add", "layer3.1.relu_1", "flatten"]
GRADS = ["layer1.0.bn1", "layer2", "layer4.1.relu_1"]


def test_zero_graph_breaks_with_features(resnet):
    ex = fxstore.FeatureExtractor(resnet, LAYERS)
    explanation = torch._dynamo.explain(ex)(torch.rand(2, 3, 32, 32))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_one_graph_with_features_and_taps_through_ex_compile(resnet):
    graphs = []
    ex = fxstore.FeatureExtractor(resnet, LAYERS, grads=GRADS)
    ex.compile(backend=lambda gm, _inputs: graphs.append(gm) or gm.forward)  # fullgraph=True by default
    out, _ = ex(torch.rand(2, 3, 32, 32))
    assert len(graphs) == 1


def test_compiled_forward_equals_eager_and_reference(resnet):
    x = torch.rand(2, 3, 32, 32)
    ex = fxstore.FeatureExtractor(resnet, LAYERS)
    compiled = torch.compile(ex, backend="aot_eager", fullgraph=True)
    out, feats = compiled(x)
    assert torch.equal(out, resnet(x))
    names = {"layer1": "layer1.1.relu_1"}
    _, ref = node_values(resnet, x, [names.get(k, k) for k in LAYERS])
    for key in LAYERS:
        assert torch.equal(feats[key], ref[names.get(key, key)]), key


def test_compiled_gradients_equal_autograd_grad(resnet):
    x = torch.rand(2, 3, 32, 32)
    ex = fxstore.FeatureExtractor(resnet, [], grads=GRADS)
    ex.compile(backend="aot_eager")  # probes made outside the graph: any shape, one graph
    compiled = ex
    out, feats = compiled(x)
    scalar_loss(out).backward()
    grads = ex.gradients(feats)
    names = {"layer2": "layer2.1.relu_1"}
    ref = node_grads(resnet, x, [names.get(k, k) for k in GRADS], scalar_loss)
    for key in GRADS:
        torch.testing.assert_close(grads[key], ref[names.get(key, key)], rtol=1e-5, atol=1e-7)
    resnet.zero_grad(set_to_none=True)


def test_compiled_taps_survive_a_new_batch_size():
    torch.manual_seed(0)
    model = TinyCNN()
    ex = fxstore.FeatureExtractor(model, [], grads=["conv2"])
    ex.compile(backend="aot_eager")  # probes made outside the graph: any shape, one graph
    compiled = ex
    for batch in (2, 4, 3):  # a ragged last batch included
        x = torch.rand(batch, 3, 8, 8)
        out, feats = compiled(x)
        scalar_loss(out).backward()
        ref = node_grads(model, x, ["conv2"], scalar_loss)["conv2"]
        torch.testing.assert_close(ex.gradients(feats)["conv2"], ref, rtol=1e-5, atol=1e-7)
        model.zero_grad(set_to_none=True)


def test_taps_leave_parameter_gradients_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    x = torch.rand(2, 3, 32, 32)
    ref_model = torchvision.models.resnet18(weights=None).train()
    ref_model.load_state_dict(model.state_dict())
    scalar_loss(ref_model(x)).backward()
    ex = fxstore.FeatureExtractor(model, [], grads=GRADS)
    ex.compile(backend="aot_eager")
    out, _ = ex(x)
    scalar_loss(out).backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h)) + h
        return self.head(h.mean(dim=(2, 3)))


def test_inductor_forward_and_gradients():
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.rand(2, 3, 16, 16)
    ex = fxstore.FeatureExtractor(model, ["conv1", "act_1", "add"], grads=["conv2", "add"],
                                  dtype=torch.bfloat16)
    ex.compile()  # inductor, fullgraph
    out, feats = ex(x)
    scalar_loss(out).backward()
    # references: the plain model, node values cloned when produced, torch.autograd.grad
    ref_out, ref_feats = node_values(model, x, ["conv1", "act_1", "add"])
    ref_grads = node_grads(model, x, ["conv2", "add"], scalar_loss)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for key in ("conv1", "act_1", "add"):
        assert feats[key].dtype == torch.bfloat16
        torch.testing.assert_close(feats[key].float(), ref_feats[key], rtol=1e-2, atol=1e-2)  # one bf16 ulp
    grads = ex.gradients(feats)
    assert sorted(grads) == ["add", "conv2"]
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-6)
    assert (feats["conv1"].float() < 0).any()  # captured before the in-place ReLU, also when compiled
    model.zero_grad(set_to_none=True)


def test_storages_work_compiled_extractors(resnet):
    storage = fxstore.ForwardModuleStorage(resnet, ["layer2"], detach=True)
    storage._extractors[None] = torch.compile(storage._extractors[None], backend="aot_eager", fullgraph=True)
    x = torch.rand(1, 3, 32, 32)
    y = torch.rand(1, 3, 32, 32)
    storage([x, y])
    assert len(storage["layer2"]) == 2
    for stored, image in zip(storage["layer2"], [x, y], strict=True):
        _, ref = node_values(resnet, image, ["layer2.1.relu_1"])  # the output of module layer2
        assert torch.equal(stored, ref["layer2.1.relu_1"])


def test_hooks_registered_after_compile_capture_nothing():
    """The failure mode fxstore avoids: a compiled model never calls a late hook."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    compiled = torch.compile(net, backend="eager")
    x = torch.rand(1, 3, 8, 8)
    compiled(x)
    hooks = fxstore.HookForwardModuleStorage(net, [net[0]])
    hooks(x)  # eager call: the hook fires
    assert len(hooks[net[0]]) == 1
    stored = []
    handle = net[0].register_forward_hook(lambda _m, _i, o: stored.append(o))
    compiled(x)
    handle.remove()
    hooks.remove()
    assert stored == []
