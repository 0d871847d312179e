"""FeatureExtractor behaviour: in-place safety, truncation, storage policy, nn.Module duties."""

import copy
import io
import pickle

import pytest
import torch
import torchvision
from _reference import hook_outputs, node_values
from torch import nn

import fxstore


@pytest.fixture(scope="module")
def vgg():
    return torchvision.models.vgg11(weights=None).eval()


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


def test_value_before_an_inplace_relu_is_kept(vgg):
    x = torch.rand(1, 3, 32, 32)
    conv = vgg.features[0]  # followed by ReLU(inplace=True)
    _, feats = fxstore.FeatureExtractor(vgg, [conv])(x)
    assert torch.equal(feats["features.0"], conv(x))
    assert (feats["features.0"] < 0).any()  # not rectified
    # the classic hook recipe without a copy gets it wrong: it stores the rectified tensor
    stored = []
    handle = conv.register_forward_hook(lambda m, i, o: stored.append(o))
    vgg(x)
    handle.remove()
    assert not (stored[0] < 0).any()
    # fxstore's hook backend copies each output when it is produced
    hooks = fxstore.HookForwardModuleStorage(vgg, [conv])
    hooks(x)
    hooks.remove()
    assert torch.equal(hooks[conv][0], feats["features.0"])


def test_clone_only_where_an_inplace_consumer_exists(vgg):
    code = fxstore.FeatureExtractor(vgg, ["features.0", "features.1", "features.2"]).code
    assert code.count(".clone()") == 1  # features.0 is rewritten by features.1 (inplace); the relu output is not


def test_functional_inplace_ops_are_detected():
    class Net(nn.Module):
        def forward(self, x):
            y = x * 2
            z = y.view(-1)  # alias of y
            z.relu_()  # rewrites y through the view
            return y + 1

    x = torch.randn(3, 4)
    _, feats = fxstore.FeatureExtractor(Net(), ["mul"])(x)
    assert torch.equal(feats["mul"], x * 2)


def test_unused_inplace_op_is_not_pruned():
    class Net(nn.Module):
        def forward(self, x):
            y = x * 2
            y.relu_()  # result unused, effect read below
            return y + 1

    x = torch.randn(3, 4)
    out, feats = fxstore.FeatureExtractor(Net(), ["mul"])(x)
    assert torch.equal(out, torch.relu(x * 2) + 1)
    assert torch.equal(feats["mul"], x * 2)


def test_truncated_graph_runs_only_what_the_features_need(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer1"], keep_output=False)
    code = ex.code
    assert "self.layer2" not in code and "self.fc" not in code and "self.layer1" in code
    x = torch.rand(2, 3, 64, 64)
    out, feats = ex(x)
    assert out is None
    assert torch.equal(feats["layer1"], hook_outputs(resnet, x, {"l1": resnet.layer1})["l1"][0])


def test_storage_policy_detach_dtype_device_transform(resnet):
    x = torch.rand(2, 3, 64, 64)
    ex = fxstore.FeatureExtractor(resnet, ["layer2"], detach=True, dtype=torch.bfloat16, device="cpu",
                                  transform=lambda t: t.mean(dim=(2, 3)))
    out, feats = ex(x)
    ref = hook_outputs(resnet, x, {"l2": resnet.layer2})["l2"][0]
    got = feats["layer2"]
    assert got.dtype == torch.bfloat16 and got.shape == (2, 128) and not got.requires_grad
    assert torch.equal(got, ref.mean(dim=(2, 3)).to(torch.bfloat16))
    assert torch.equal(out, resnet(x))


def test_features_keep_autograd_history_by_default(resnet):
    _, feats = fxstore.FeatureExtractor(resnet, ["layer2"])(torch.rand(1, 3, 32, 32))
    assert feats["layer2"].requires_grad


def test_state_dict_keys_equal_the_models():
    model = torchvision.models.vit_b_16(weights=None, image_size=32)  # top-level parameter + buffers
    ex = fxstore.FeatureExtractor(model, ["encoder.layers.encoder_layer_1"])
    assert list(ex.state_dict()) == list(model.state_dict())
    ex.load_state_dict(model.state_dict())


def test_model_is_never_modified(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    attrs = set(vars(resnet))
    modules = [(n, id(m), m.training) for n, m in resnet.named_modules()]
    ex = fxstore.FeatureExtractor(resnet, ["layer1", "layer4"], grads=["layer2"])
    ex(torch.rand(1, 3, 32, 32))
    assert set(vars(resnet)) == attrs
    assert [(n, id(m), m.training) for n, m in resnet.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in resnet.modules())


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda ex: pickle.loads(pickle.dumps(ex))])
def test_deepcopy_and_pickle(resnet, clone):
    x = torch.rand(1, 3, 32, 32)
    ex = fxstore.FeatureExtractor(resnet, ["layer1", "flatten"])
    twin = clone(ex)
    out, feats = ex(x)
    out2, feats2 = twin(x)
    assert torch.equal(out, out2) and feats.keys() == feats2.keys()
    assert all(torch.equal(feats[k], feats2[k]) for k in feats)
    assert twin.conv1.weight is not ex.conv1.weight


def test_torch_save_round_trip(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer1"])
    buffer = io.BytesIO()
    torch.save(ex, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(x)[1]["layer1"], ex(x)[1]["layer1"])


def test_to_moves_parameters_and_buffers():
    model = torchvision.models.resnet18(weights=None).eval()
    ex = fxstore.FeatureExtractor(model, ["layer1"]).to(torch.float64)
    out, feats = ex(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == feats["layer1"].dtype == torch.float64
    assert ex.bn1.running_mean.dtype == torch.float64


def test_train_and_eval_run_the_matching_graph():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    ex = fxstore.FeatureExtractor(model, ["inception4a", "dropout"])
    x = torch.rand(2, 3, 64, 64)
    out, _ = ex(x)
    assert torch.equal(out, model(x))
    ex.train()
    assert ex.training and model.inception4a.training
    torch.manual_seed(1)
    out, feats = ex(x)
    twin = copy.deepcopy(model).train()
    torch.manual_seed(1)
    ref = twin(x)
    assert type(out).__name__ == "GoogLeNetOutputs"  # train graph: aux outputs
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert list(feats) == ["inception4a", "dropout"]


def test_extractor_is_reentrant_and_pure(resnet):
    ex = fxstore.FeatureExtractor(resnet, ["layer3"])
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    fx_, fy = ex(x)[1]["layer3"], ex(y)[1]["layer3"]
    assert torch.equal(ex(x)[1]["layer3"], fx_) and not torch.equal(fx_, fy)


def test_node_values_reference_agrees_with_hooks(resnet):
    # sanity check of the test reference itself
    x = torch.rand(1, 3, 32, 32)
    _, ref = node_values(resnet, x, ["layer1.0.conv1"])
    assert torch.equal(ref["layer1.0.conv1"], hook_outputs(resnet, x, {"c": resnet.layer1[0].conv1})["c"][0])


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.stem(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module_and_leaves_no_trace():
    model = Untraceable()
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    with pytest.raises(fxstore.TraceError, match=r"(?s)module 'gate' \(Gate\).*leaf_modules=\[Gate\].*HookForwardModuleStorage"):
        fxstore.FeatureExtractor(model, ["stem"], frontend="fx")
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs


def test_auto_frontend_falls_back_for_untraceable_models():
    model = Untraceable()
    x = torch.randn(2, 4)
    out, feats = fxstore.FeatureExtractor(model, ["stem"])(x)
    assert torch.equal(out, model(x)) and torch.equal(feats["stem"], model.stem(x))


def test_leaf_modules_make_it_traceable():
    model = Untraceable()
    x = torch.randn(2, 4)
    ex = fxstore.FeatureExtractor(model, ["stem", "gate"], leaf_modules=[Gate])
    assert ex.trace_report.frontend == "fx"  # not a silent fallback to another frontend
    out, feats = ex(x)
    assert torch.equal(out, model(x)) and torch.equal(feats["gate"], model(x))
    assert torch.equal(feats["stem"], model.stem(x))


def scale(x, k):
    return x * k if k > 0 else x  # control flow on a Python value: autowrapped


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, flip: bool = False):
        h = scale(self.lin(x), 2)
        return -h if flip else h


def test_autowrap_functions_and_concrete_args():
    x = torch.randn(2, 4)
    ex = fxstore.FeatureExtractor(ScaledNet(), ["scale"], autowrap_functions=[scale], concrete_args={"flip": True})
    out, feats = ex(x, True)  # fx checks at run time that the concrete argument still holds
    assert torch.equal(feats["scale"], ex.lin(x) * 2) and torch.equal(out, -(ex.lin(x) * 2))
