"""Layer specifications: every accepted form, aliases, shared modules, and bad inputs."""

import pytest
import torch
import torchvision
from _reference import node_values
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

import fxstore


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 64, 64)


def keys(model, layers, **kw):
    return list(fxstore.FeatureExtractor(model, layers, **kw).feature_keys)


@pytest.mark.parametrize("train", [False, True])
def test_node_names_equal_torchvision(resnet, train):
    expected = get_graph_node_names(resnet)[0 if train else 1]
    assert fxstore.node_names(resnet, train=train) == expected
    assert not resnet.training and all(not m.training for m in resnet.modules())  # modes restored


def test_every_spec_form_selects_the_right_node(resnet, x):
    layers = ["layer1", resnet.layer4, "layer3.1.relu_1", "layer2.1.add", "flatten", "layer2.*.conv1"]
    ex = fxstore.FeatureExtractor(resnet, layers)
    out, feats = ex(x)
    assert list(feats) == ["layer1", "layer4", "layer3.1.relu_1", "layer2.1.add", "flatten", "layer2.0.conv1",
                           "layer2.1.conv1"]
    # module outputs are the values of the module's last node, here the block's final relu
    node_of = {"layer1": "layer1.1.relu_1", "layer4": "layer4.1.relu_1"}
    _, ref = node_values(resnet, x, [node_of.get(k, k) for k in feats])
    for key, value in feats.items():
        assert torch.equal(value, ref[node_of.get(key, key)]), key
    assert torch.equal(out, resnet(x))


def test_module_type_selects_every_instance(resnet):
    convs = [name for name, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert keys(resnet, nn.Conv2d) == convs
    assert len(convs) == 20


def test_predicate_with_name_or_node(resnet):
    assert keys(resnet, lambda name: name.endswith("downsample.1")) == [
        "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"]
    adds = keys(resnet, lambda name, node: node.op == "call_function" and node.target.__name__ == "add")
    assert adds == [n for n in fxstore.node_names(resnet) if n.endswith(".add")]


def test_dict_renames_outputs(resnet, x):
    ex = fxstore.FeatureExtractor(resnet, {"layer1": "early", resnet.layer4: "late"})
    _, feats = ex(x)
    assert list(feats) == ["early", "late"]
    assert ex.keys_for(resnet.layer4) == ("late",) and ex.keys_for("late") == ("late",)


def test_shared_module_yields_every_call(shared_relu):
    x = torch.randn(3, 4)
    ex = fxstore.FeatureExtractor(shared_relu, [shared_relu.act])
    _, feats = ex(x)
    assert list(feats) == ["act", "act_1", "act_2"]
    a = torch.relu(shared_relu.a(x))
    b = torch.relu(shared_relu.b(a))
    c = torch.relu((b + a) * 2)
    for got, ref in zip(feats.values(), [a, b, c]):
        assert torch.equal(got, ref)
    storage = fxstore.ForwardModuleStorage(shared_relu, ["act"])
    hooks = fxstore.HookForwardModuleStorage(shared_relu, ["act"])
    storage([x, x])
    hooks([x, x])
    assert len(storage["act"]) == 6
    assert all(torch.equal(a, b) for a, b in zip(storage["act"], hooks["act"], strict=True))


def test_a_dot_in_a_name_is_a_dot(resnet):
    # "layer1.0" must not match "layer1x0"-like names the way an unescaped regex would
    assert keys(resnet, ["layer1.0"]) == ["layer1.0"]
    with pytest.raises(fxstore.LayerNotFoundError, match="'layer1.0.conv9'"):
        keys(resnet, ["layer1.0.conv9"])
    with pytest.raises(fxstore.LayerNotFoundError):
        keys(resnet, ["layer1?0"])


def test_glob_brackets(resnet):
    assert keys(resnet, ["layer[34].0.conv1"]) == ["layer3.0.conv1", "layer4.0.conv1"]


# -- bad inputs ------------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match=r"(?s)'layer1.0.relu_9'.*Did you mean.*'layer1.0.relu_1'") as e:
        keys(resnet, ["layer1.0.relu_9"])
    assert "fxstore.node_names(model)" in str(e.value)
    assert isinstance(e.value, KeyError)


def test_pattern_matching_nothing(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match=r"(?s)pattern 'layer9\*' matches no node.*Hint"):
        keys(resnet, ["layer9*"])


def test_module_not_in_model(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match=r"(?s)module Conv2d\(.*is not part of ResNet.*Hint"):
        keys(resnet, [nn.Conv2d(3, 3, 1)])


def test_type_with_no_instance(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match="no LSTM module is called by ResNet"):
        keys(resnet, nn.LSTM)


def test_predicate_selecting_nothing(resnet):
    with pytest.raises(fxstore.LayerNotFoundError, match="predicate .* selected no node"):
        keys(resnet, lambda name: False)


@pytest.mark.parametrize("bad", [3, 2.5, [None], {"layer1": 3}, [int]])
def test_invalid_spec_types(resnet, bad):
    with pytest.raises(fxstore.InvalidLayerError, match="Hint"):
        keys(resnet, bad)


def test_two_nodes_under_one_key(resnet):
    with pytest.raises(fxstore.ConfigError, match="key 'x1'"):
        keys(resnet, {"layer1": "x1", "layer2": "x1"})


def test_nothing_to_return(resnet):
    with pytest.raises(fxstore.ConfigError, match="nothing to return"):
        fxstore.FeatureExtractor(resnet, [], keep_output=False)


def test_module_not_called_in_this_mode():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    with pytest.raises(fxstore.LayerNotFoundError, match="'aux1' is part of GoogLeNet but is not called in eval mode"):
        keys(model, ["aux1"])


def test_bad_options(resnet):
    with pytest.raises(fxstore.ConfigError, match="dtype='float99'"):
        fxstore.FeatureExtractor(resnet, ["layer1"], dtype="float99")
    with pytest.raises(fxstore.ConfigError, match="device='gpu9'"):
        fxstore.FeatureExtractor(resnet, ["layer1"], device="gpu9")
    with pytest.raises(fxstore.InvalidLayerError, match="model must be a torch.nn.Module"):
        fxstore.FeatureExtractor(lambda x: x, ["layer1"])


def test_storage_lookup_errors(resnet):
    storage = fxstore.ForwardModuleStorage(resnet, ["layer1"])
    with pytest.raises(fxstore.LayerNotFoundError, match="'layer2' is not stored by this storage"):
        storage["layer2"]
    with pytest.raises(fxstore.LayerNotFoundError, match="group 'style' does not exist"):
        storage(torch.rand(1, 3, 32, 32), "style")
