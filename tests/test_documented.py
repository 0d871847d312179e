"""Behaviour the README and docstrings promise that no other test pinned down.

Errors and their builtin base classes, ``autowrap_modules``, ``eval()`` after ``train()``,
``BackwardModuleStorage(device=, dtype=)``, ``storage.state``, the top-level ``trace_report``,
in-place detection of ``operator.i*``, ``setitem`` and ``out=``; dataset ``num_workers``,
``collate_fn``, default dict keys and resumes refused on another batch size or other data;
the CLI's ``timm:NAME`` and ``--device``. Each compares with an independent reference.
"""

from __future__ import annotations

import copy
import types
from operator import iadd, imul, setitem

import numpy as np
import pytest
import torch
import torchvision
from _reference import hook_outputs, node_grads, scalar_loss
from dataset_helpers import LAYERS, FailsAt, Images, shard_bytes, toy_model
from torch import nn
from torch.utils.data import DataLoader

import fxstore
from fxstore.dataset import extract_dataset
from fxstore.dataset.reader import load_features
from fxstore.errors import OutputError


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "builtin"), [
    (fxstore.LayerNotFoundError, KeyError), (fxstore.InvalidLayerError, TypeError),
    (fxstore.ConfigError, ValueError), (fxstore.GradientNotReadyError, LookupError),
    (fxstore.TraceError, RuntimeError), (fxstore.OutputError, fxstore.FxStoreError),
])
def test_every_error_is_an_fxstore_error_and_its_builtin(error, builtin):
    assert issubclass(error, fxstore.FxStoreError) and issubclass(error, builtin)


def test_builtin_except_clauses_catch_fxstore_errors(resnet):
    with pytest.raises(KeyError, match="layer 'layer9' matches no node"):
        fxstore.FeatureExtractor(resnet, ["layer9"])
    with pytest.raises(TypeError):
        fxstore.FeatureExtractor(resnet, [3.5])
    with pytest.raises(ValueError, match="frontend='onnx' is not a frontend"):
        fxstore.FeatureExtractor(resnet, ["layer1"], frontend="onnx")


def test_gradients_read_before_backward_raise_gradient_not_ready(resnet):
    ex = fxstore.FeatureExtractor(resnet, grads=["layer2"])
    out, feats = ex(torch.rand(1, 3, 32, 32))
    with pytest.raises(fxstore.GradientNotReadyError, match=r"(?s)no gradient for 'layer2' yet.*Hint: call backward"):
        ex.gradients(feats)
    with pytest.raises(LookupError):
        ex.gradients(feats)
    storage = fxstore.BackwardModuleStorage(resnet, ["layer2"])
    storage(torch.rand(1, 3, 32, 32))
    with pytest.raises(fxstore.GradientNotReadyError, match="no gradient yet"):
        storage["layer2"][0]


# -- tracing controls and modes --------------------------------------------------------------

helpers = types.ModuleType("helpers")  # a Python module whose functions fx must not trace into
exec(
    "def gate(x):\n"
    "    return x if x.sum() > 0 else -x  # control flow on a tensor value\n",
    helpers.__dict__,
)


class UsesHelpers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return helpers.gate(self.lin(x)) * 2


def test_autowrap_modules_keep_a_modules_functions_as_single_nodes():
    torch.manual_seed(0)
    model, x = UsesHelpers(), torch.randn(2, 4)
    with pytest.raises(fxstore.TraceError):
        fxstore.FeatureExtractor(model, ["lin"], frontend="fx")
    ex = fxstore.FeatureExtractor(model, ["gate"], autowrap_modules=[helpers], frontend="fx")
    out, feats = ex(x)
    h = model.lin(x)
    expected = h if h.sum() > 0 else -h
    assert torch.equal(feats["gate"], expected) and torch.equal(out, model(x))


def test_eval_after_train_runs_the_eval_graph_again():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 32, 32)
    ex = fxstore.FeatureExtractor(model, ["layer1", "fc"])
    ex.train()
    with torch.no_grad():
        ex(x)  # a train step changes the batch-norm statistics, like a real one
    ex.eval()
    assert not ex.training and not any(m.training for m in model.modules())
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        out, feats = ex(x)
    ref = hook_outputs(twin, x, {"layer1": twin.layer1})
    assert torch.equal(out, twin(x)) and torch.equal(feats["fc"], out)
    assert torch.equal(feats["layer1"], ref["layer1"][0])


def test_backward_storage_device_and_dtype_convert_read_gradients(resnet):
    x = torch.rand(2, 3, 32, 32)
    storage = fxstore.BackwardModuleStorage(resnet, ["layer3"], device="cpu", dtype=torch.float64)
    scalar_loss(storage(x)).backward()
    (got,) = storage["layer3"]
    ref = node_grads(resnet, x, ["layer3.1.relu_1"], scalar_loss)["layer3.1.relu_1"]
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    torch.testing.assert_close(got, ref.double(), rtol=1e-5, atol=1e-8)
    resnet.zero_grad(set_to_none=True)


def test_state_holds_every_stored_value_by_label_and_group(resnet):
    storage = fxstore.ForwardModuleStorage(resnet, {"a": ["layer1"], "b": ["layer1", resnet.layer2]}, detach=True)
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    storage(x, "a")
    storage(y, "b")
    state = storage.state
    assert set(state) == {"a", "b"} and set(state["b"]) == {"layer1", "layer2"}
    ref_x = hook_outputs(resnet, x, {"l1": resnet.layer1})
    ref_y = hook_outputs(resnet, y, {"l1": resnet.layer1, "l2": resnet.layer2})
    assert torch.equal(state["a"]["layer1"], ref_x["l1"][0])
    assert torch.equal(state["b"]["layer1"], ref_y["l1"][0]) and torch.equal(state["b"]["layer2"], ref_y["l2"][0])
    plain = fxstore.ForwardModuleStorage(resnet, ["layer1"], detach=True)
    plain([x, y])
    assert list(plain.state) == ["layer1"] and len(plain.state["layer1"]) == 2
    assert torch.equal(plain.state["layer1"][1], ref_y["l1"][0])


def test_top_level_trace_report_names_the_frontend_and_every_node(resnet):
    report = fxstore.trace_report(resnet)
    assert report.frontend == "fx" and report.reasons == {}
    assert list(report.names) == fxstore.node_names(resnet)
    assert "layer1" in report.modules and "layer2.1.add" in report.names


# -- in-place detection beyond inplace=True modules -----------------------------------------


class InPlaceForms(nn.Module):
    """Explicit ``operator.i*`` / ``operator.setitem`` calls (autowrapped, so they become graph nodes;
    torch.fx itself records ``a += 1`` as an out-of-place ``add``) and an ``out=`` argument."""

    def forward(self, x):
        a = x * 2
        iadd(a, 1.0)  # operator.iadd
        b = x * 3
        setitem(b, 0, 0.0)  # operator.setitem
        c = x * 4
        torch.add(x, 1.0, out=c)  # out=
        d = x * 5
        imul(d.view(-1), 2.0)  # operator.imul through a view
        return a + b + c + d


@pytest.mark.parametrize(("node", "factor"), [("mul", 2), ("mul_1", 3), ("mul_2", 4), ("mul_3", 5)])
def test_values_written_later_by_operator_i_setitem_or_out_are_stored_unchanged(node, factor):
    x = torch.randn(3, 4)
    ex = fxstore.FeatureExtractor(InPlaceForms(), [node], frontend="fx", autowrap_functions=[iadd, imul, setitem])
    code = ex.code
    assert all(op in code for op in ("iadd", "imul", "setitem", "out = "))  # the graph holds those nodes
    out, feats = ex(x)
    assert torch.equal(feats[node], x * factor)
    assert torch.equal(out, InPlaceForms()(x))


# -- dataset ----------------------------------------------------------------------------------


def _reference(model, data, batch_size):
    ex = fxstore.FeatureExtractor(model, LAYERS, keep_output=False).eval()
    with torch.no_grad():
        parts = [ex(x)[1] for x, _ in DataLoader(data, batch_size=batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in LAYERS}


def _loaded(out):
    return {k: torch.from_numpy(np.array(v)) for k, v in load_features(out).items()}


def test_num_workers_give_the_same_bytes(tmp_path):
    options = {"batch_size": 4, "shard_size": 8, "progress": False}
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path / "w0", num_workers=0, **options)
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path / "w2", num_workers=2, **options)
    assert shard_bytes(tmp_path / "w0") == shard_bytes(tmp_path / "w2")
    expected = _reference(toy_model(), Images(12), 4)
    assert all(torch.equal(_loaded(tmp_path / "w2")[k], expected[k]) for k in LAYERS)


def test_collate_fn_shapes_the_batches(tmp_path):
    def collate(samples):  # a dict batch with the images flipped
        images = torch.stack([s[0] for s in samples]).flip(-1)
        return {"pixel_values": images, "labels": torch.tensor([s[1] for s in samples])}

    extract_dataset(toy_model(), LAYERS, Images(10), tmp_path, collate_fn=collate, batch_size=4, progress=False)
    flipped = [(x.flip(-1), y) for x, y in (Images(10)[i] for i in range(10))]
    got, expected = _loaded(tmp_path), _reference(toy_model(), flipped, 4)
    assert all(torch.equal(got[k], expected[k]) for k in LAYERS)
    assert got["target"].tolist() == [i % 7 for i in range(10)]


@pytest.mark.parametrize(("input_key", "target_key"), [("input", "target"), ("image", "label"),
                                                       ("pixel_values", "labels"), ("x", "y")])
def test_default_dict_keys_find_input_and_target(tmp_path, input_key, target_key):
    data = Images(6)
    batches = ({input_key: torch.stack([data[i][0] for i in range(j, j + 3)]),
                target_key: torch.tensor([data[i][1] for i in range(j, j + 3)])} for j in (0, 3))
    extract_dataset(toy_model(), LAYERS, batches, tmp_path, progress=False)
    got, expected = _loaded(tmp_path), _reference(toy_model(), data, 3)
    assert all(torch.equal(got[k], expected[k]) for k in LAYERS)
    assert got["target"].tolist() == [i % 7 for i in range(6)]


@pytest.mark.parametrize(("change", "match"), [
    ({"batch_size": 4}, "batch size: 2 before, 4 now"),
    ({"data": Images(8, size=12), "data_name": "other-images"}, "data"),
])
def test_resume_with_another_batch_size_or_other_data_is_refused(tmp_path, change, match):
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), ["fc"], FailsAt(8, bad=6), tmp_path, shard_size=4, batch_size=2,
                        data_name="images", progress=False)
    run = {"data": Images(8), "batch_size": 2, "data_name": "images", **change}
    with pytest.raises(OutputError, match=f"refusing to resume into .*{match}"):
        extract_dataset(toy_model(), ["fc"], run.pop("data"), tmp_path, shard_size=4, progress=False, **run)


# -- command line -----------------------------------------------------------------------------


def test_cli_timm_model_and_device(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from fxstore.cli import main
    from fxstore.cli.models import load_model
    from fxstore.cli.sources import open_source

    args = ["extract", "timm:resnet10t", "--layers", "layer1", "--pool", "avg", "--data", "fake:4",
            "--image-size", "32", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    model = load_model("timm:resnet10t")
    assert type(model) is type(timm.create_model("resnet10t", pretrained=False))
    batches = [x for x, _ in DataLoader(open_source("fake:4", image_size=32), batch_size=2)]
    with torch.no_grad():
        ref = torch.cat([hook_outputs(model, x, {"l1": model.layer1})["l1"][0].mean((2, 3)) for x in batches])
    torch.testing.assert_close(_loaded(tmp_path)["layer1"], ref, rtol=1e-5, atol=1e-6)
    if not torch.cuda.is_available():  # --device is passed through: no CUDA here is a one-line error
        args[args.index("cpu")] = "cuda"
        args[args.index(str(tmp_path))] = str(tmp_path / "cuda")
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cuda" in err.lower() and "Traceback" not in err
