"""The fxstore command line: node table, extraction from each source kind, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

import fxstore
from fxstore.cli import main
from fxstore.cli.hints import flag_hint
from fxstore.cli.models import load_model
from fxstore.cli.sources import open_source
from fxstore.dataset._reduce import global_avg_pool
from fxstore.dataset.reader import load_features

HELPERS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))


def reference(model, layers, batches, **options):
    ex = fxstore.FeatureExtractor(model, layers, keep_output=False, **options).eval()
    with torch.no_grad():
        parts = [ex(x)[1] for x in batches]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def loaded(out, key):
    return torch.from_numpy(np.array(load_features(out)[key]))


# -- nodes -------------------------------------------------------------------------------


def test_nodes_lists_every_node_with_its_kind(capsys):
    assert main(["nodes", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["node", "kind"]
    assert [line.split()[0] for line in lines[1:]] == fxstore.node_names(torchvision.models.resnet18())
    assert "layer1.0.conv1  Conv2d" in lines[5] or any(line.split() == ["layer1.0.add", "add"] for line in lines)


def test_nodes_filter_and_shapes_come_from_a_dummy_forward(capsys):
    assert main(["nodes", "resnet18", "--shapes", "--image-size", "32", "--filter", "layer[34].0.conv*"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    model = torchvision.models.resnet18().eval()
    out = {}
    hooks = [getattr(model, f"layer{i}")[0].get_submodule(c).register_forward_hook(
        lambda m, a, o, name=f"layer{i}.0.{c}": out.__setitem__(name, o.shape)) for i in (3, 4) for c in ("conv1", "conv2")]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert rows[0] == ["node", "kind", "shape"]
    assert {r[0]: r[2] for r in rows[1:]} == {k: "x".join(map(str, s)) for k, s in out.items()}
    assert all(r[1] == "Conv2d" for r in rows[1:])


def test_nodes_of_an_import_path_model(capsys):
    assert main(["nodes", "dataset_helpers:toy_cnn", "--shapes", "--input-shape", "3", "8", "8"]) == 0
    assert ["fc", "Linear", "1x10"] in [line.split() for line in capsys.readouterr().out.splitlines()]


# -- extract -------------------------------------------------------------------------------


def test_extract_fake_source_equals_in_memory_extraction(tmp_path, capsys):
    args = ["extract", "resnet18", "--layers", "layer2", "layer4", "--pool", "avg", "--dtype", "float16",
            "--data", "fake:6", "--image-size", "32", "--batch-size", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out == ""
    batches = [x for x, _ in DataLoader(open_source("fake:6", image_size=32), batch_size=3)]
    expected = reference(load_model("resnet18"), ["layer2", "layer4"], batches, transform=global_avg_pool,
                         dtype=torch.float16)
    for key in ("layer2", "layer4"):
        assert torch.equal(loaded(tmp_path, key), expected[key])
    plain = load_model("resnet18")
    with torch.no_grad():
        layer4 = torch.cat([plain.layer4(plain.layer3(plain.layer2(plain.layer1(plain.maxpool(plain.relu(
            plain.bn1(plain.conv1(x)))))))) for x in batches])
    torch.testing.assert_close(loaded(tmp_path, "layer4").float(), layer4.mean((2, 3)), atol=2e-3, rtol=2e-3)


def test_extract_prints_a_summary_and_how_to_load(tmp_path, capsys):
    assert main(["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", "fake:4", "--image-size", "8",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"wrote 4 samples to {tmp_path} (safetensors): fc (10,) float32" in captured.out
    assert f"fxstore.load_features('{tmp_path}')" in captured.out
    assert "4/4" in captured.err  # the progress bar


def _write_images(root: Path) -> list[tuple[str, int]]:
    """Six PNG files in two class folders; returns (path, class index) in ImageFolder order."""
    rng = np.random.default_rng(0)
    files = []
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            path = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(path)
            files.append((str(path), label))
    return files


def test_extract_image_folder_of_real_png_files(tmp_path):
    files = _write_images(tmp_path / "images")
    out = tmp_path / "out"
    assert main(["extract", "dataset_helpers:toy_cnn", "--layers", "relu2", "fc", "--data", str(tmp_path / "images"),
                 "--image-size", "16", "--batch-size", "4", "--out", str(out), "--format", "npy", "--quiet"]) == 0
    transform = transforms.Compose([transforms.Resize(18), transforms.CenterCrop(16), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in files])
    model = load_model("dataset_helpers:toy_cnn")
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(loaded(out, "fc"), expected, rtol=0, atol=1e-6)
    assert loaded(out, "target").tolist() == [label for _, label in files]
    assert np.load(out / "relu2.npy").shape == (6, 16, 8, 8)


def test_extract_npy_source(tmp_path):
    inputs = np.random.default_rng(0).random((5, 3, 8, 8))
    np.save(tmp_path / "inputs.npy", inputs)
    assert main(["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", str(tmp_path / "inputs.npy"),
                 "--batch-size", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with torch.no_grad():
        expected = load_model("dataset_helpers:toy_cnn")(torch.from_numpy(inputs).float())
    torch.testing.assert_close(loaded(tmp_path / "out", "fc"), expected, rtol=0, atol=1e-6)
    assert "target" not in load_features(tmp_path / "out")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_extract_a_uint8_npy_of_images_scales_them_as_to_tensor_does(tmp_path, layout):
    from torchvision.transforms.functional import to_tensor

    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)  # H x W x C, as PIL gives
    np.save(tmp_path / "images.npy", images if layout == "NHWC" else images.transpose(0, 3, 1, 2))
    assert main(["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", str(tmp_path / "images.npy"),
                 "--batch-size", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with torch.no_grad():
        expected = load_model("dataset_helpers:toy_cnn")(torch.stack([to_tensor(image) for image in images]))
    torch.testing.assert_close(loaded(tmp_path / "out", "fc"), expected, rtol=0, atol=1e-6)


def test_extract_with_a_local_weights_file(tmp_path):
    trained = load_model("dataset_helpers:toy_cnn", seed=7)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    assert main(["extract", "dataset_helpers:toy_cnn", "--weights", str(tmp_path / "w.pt"), "--layers", "fc",
                 "--data", "fake:4", "--image-size", "8", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    x = torch.stack([open_source("fake:4", image_size=8)[i][0] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tmp_path / "out", "fc"), trained(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("library", "cli"), [
    ("Hint: use a new output folder, or overwrite=True to start over.",
     "Hint: use a new output folder, or --overwrite to start over."),
    ("Hint: write elsewhere (out=...), pool them (reduce='avg') or use a smaller dtype (dtype='float16').",
     "Hint: write elsewhere (--out), pool them (--pool avg) or use a smaller dtype (--dtype float16)."),
    ("Hint: pass layers=[...], e.g. layers=['layer4'].", "Hint: pass --layers ..., e.g. --layers layer4."),
    ("Hint: use format='safetensors'; e.g. batch_size=64, shuffle=0.",
     "Hint: use --format safetensors; e.g. --batch-size 64, --shuffle 0."),
    ("reduce='max' is bad.\nHint: drop skip_special=True; set text_field=.",
     "reduce='max' is bad.\nHint: drop --skip-special; set --text-field."),  # only the hint is translated
    ("no hint here: overwrite=True", "no hint here: overwrite=True"),
    ("Hint: fxstore.node_names(model), input_key=0 (no flag: kept)", "Hint: fxstore.node_names(model), input_key=0 (no flag: kept)"),
])
def test_library_hints_are_translated_to_flags(library, cli):
    assert flag_hint(library) == cli


def test_rerunning_the_same_command_resumes_and_overwrite_starts_over(tmp_path, capsys):
    args = ["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", "fake:4", "--image-size", "8",
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0 and main(args) == 0
    assert main([*args, "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "refusing to resume" in err
    assert "or --overwrite to start over" in err and "overwrite=True" not in err  # the library's hint, in flags
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    expected = load_model("dataset_helpers:toy_cnn", seed=1)(
        torch.stack([open_source("fake:4", image_size=8)[i][0] for i in range(4)]))
    torch.testing.assert_close(loaded(tmp_path, "fc"), expected.detach(), rtol=0, atol=1e-6)


def test_info_prints_the_manifest(tmp_path, capsys):
    main(["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", "fake:4", "--image-size", "8",
          "--out", str(tmp_path), "--quiet"])
    capsys.readouterr()
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 4 and info["model"]["name"] == "dataset_helpers:toy_cnn"
    assert info["command"].startswith("fxstore extract dataset_helpers:toy_cnn --layers fc")


# -- errors: one line, no traceback ---------------------------------------------------------


@pytest.mark.parametrize(("args", "status", "message"), [
    (["nodes", "resnet17"], 1, "fxstore nodes: error: 'resnet17' is not a torchvision model. Did you mean 'resnet18'"),
    (["nodes", "nosuchpackage.mod:make"], 1, "cannot import 'nosuchpackage.mod'"),
    (["nodes", "dataset_helpers:nothing"], 1, "'dataset_helpers' has no callable 'nothing'"),
    (["nodes", "resnet18", "--filter", "nothing*"], 1, "no node of 'resnet18' matches 'nothing*'"),
    (["nodes", "resnet18", "--shapes", "--input-shape", "5", "8", "8"], 1, "fails on a dummy input of shape (1, 5, 8, 8)"),
    (["extract", "resnet18", "--layers", "layer9", "--data", "fake:2", "--out", "{tmp}/o"], 1,
     "layer 'layer9' matches no node or module of ResNet (eval mode). Did you mean 'layer4', 'layer3'"),
    (["extract", "resnet18", "--layers", "fc", "--data", "nowhere/", "--out", "{tmp}/o"], 1,
     "data source 'nowhere/' is not an image folder, a .npy file or fake:N"),
    (["extract", "resnet18", "--layers", "fc", "--data", "missing.npy", "--out", "{tmp}/o"], 1,
     "data file 'missing.npy' does not exist"),
    (["extract", "resnet18", "--layers", "fc", "--data", "fake:2", "--weights", "{tmp}/none.pt", "--out", "{tmp}/o"],
     1, "weights file '{tmp}/none.pt' does not exist"),
    (["extract", "resnet18", "--layers", "fc", "--data", "fake:2", "--weights", "{tmp}/toy.pt", "--out", "{tmp}/o"],
     1, "weights file '{tmp}/toy.pt' does not fit model 'resnet18'"),
    (["extract", "resnet18", "--layers", "fc", "--data", "fake:2", "--weights", "{tmp}/pickle.pt", "--out",
      "{tmp}/o"], 1, "cannot load weights file '{tmp}/pickle.pt' safely"),
    (["extract", "resnet18", "--layers", "fc", "--data", "fake:2", "--out", "{tmp}/o", "--format", "csv"], 2,
     "fxstore extract: error: argument --format: invalid choice: 'csv'"),
    (["extract", "resnet18", "--layers", "fc", "--data", "fake:2", "--out", "{tmp}/o", "--batch-size", "0"], 2,
     "argument --batch-size: '0' is not a positive integer"),
    (["extract", "resnet18", "--data", "fake:2", "--out", "{tmp}/o"], 2, "the following arguments are required: --layers"),
    (["frobnicate"], 2, "fxstore: error: argument command: invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_a_one_line_error(tmp_path, capsys, args, status, message):
    torch.save(load_model("dataset_helpers:toy_cnn").state_dict(), tmp_path / "toy.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pt")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) if status == 2 else _no_exit() as raised:
        result = main(args)
    code = raised.value.code if status == 2 else result
    err = capsys.readouterr().err
    assert code == status
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


class _no_exit:
    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_console_script_module_runs_and_fails_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "fxstore", "extract", "resnet18", "--layers", "fc", "--data",
                          "fake:2", "--out", str(tmp_path), "--pool", "median"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "invalid choice: 'median'" in run.stderr and "Traceback" not in run.stderr


def test_demo_runs_the_cli_on_the_embedded_default():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "tools.demo"], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    for expected in ("$ fxstore nodes resnet18", "layer4.1.relu_1", "$ fxstore extract resnet18", '"num_samples"',
                     "fxstore.load_features("):
        assert expected in run.stdout
    assert "sample/s" in run.stderr


@pytest.mark.parametrize("when", ["after", "before", "before, on a finished folder"])
def test_an_interrupt_reports_what_the_folder_holds(tmp_path, monkeypatch, capsys, when):
    import fxstore.dataset

    real = fxstore.dataset.extract_dataset
    command = ["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", "fake:4", "--image-size", "8",
               "--out", str(tmp_path / "out"), "--quiet"]
    if when.endswith("finished folder"):
        assert main(command) == 0  # a complete folder from an earlier run: an interrupt now must not count it

    def interrupted(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)  # the manifest is written; Ctrl-C lands before the command returns
        raise KeyboardInterrupt

    monkeypatch.setattr(fxstore.dataset, "extract_dataset", interrupted)
    capsys.readouterr()
    status = main(command + (["--overwrite"] if when.endswith("finished folder") else []))
    err = capsys.readouterr().err
    if when == "after":
        assert status == 0 and f"interrupted after the extraction finished: {tmp_path / 'out'} is complete" in err
    else:
        assert status == 130 and "interrupted; run the same command again to resume" in err
