"""Deployable extractors: ONNX files, AOTInductor packages and torch.export archives.

Every artifact is compared with an independent reference: forward hooks on the plain model
(cloned outputs), the plain model's own output, and ``output_hidden_states`` for GPT-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from _hooks import hooked_outputs
from torch import nn

import fxstore
from fxstore.capture import read_metadata
from fxstore.cli import main
from fxstore.dataset._reduce import global_avg_pool

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-5  # exported graphs run the same ATen kernels; ONNX Runtime its own (checked with ONNX_ATOL)
ONNX_ATOL = 1e-4


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (torch.from_numpy(v) for v in session.run(None, feeds))))


def hooked_pooled(model, names, x):
    output, seen = hooked_outputs(model, names, x)
    return output, {n: global_avg_pool(seen[n][0]) for n in names}


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


class InPlaceNet(nn.Module):
    """The selected linear output is overwritten in place by the ReLU after it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(y.mean((2, 3)))


class DataDependent(nn.Module):
    """A branch on a tensor's value: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y


# -- torch.export archives ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_archive(resnet18, tmp_path_factory):
    """resnet18's layer3 and layer4, pooled, as a torch.export archive (exported once for the module)."""
    path = tmp_path_factory.mktemp("deploy") / "r18.pt2"
    ex = fxstore.FeatureExtractor(resnet18, ["layer3", "layer4"], keep_output=False, transform=global_avg_pool)
    return path, ex.export(path, (torch.rand(2, 3, 64, 64),), format="exported")


def test_exported_pooled_layers_equal_hooks_at_two_batch_sizes(resnet18, pooled_archive):
    path, report = pooled_archive
    assert report.max_diff <= ATOL
    loaded = torch.export.load(path).module()
    for batch in (1, 5):
        x = torch.rand(batch, 3, 64, 64)
        got = loaded(x)
        _, want = hooked_pooled(resnet18, ["layer3", "layer4"], x)
        assert list(got) == ["layer3", "layer4"]
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0)


def test_exported_metadata_records_features_dynamic_axes_and_versions(pooled_archive):
    path, report = pooled_archive
    meta = read_metadata(path)
    assert meta == report.metadata
    assert meta["features"] == {"layer3": {"shape": ["batch", 256], "dtype": "float32"},
                                "layer4": {"shape": ["batch", 512], "dtype": "float32"}}
    assert meta["dynamic"]["batch"][0] == 1 and meta["inputs"][0]["shape"][:2] == ["batch", 3]
    assert meta["model"]["fingerprint"].startswith("sha256:")
    assert meta["fxstore"] == fxstore.__version__ and meta["torch"] == torch.__version__
    extra = {"fxstore.json": ""}
    torch.export.load(path, extra_files=extra)  # plain torch reads it too
    assert json.loads(extra["fxstore.json"]) == meta


def test_call_outside_the_recorded_batch_range_is_refused(tmp_path):
    ex = fxstore.FeatureExtractor(SmallCNN().eval(), ["conv2"], keep_output=False)
    ex.export(tmp_path / "s.pt2", (torch.rand(2, 3, 16, 16),), format="exported")
    hi = read_metadata(tmp_path / "s.pt2")["dynamic"]["batch"][1]
    with pytest.raises(Exception, match="<= " + str(hi)):
        torch.export.load(tmp_path / "s.pt2").module()(torch.rand(hi + 1, 3, 16, 16))


def test_truncated_artifact_holds_only_the_prefix(resnet18, tmp_path):
    ex = fxstore.FeatureExtractor(resnet18, ["layer2"], keep_output=False)
    ex.export(tmp_path / "t.pt2", (torch.rand(2, 3, 64, 64),), format="exported")
    graph = torch.export.load(tmp_path / "t.pt2").graph
    convs = [n for n in graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 1 + 4 + 5  # stem, layer1 (2 blocks x 2), layer2 (2 x 2 + downsample)
    assert not any("linear" in str(n.target) or "addmm" in str(n.target) for n in graph.nodes)


def test_in_place_protection_is_part_of_the_artifact(tmp_path):
    model = InPlaceNet().eval()
    ex = fxstore.FeatureExtractor(model, ["fc"], keep_output=True)
    ex.export(tmp_path / "i.pt2", (torch.randn(3, 6),), format="exported")
    x = torch.randn(4, 6)
    output, features = torch.export.load(tmp_path / "i.pt2").module()(x)
    want_out, seen = hooked_outputs(model, ["fc"], x)
    assert (seen["fc"][0] < 0).any()  # the ReLU would have overwritten these
    torch.testing.assert_close(features["fc"], seen["fc"][0], atol=0, rtol=0)
    torch.testing.assert_close(output, want_out, atol=ATOL, rtol=0)


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_tiny_gpt2_exported_equals_hidden_states(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    ex = fxstore.FeatureExtractor(model, ["transformer.h.0"], keep_output=False, example_inputs=(ids,))
    report = ex.export(tmp_path / "g.pt2", (ids,), format="exported")
    assert report.max_diff <= ATOL
    loaded = torch.export.load(tmp_path / "g.pt2").module()
    dynamic = report.metadata["dynamic"]
    # The export frontend specialises its graph to the example shapes today: the recorded ranges say which apply.
    others = [torch.randint(0, 50, (3, 8))] if "batch" in dynamic else []
    for x in [ids, *others]:
        with torch.no_grad():
            want = model(x, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(loaded(x)["transformer.h.0"], want, atol=ATOL, rtol=0)
    if "batch" not in dynamic:
        assert report.metadata["features"]["transformer.h.0"]["shape"] == [2, 8, 16]
        with pytest.raises(Exception, match=r"size\(\)\[0\] == 2"):
            loaded(torch.randint(0, 50, (3, 8)))


# -- ONNX --------------------------------------------------------------------------------


def test_onnx_outputs_are_named_after_features_and_match_in_onnxruntime(resnet18, tmp_path):
    ex = fxstore.FeatureExtractor(resnet18, ["layer3", "layer4"], keep_output=True, transform=global_avg_pool)
    report = ex.export(tmp_path / "r18.onnx", (torch.rand(2, 3, 64, 64),), format="onnx")
    assert report.max_diff <= ONNX_ATOL
    for batch in (1, 4):
        x = torch.rand(batch, 3, 64, 64)
        got = run_onnx(tmp_path / "r18.onnx", x)
        output, want = hooked_pooled(resnet18, ["layer3", "layer4"], x)
        assert list(got) == ["output", "layer3", "layer4"]
        torch.testing.assert_close(got["output"], output, atol=ONNX_ATOL, rtol=0)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=ONNX_ATOL, rtol=0)
    assert read_metadata(tmp_path / "r18.onnx")["output"] == {"output": {"shape": ["batch", 1000], "dtype": "float32"}}


def test_onnx_dtype_cast_is_in_the_graph(tmp_path):
    model = SmallCNN().eval()
    ex = fxstore.FeatureExtractor(model, ["conv1", "conv2"], keep_output=False, dtype=torch.float16)
    ex.export(tmp_path / "h.onnx", (torch.rand(2, 3, 16, 16),), format="onnx")
    x = torch.rand(3, 3, 16, 16)
    got = run_onnx(tmp_path / "h.onnx", x)
    _, seen = hooked_outputs(model, ["conv1", "conv2"], x)
    for k in ("conv1", "conv2"):
        assert got[k].dtype == torch.float16
        torch.testing.assert_close(got[k], seen[k][0].half(), atol=1e-3, rtol=0)
    assert read_metadata(tmp_path / "h.onnx")["features"]["conv1"]["dtype"] == "float16"


def test_vit_onnx_keeps_a_dynamic_batch_and_the_fixed_image_size(tmp_path):
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32).eval()
    layer = "encoder.layers.encoder_layer_1"
    ex = fxstore.FeatureExtractor(model, [layer], keep_output=False)
    report = ex.export(tmp_path / "v.onnx", (torch.rand(2, 3, 32, 32),), format="onnx")
    assert set(report.metadata["dynamic"]) == {"batch"}  # ViT checks the image size: it stays 32
    for batch in (2, 3):
        x = torch.rand(batch, 3, 32, 32)
        _, seen = hooked_outputs(model, [layer], x)
        torch.testing.assert_close(run_onnx(tmp_path / "v.onnx", x)[layer], seen[layer][0], atol=ONNX_ATOL, rtol=0)


def test_tiny_gpt2_onnx_equals_hidden_states(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    ex = fxstore.FeatureExtractor(model, ["transformer.h.0"], keep_output=False, example_inputs=(ids,))
    ex.export(tmp_path / "g.onnx", (ids,), format="onnx")
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[1]
    got = run_onnx(tmp_path / "g.onnx", ids)
    assert list(got) == ["transformer.h.0"]
    torch.testing.assert_close(got["transformer.h.0"], want, atol=ONNX_ATOL, rtol=0)


# -- AOTInductor -------------------------------------------------------------------------

_FRESH = textwrap.dedent("""
    import sys, torch
    from torch._inductor import aoti_load_package
    run = aoti_load_package(sys.argv[1])
    result = run(torch.load(sys.argv[2]))
    leaked = sorted(m for m in sys.modules if m.startswith(("fxstore", "tests", "test_deploy")))
    try:  # AOTI_RUNTIME_CHECK_INPUTS=1 makes the package check calls against the recorded ranges
        run(torch.rand(int(sys.argv[4]) + 1, 3, 16, 16))
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    torch.save({"result": result, "leaked": leaked, "meta": run.get_metadata()["fxstore"], "refused": refused},
               sys.argv[3])
""")


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process_without_fxstore(tmp_path):
    model = SmallCNN().eval()
    ex = fxstore.FeatureExtractor(model, ["conv1", "conv2"], keep_output=True)
    report = ex.export(tmp_path / "s.pt2", (torch.rand(2, 3, 16, 16),), format="aoti")
    assert report.max_diff <= ATOL
    x = torch.rand(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hi = report.metadata["dynamic"]["batch"][1]
    subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "s.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt"), str(hi)], check=True, cwd=tmp_path,
                   env={**env, "AOTI_RUNTIME_CHECK_INPUTS": "1"}, timeout=900)
    saved = torch.load(tmp_path / "out.pt")
    assert saved["leaked"] == []
    # torch's check refuses it; the bound it states can be tighter than the recorded range (seen: 15, not 1024)
    assert "dim value is too large at 0" in saved["refused"]
    output, features = saved["result"]
    want_out, seen = hooked_outputs(model, ["conv1", "conv2"], x)
    torch.testing.assert_close(output, want_out, atol=ATOL, rtol=0)
    assert list(features) == ["conv1", "conv2"]
    for k in features:
        torch.testing.assert_close(features[k], seen[k][0], atol=ATOL, rtol=0)
    assert json.loads(saved["meta"]) == read_metadata(tmp_path / "s.pt2")


# -- edits: their tensors are inputs of the artifact ------------------------------------


def steered(model, layer, fn, x):
    """(model output, {layer: its edited value}) with ``fn`` applied by a forward hook on the plain model."""
    seen = {}

    def hook(_m, _i, out):
        seen[layer] = fn(out)
        return seen[layer]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x), seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def steered_cnn():
    """SmallCNN with a steering vector on conv1 (storing conv2), and its eager extractor."""
    torch.manual_seed(1)
    model = SmallCNN().eval()
    add = fxstore.Add(torch.randn(4, 1, 1), scale=1.0)
    return model, add, fxstore.FeatureExtractor(model, ["conv2"], edits={"conv1": add})


def test_edit_tensors_are_named_inputs_listed_in_the_metadata(steered_cnn, tmp_path):
    _, _, ex = steered_cnn
    report = ex.export(tmp_path / "s.pt2", torch.rand(2, 3, 16, 16), format="exported")
    meta = read_metadata(tmp_path / "s.pt2")
    assert meta == report.metadata and report.max_diff <= ATOL
    assert [i["name"] for i in meta["inputs"]] == ["x", "edit_conv1_vector", "edit_conv1_scale", "edit_conv1_enabled"]
    assert meta["edits"] == [{"key": "conv1", "kind": "Add", "inputs": [
        {"field": "vector", "name": "edit_conv1_vector", "shape": [4, 1, 1], "dtype": "float32"},
        {"field": "scale", "name": "edit_conv1_scale", "shape": [], "dtype": "float32"},
        {"field": "enabled", "name": "edit_conv1_enabled", "shape": [], "dtype": "bool"}]}]


@pytest.mark.parametrize("format", ["exported", "onnx"])
def test_artifact_with_a_new_vector_equals_the_eager_extractor_after_update(steered_cnn, tmp_path, format):
    model, add, ex = steered_cnn
    path = tmp_path / ("s.pt2" if format == "exported" else "s.onnx")
    first = add.vector.clone()
    ex.export(path, torch.rand(2, 3, 16, 16), format=format)
    x, vector, scale = torch.rand(3, 3, 20, 20), torch.randn(4, 1, 1), torch.tensor(0.5)
    atol = ATOL if format == "exported" else ONNX_ATOL
    for enabled in (True, False):
        inputs = (x, vector, scale, torch.tensor(enabled))
        if format == "exported":
            output, features = torch.export.load(path).module()(*inputs)
        else:
            got = run_onnx(path, *inputs)
            output, features = got["output"], {"conv2": got["conv2"]}
        try:
            add.update(vector=vector, scale=0.5, enabled=enabled)
            with torch.no_grad():
                want_out, want = ex(x)
        finally:
            add.update(vector=first, scale=1.0, enabled=True)
        torch.testing.assert_close(output, want_out, atol=atol, rtol=0)
        torch.testing.assert_close(features["conv2"], want["conv2"], atol=atol, rtol=0)
        reference, _ = steered(model, "conv1", (lambda o: o + 0.5 * vector) if enabled else (lambda o: o), x)
        torch.testing.assert_close(output, reference, atol=atol, rtol=0)


def test_exported_patch_with_one_position_per_row_follows_the_batch(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    patch = fxstore.Replace(torch.randn(16), index=torch.tensor([1, 0]))
    ex = fxstore.FeatureExtractor(model, ["transformer.h.1"], keep_output=False,
                                  edits={"transformer.h.0": patch}, example_inputs=(ids,))
    report = ex.export(tmp_path / "g.pt2", (ids,), format="exported")
    assert [i["shape"] for i in report.metadata["inputs"]][1:] == [[16], ["batch"], []]
    assert "batch" in report.metadata["dynamic"]
    x, value, positions = torch.randint(0, 50, (3, 8)), torch.randn(16), torch.tensor([5, 0, 7])
    got = torch.export.load(tmp_path / "g.pt2").module()(x, value, positions, torch.tensor(True))

    def per_row(out):  # a block returns its hidden states, or a tuple starting with them
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        for row, p in enumerate(positions.tolist()):
            hidden[row, p] = value
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    seen = {}
    handles = [model.transformer.h[0].register_forward_hook(lambda _m, _i, o: per_row(o)),
               model.transformer.h[1].register_forward_hook(
                   lambda _m, _i, o: seen.setdefault("h1", o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got["transformer.h.1"], seen["h1"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_aoti_package_takes_the_steering_vector_as_an_input(steered_cnn, tmp_path):
    from torch._inductor import aoti_load_package

    model, _, ex = steered_cnn
    report = ex.export(tmp_path / "s.pt2", (torch.rand(2, 3, 16, 16),), format="aoti")
    assert report.max_diff <= ATOL and report.metadata["edits"][0]["key"] == "conv1"
    x, vector = torch.rand(3, 3, 16, 16), torch.randn(4, 1, 1)
    output, _ = aoti_load_package(str(tmp_path / "s.pt2"))(x, vector, torch.tensor(2.0), torch.tensor(True))
    reference, _ = steered(model, "conv1", lambda o: o + 2.0 * vector, x)
    torch.testing.assert_close(output, reference, atol=ATOL, rtol=0)


def test_an_edit_torch_export_cannot_capture_is_one_clear_error(tmp_path):
    def data_dependent(value):
        return value * 2 if value.sum() > 0 else value

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    ex = fxstore.FeatureExtractor(model, edits={"0": fxstore.Apply(data_dependent)})
    with pytest.raises(fxstore.TraceError, match=r"could not export the extractor of Sequential with edits on 0: "
                                                 r".*\nHint: .*each fxstore.Apply's fn is traceable"):
        ex.export(tmp_path / "a.pt2", torch.rand(2, 4))


# -- refused requests --------------------------------------------------------------------


def test_gradient_taps_cannot_be_exported(tmp_path):
    ex = fxstore.FeatureExtractor(SmallCNN().eval(), ["conv1"], grads=["conv2"])
    with pytest.raises(fxstore.ConfigError, match=r"gradient taps \['conv2:grad'\] cannot be exported"):
        ex.export(tmp_path / "g.pt2", (torch.rand(1, 3, 16, 16),), format="exported")


def test_unknown_format_is_refused(tmp_path):
    ex = fxstore.FeatureExtractor(SmallCNN().eval(), ["conv1"])
    with pytest.raises(fxstore.ConfigError, match="format='tflite' is not an export format"):
        ex.export(tmp_path / "g.bin", (torch.rand(1, 3, 16, 16),), format="tflite")


def test_train_mode_is_refused(tmp_path):
    ex = fxstore.FeatureExtractor(SmallCNN().train(), ["conv1"])
    with pytest.raises(fxstore.ConfigError, match="train mode"):
        ex.export(tmp_path / "g.pt2", (torch.rand(1, 3, 16, 16),))


def test_a_model_export_cannot_capture_is_one_clear_error(tmp_path):
    ex = fxstore.FeatureExtractor(DataDependent().eval(), ["conv"], keep_output=False)
    with pytest.raises(fxstore.TraceError, match="torch.export could not export the extractor of DataDependent"):
        ex.export(tmp_path / "d.pt2", (torch.rand(2, 3, 8, 8),), format="exported")


# -- command line ------------------------------------------------------------------------


def test_cli_export_then_info(tmp_path, capsys):
    out = tmp_path / "s.pt2"
    assert main(["export", "test_deploy:SmallCNN", "--layers", "conv2", "--pool", "avg", "--image-size", "16",
                 "--format", "exported", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv2 (batch, 4) float32" in printed and "max abs difference" in printed
    assert "batch 1..1024" in printed
    assert main(["info", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["model"]["name"] == "test_deploy:SmallCNN" and list(meta["features"]) == ["conv2"]
    x = torch.rand(3, 3, 16, 16)
    model = __import__("fxstore.cli.models", fromlist=["load_model"]).load_model("test_deploy:SmallCNN")
    _, seen = hooked_outputs(model, ["conv2"], x)
    got = torch.export.load(out).module()(x)["conv2"]
    torch.testing.assert_close(got, global_avg_pool(seen["conv2"][0]), atol=ATOL, rtol=0)


def test_cli_export_with_a_steering_vector_takes_it_as_an_input(tmp_path, capsys):
    out = tmp_path / "s.pt2"
    assert main(["export", "test_deploy:SmallCNN", "--layers", "conv2", "--steer", "conv1", "--image-size", "16",
                 "--format", "exported", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "edit Add on conv1: inputs edit_conv1_vector (4, 1, 1) float32, edit_conv1_scale () float32, " \
           "edit_conv1_enabled () bool" in printed
    assert [e["key"] for e in read_metadata(out)["edits"]] == ["conv1"]
    model = __import__("fxstore.cli.models", fromlist=["load_model"]).load_model("test_deploy:SmallCNN")
    x, vector = torch.rand(3, 3, 16, 16), torch.randn(4, 1, 1)
    seen = {}
    handles = [model.conv1.register_forward_hook(lambda _m, _i, o: o + 0.5 * vector),
               model.conv2.register_forward_hook(lambda _m, _i, o: seen.setdefault("conv2", o))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    got = torch.export.load(out).module()(x, vector, torch.tensor(0.5), torch.tensor(True))["conv2"]
    torch.testing.assert_close(got, seen["conv2"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["test_deploy:DataDependent", "--layers", "conv"], "torch.export could not export the extractor"),
    (["test_deploy:SmallCNN", "--layers", "nosuch"], "nosuch"),
])
def test_cli_refusals_are_one_line(tmp_path, capsys, argv, message):
    assert main(["export", *argv, "--image-size", "16", "--format", "exported", "--out", str(tmp_path / "x.pt2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxstore export: error: ") and message in err


def test_info_of_a_file_that_is_no_artifact(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["info", str(tmp_path / "notes.txt")]) == 1
    assert "neither an ONNX file nor a .pt2 archive" in capsys.readouterr().err


def test_cli_exports_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    # two blocks: the last entry of hidden_states is after the final layer norm, block 0's is not
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=20, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    argv = ["export", f"hf:{tmp_path / 'gpt2'}", "--layers", "transformer.h.0", "--seq-len", "6",
            "--format", "exported", "--out", str(tmp_path / "g.pt2")]
    try:
        import fxstore.cli.hf  # noqa: F401  (the hf: loader lives on another branch until merged)
    except ImportError:
        assert main(argv) == 1
        assert "needs the hf: loader" in capsys.readouterr().err
        return
    assert main(argv) == 0
    assert "max abs difference" in capsys.readouterr().out
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    ids = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[1]
    got = torch.export.load(tmp_path / "g.pt2").module()(ids)["transformer.h.0"]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
