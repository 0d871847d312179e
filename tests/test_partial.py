"""Partial tracing: untraceable modules stay Python, their traceable children are rewritten."""

import warnings

import pytest
import torch
import torchvision
from _hooks import hooked_grads, hooked_outputs
from torch import nn
from torch.utils._pytree import tree_leaves

import fxstore
from fxstore import FeatureExtractor, TraceError, trace_report


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, y: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        out = self.fc(y.mean((2, 3)))
        return out if scale is None else out * scale


class Loopy(nn.Module):
    """Data-dependent control flow at the top, traceable children; ``block`` runs twice."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = Head()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for _ in range(2 if bool(y.sum() > -1) else 1):
            y = y + self.block(y.mean((2, 3)))[:, :, None, None]
        return self.head(y, self.scale) if self.scale is not None else self.head(y)


def same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def test_untraceable_top_level_falls_back_to_partial_with_reasons():
    report = trace_report(Loopy(), example_inputs=torch.rand(1, 3, 8, 8))
    assert report.frontend == "partial"
    assert set(report.reasons) == {"fx", "export"}
    assert "" in report.python_modules and "stem" not in report.python_modules
    assert {"stem.0", "stem.1", "block.0", "head.fc"} <= set(report.names)


def test_output_is_bit_equal_and_features_equal_hooks_in_call_order():
    model = Loopy().eval()
    x = torch.rand(2, 3, 8, 8)
    ex = FeatureExtractor(model, ["stem", "block", "head.fc"], frontend="partial")
    out, feats = ex(x)
    ref_out, ref = hooked_outputs(model, ["stem", "block", "head.fc"], x)
    assert torch.equal(out, ref_out)
    assert list(feats) == ["stem", "block", "block@1", "head.fc"]
    assert torch.equal(feats["stem"], ref["stem"][0])
    assert torch.equal(feats["block"], ref["block"][0]) and torch.equal(feats["block@1"], ref["block"][1])
    assert torch.equal(feats["head.fc"], ref["head.fc"][0])


def test_in_place_op_inside_a_traced_part_does_not_change_a_stored_value():
    model = Loopy().eval()
    x = torch.rand(1, 3, 8, 8)
    _, feats = FeatureExtractor(model, ["stem.0"], frontend="partial")(x)
    assert torch.equal(feats["stem.0"], model.stem[0](x))  # the ReLU(inplace=True) after it ran


def test_gradients_of_parts_and_python_modules_equal_autograd():
    model = Loopy()
    x = torch.rand(2, 3, 8, 8)
    ex = FeatureExtractor(model, grads=["stem", "block", "head"], frontend="partial")
    out, feats = ex(x)
    out.pow(2).sum().backward()
    grads = ex.gradients(feats)
    ref = hooked_grads(model, ["stem", "block", "head"], lambda o: o.pow(2).sum(), x)
    assert set(grads) == {"stem", "block", "block@1", "head"}
    assert torch.equal(grads["stem"], ref["stem"][0])
    assert torch.equal(grads["block"], ref["block"][0]) and torch.equal(grads["block@1"], ref["block"][1])
    assert torch.equal(grads["head"], ref["head"][0])


def test_user_model_is_not_modified():
    model = Loopy()
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    ex = FeatureExtractor(model, ["stem.0", "block"], grads=["head"], frontend="partial")
    ex(torch.rand(1, 3, 8, 8))
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        assert "forward" not in after[name]
    assert ex.state_dict().keys() == model.state_dict().keys()


def test_unknown_layer_names_the_layer_with_suggestions():
    with pytest.raises(fxstore.LayerNotFoundError, match=r"'stem.9' matches no node.*Did you mean"):
        FeatureExtractor(Loopy(), ["stem.9"], frontend="partial")


def test_self_check_refuses_a_part_that_ran_as_plain_python():
    ex = FeatureExtractor(Loopy(scale=2.0), ["head.fc", "head"], frontend="partial")
    with pytest.warns(UserWarning, match="'head' was called"), \
            pytest.raises(TraceError, match="feature 'head.fc' was not produced"):
        ex(torch.rand(1, 3, 8, 8))


def test_call_with_non_default_argument_runs_python_and_warns():
    model = Loopy(scale=2.0)
    ex = FeatureExtractor(model, ["head.fc", "head"], frontend="partial", verify=False)
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="'head' was called with a non-default value"):
        out, feats = ex(x)
    assert "head.fc" not in feats  # head was traced with scale=None; this call ran as plain Python
    assert torch.equal(out, model(x))


def test_forced_partial_on_a_traceable_model_is_one_part():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    out, feats = FeatureExtractor(model, ["layer1", "layer2.0.add"], frontend="partial")(x)
    ref_out, ref = FeatureExtractor(model, ["layer1", "layer2.0.add"], frontend="fx")(x)
    assert torch.equal(out, ref_out) and same(feats, ref)


def test_storage_collects_every_run_of_a_part():
    model = Loopy()
    storage = fxstore.ForwardModuleStorage(model, ["block"], frontend="partial")
    storage(torch.rand(1, 3, 8, 8))
    assert len(storage["block"]) == 2


@pytest.mark.compile
def test_partial_model_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = Loopy().eval()
    x = torch.rand(2, 3, 8, 8)
    ex = FeatureExtractor(model, ["stem", "block"], frontend="partial")
    eager = ex(x)
    compiled = torch.compile(ex, backend="aot_eager")(x)
    assert same(eager, compiled)
    explanation = torch._dynamo.explain(ex)(x)
    assert explanation.graph_break_count >= 1  # the data-dependent loop breaks the graph


# -- torchvision detection and optical flow ---------------------------------------------------------


def detection_model(name: str) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=96, max_size=128).eval()


def test_detection_model_picks_partial_after_fx_and_export_fail():
    model = detection_model("fasterrcnn_mobilenet_v3_large_320_fpn")
    x = [torch.rand(3, 96, 128)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = FeatureExtractor(model, ["backbone.body"])
        out, feats = ex(x)
    report = ex.trace_report
    assert report.frontend == "partial"
    assert "Proxy object cannot be iterated" in report.reasons["fx"]
    assert report.reasons["export"].startswith("torch.export could not export FasterRCNN")
    assert same(out, model(x))


def test_detection_backbone_fpn_and_head_features_and_gradients_equal_references():
    torch.manual_seed(0)
    model = detection_model("fasterrcnn_mobilenet_v3_large_320_fpn")
    x = [torch.rand(3, 96, 128)]
    layers = ["backbone.body.3", "backbone", "rpn.head.conv", "roi_heads.box_head", "roi_heads.box_predictor.cls_score"]
    ex = FeatureExtractor(model, layers, frontend="partial")
    with torch.no_grad():
        out, feats = ex(x)
    ref_out, ref = hooked_outputs(model, layers, x)
    assert same(out, ref_out)
    assert torch.equal(feats["backbone.body.3"], ref["backbone.body.3"][0])
    assert torch.equal(tree_leaves(feats["backbone"])[0], ref["backbone"][0])  # the FPN levels (a dict)
    assert [torch.equal(feats[k], r) for k, r in zip(["rpn.head.conv", "rpn.head.conv@1"], ref["rpn.head.conv"])] \
        == [True, True]
    assert torch.equal(feats["roi_heads.box_head"], ref["roi_heads.box_head"][0])
    # gradients of the box head's output, from the scores of the first image
    model.eval()
    gx = FeatureExtractor(model, grads=["roi_heads.box_head"], frontend="partial")
    out, feats = gx(x)
    out[0]["scores"].sum().backward()
    ref_grads = hooked_grads(model, ["roi_heads.box_head"], lambda o: o[0]["scores"].sum(), x)
    assert torch.equal(gx.gradients(feats)["roi_heads.box_head"], ref_grads["roi_heads.box_head"][0])


def test_raft_partial_features_equal_hooks():
    torch.manual_seed(0)
    model = torchvision.models.get_model("raft_small", weights=None).eval()
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    names = ["feature_encoder", "context_encoder", "update_block.motion_encoder"]
    ex = FeatureExtractor(model, names, frontend="partial")
    with torch.no_grad():
        out, feats = ex(a, b, num_flow_updates=2)
    ref_out, ref = hooked_outputs(model, names, a, b, num_flow_updates=2)
    assert same(out, ref_out)
    assert torch.equal(feats["feature_encoder"], ref["feature_encoder"][0])
    motion = ex.by_label(feats)["update_block.motion_encoder"]
    assert len(motion) == 2 and all(torch.equal(m, r) for m, r in zip(motion, ref["update_block.motion_encoder"]))
