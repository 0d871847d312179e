"""extract_dataset + load_features: round trips against the in-memory extractor, inputs, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_helpers import LAYERS, FailsAt, Images, shard_bytes, toy_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import fxstore
from fxstore import ConfigError, FeatureExtractor, LayerNotFoundError
from fxstore.dataset import extract_dataset
from fxstore.dataset.reader import ShardedArray, load_features
from fxstore.errors import OutputError

FORMATS = ["safetensors", "npy"]


def tensor(array) -> torch.Tensor:
    """A writable tensor copy of a (read-only, memory-mapped) array."""
    return torch.from_numpy(np.array(array))


def reference(model, layers, data, batch_size, **options):
    """Features of every sample from the in-memory extractor, over the same batches."""
    ex = FeatureExtractor(model, layers, keep_output=False, **options).eval()
    parts = []
    with torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size):
            parts.append(ex(x)[1])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_equals_in_memory_extraction(tmp_path, fmt):
    model, data = toy_model(), Images(20)
    manifest = extract_dataset(model, LAYERS, data, tmp_path, format=fmt, batch_size=4, shard_size=8,
                               progress=False)
    feats = load_features(tmp_path)
    expected = reference(model, LAYERS, data, batch_size=4)
    assert list(manifest["features"]) == LAYERS and manifest["num_samples"] == 20
    for key in LAYERS:
        assert torch.equal(tensor(feats[key]), expected[key]), key
    assert np.array_equal(np.asarray(feats["target"]), [i % 7 for i in range(20)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_load_without_fxstore(tmp_path, fmt):
    model, data = toy_model(), Images(12)
    manifest = extract_dataset(model, ["fc"], data, tmp_path, format=fmt, batch_size=4, shard_size=8, progress=False)
    expected = reference(model, ["fc"], data, batch_size=4)["fc"]
    if fmt == "npy":
        loaded = tensor(np.load(tmp_path / manifest["features"]["fc"]["file"]))
    else:
        loaded = torch.cat([load_file(tmp_path / s["file"])["fc"] for s in manifest["shards"]])
    assert torch.equal(loaded, expected)


def test_pooling_and_dtype_run_inside_the_graph(tmp_path):
    model, data = toy_model(), Images(8)
    m = extract_dataset(model, ["relu1", "relu2"], data, tmp_path, reduce="avg", dtype=torch.float16,
                        batch_size=4, progress=False)
    feats = load_features(tmp_path)
    maps = reference(model, ["relu1", "relu2"], data, batch_size=4)
    assert m["features"]["relu2"] == {"shape": [16], "dtype": "float16", "reduce": "avg"}
    for key in ("relu1", "relu2"):
        pooled = torch.nn.functional.adaptive_avg_pool2d(maps[key], 1).flatten(1).half()
        torch.testing.assert_close(tensor(feats[key][:]), pooled, rtol=1e-3, atol=1e-3)


def test_per_layer_reduction_mapping(tmp_path):
    model, data = toy_model(), Images(8)
    m = extract_dataset(model, ["relu1", "relu2", "fc"], data, tmp_path, reduce={"relu1": "max", "relu2": "flatten"},
                        batch_size=4, progress=False)
    feats, maps = load_features(tmp_path), reference(model, ["relu1", "relu2", "fc"], data, batch_size=4)
    assert {k: v["reduce"] for k, v in m["features"].items()} == {"relu1": "max", "relu2": "flatten", "fc": "none"}
    assert torch.equal(tensor(feats["relu1"][:]), maps["relu1"].amax((2, 3)))
    assert torch.equal(tensor(feats["relu2"][:]), maps["relu2"].flatten(1))
    assert torch.equal(tensor(feats["fc"][:]), maps["fc"])


def test_dataloader_gives_the_same_bytes_as_the_dataset(tmp_path):
    model, data = toy_model(), Images(20)
    extract_dataset(model, LAYERS, data, tmp_path / "ds", batch_size=4, shard_size=8, progress=False)
    extract_dataset(model, LAYERS, DataLoader(data, batch_size=4), tmp_path / "dl", shard_size=8, progress=False)
    assert shard_bytes(tmp_path / "ds") == shard_bytes(tmp_path / "dl")


def test_generator_of_dict_batches_with_named_fields(tmp_path):
    model = toy_model()
    xs = [torch.rand(3, 3, 16, 16) for _ in range(4)]
    batches = ({"pixels": x, "id": torch.arange(3) + 3 * i} for i, x in enumerate(xs))
    m = extract_dataset(model, ["fc"], batches, tmp_path, input_key="pixels", target_key="id", shard_size=5,
                        progress=False)
    feats = load_features(tmp_path)
    with torch.no_grad():
        expected = torch.cat([model(x) for x in xs])
    assert [s["count"] for s in m["shards"]] == [6, 6]
    assert torch.equal(tensor(feats["fc"][:]), expected)
    assert np.array_equal(feats["target"][:], np.arange(12))


def test_plain_tensor_batches_store_no_target(tmp_path):
    m = extract_dataset(torch.nn.Linear(4, 2), "linear", torch.rand(3, 5, 4), tmp_path, progress=False)
    assert m["target"] is None and set(load_features(tmp_path)) == {"linear"}


def test_feature_extractor_can_be_passed(tmp_path):
    model, data = toy_model(), Images(8)
    ex = FeatureExtractor(model, {"relu2": "deep"}, keep_output=False)
    extract_dataset(ex, None, data, tmp_path, batch_size=4, target_key=False, progress=False)
    assert torch.equal(tensor(load_features(tmp_path)["deep"][:]),
                       reference(model, ["relu2"], data, batch_size=4)["relu2"])


def test_overlap_off_writes_the_same_bytes(tmp_path):
    model, data = toy_model(), Images(16)
    for name, overlap in (("on", True), ("off", False)):
        extract_dataset(model, LAYERS, data, tmp_path / name, batch_size=4, shard_size=8, overlap=overlap,
                        progress=False)
    assert shard_bytes(tmp_path / "on") == shard_bytes(tmp_path / "off")


def test_model_modes_are_restored(tmp_path):
    model = toy_model().train()
    extract_dataset(model, ["fc"], Images(4), tmp_path, progress=False)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_one_lazy_array_class_with_numpy_indexing_in_both_formats(tmp_path, fmt):
    extract_dataset(toy_model(), ["relu2"], Images(21), tmp_path, format=fmt, batch_size=4, shard_size=8,
                    progress=False)
    lazy = load_features(tmp_path)["relu2"]
    # the reference: the same layer captured in memory, a plain numpy array
    full = fxstore.FeatureExtractor(toy_model(), ["relu2"], keep_output=False)(
        torch.stack([Images(21)[i][0] for i in range(21)]))[1]["relu2"].detach().numpy()
    assert isinstance(lazy, ShardedArray) and lazy.shape == full.shape == (21, 16, 8, 8)
    assert (lazy.ndim, lazy.nbytes, len(lazy), lazy.dtype, lazy.size) == (4, full.nbytes, 21, full.dtype, full.size)
    mask = np.arange(21) % 3 == 0
    for index in (0, 7, 8, -1, slice(5, 17), slice(None, None, 3), slice(20, 2, -4), slice(30, 40), slice(None, None, -1),
                  (slice(6, 10), 2), (3, slice(None), 1), [4, 0, 9, 9, 20], np.array([[1, 2], [17, -1]]), mask,
                  ..., (..., 0), (Ellipsis, 1, 2), (None, 3), ([1, 2], [3, 4]), (mask, slice(None), 0), [], ()):
        np.testing.assert_allclose(lazy[index], full[index], rtol=0, atol=1e-6, err_msg=str(index))
        assert np.shape(lazy[index]) == np.shape(full[index]), index
    np.testing.assert_allclose(np.asarray(lazy), full, rtol=0, atol=1e-6)
    assert torch.equal(lazy.torch([2, 5]), torch.from_numpy(lazy[[2, 5]]))
    for bad in (21, -22, [0, 21], np.ones(5, dtype=bool), 1.5):
        with pytest.raises(IndexError):
            lazy[bad]


def test_bfloat16_features_index_as_float32_and_come_back_exactly_with_torch(tmp_path):
    extract_dataset(toy_model(), ["fc"], Images(6), tmp_path, dtype="bfloat16", shard_size=4, progress=False)
    fc = load_features(tmp_path)["fc"]
    stored = torch.cat([load_file(tmp_path / f"shard-0000{k}.safetensors")["fc"] for k in (0, 1)])
    assert fc.stored_dtype == "bfloat16" and fc.dtype == np.float32 and fc.nbytes == 6 * 10 * 2
    assert isinstance(fc[2:5], np.ndarray) and fc[2:5].shape == (3, 10)
    assert torch.equal(torch.from_numpy(fc[2:5]), stored[2:5].float())  # the README's torch.from_numpy(acts[...])
    assert fc.torch(slice(2, 5)).dtype == torch.bfloat16 and torch.equal(fc.torch(slice(2, 5)), stored[2:5])


# -- refused inputs -------------------------------------------------------------------


@pytest.mark.parametrize(("options", "match"), [
    ({"format": "csv"}, "format='csv' is not an output format"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"shard_size": 2.5}, "shard_size=2.5 must be an integer"),
    ({"reduce": "mean"}, "reduce='mean' is not a reduction"),
    ({"reduce": {"conv9": "avg"}}, "reduce has an entry for 'conv9'"),
    ({"device": "gpu:x"}, "device='gpu:x' is not a device"),
    ({"input_key": "pixels"}, "no input field 'pixels'"),
])
def test_bad_options_are_refused(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        extract_dataset(toy_model(), ["fc"], Images(4), tmp_path, progress=False, **options)


def test_unknown_layer_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(LayerNotFoundError, match="Did you mean 'conv1'"):
        extract_dataset(toy_model(), ["conv_1"], Images(4), tmp_path, progress=False)


def test_model_failing_on_the_data_is_a_config_error(tmp_path):
    data = TensorDataset(torch.rand(4, 5, 16, 16))
    with pytest.raises(ConfigError, match=r"fails on the data's first batch \(input \(2, 5, 16, 16\)\)"):
        extract_dataset(toy_model(), ["fc"], data, tmp_path, progress=False)


def test_npy_refuses_bfloat16_and_unknown_length(tmp_path):
    with pytest.raises(ConfigError, match="bfloat16, which .npy files cannot hold"):
        extract_dataset(toy_model(), ["fc"], Images(4), tmp_path, format="npy", dtype="bfloat16", progress=False)
    batches = (x for x, _ in DataLoader(Images(4), batch_size=2))
    with pytest.raises(ConfigError, match="format='npy' needs the number of samples"):
        extract_dataset(toy_model(), ["fc"], batches, tmp_path / "gen", format="npy", progress=False)


def test_empty_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the dataset is empty"):
        extract_dataset(toy_model(), ["fc"], Images(0), tmp_path, progress=False)


def test_unwritable_output_is_refused_before_computing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write the output folder"):
        extract_dataset(toy_model(), ["fc"], Images(4), tmp_path / "file" / "out", progress=False)


def test_too_little_disk_space_is_refused_before_computing(tmp_path, monkeypatch):
    import shutil

    import fxstore.dataset.folder.files as outdir

    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(OutputError, match=r"needs about 2\.\d KiB but its disk has 100\.0 B free"):
        extract_dataset(toy_model(), ["conv1"], Images(1, size=8), tmp_path, progress=False)
    assert not list(tmp_path.glob("shard-*"))


def test_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files fxstore did not write \(notes.txt\)"):
        extract_dataset(toy_model(), ["fc"], Images(4), tmp_path, progress=False)


def test_load_features_of_an_unfinished_folder_is_refused(tmp_path):
    with pytest.raises(OutputError, match="holds no finished extraction"):
        load_features(tmp_path)


# -- resume ----------------------------------------------------------------------------


def test_rerun_of_a_finished_extraction_does_nothing(tmp_path):
    first = extract_dataset(toy_model(), LAYERS, Images(8), tmp_path, batch_size=4, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = extract_dataset(toy_model(), LAYERS, Images(8), tmp_path, batch_size=4, progress=False)
    assert again == first and stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}


class _OtherCNN(type(toy_model())):
    """Same weights, another architecture class."""


@pytest.mark.parametrize(("change", "match"), [
    ({"layers": ["conv1"]}, "layers, their shapes or dtypes"),
    ({"data": Images(12)}, "number of samples: 8 before, 12 now"),
    ({"model": "other"}, r"model \(class or weights\): ToyCNN sha256:\w+ before, _OtherCNN sha256:\w+ now"),
    ({"format": "npy"}, "output format: 'safetensors' before, 'npy' now"),
    ({"shard_size": 2}, "shard size: 4 before, 2 now"),
])
def test_mismatched_resume_is_refused(tmp_path, change, match):
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), ["fc"], FailsAt(8, bad=6), tmp_path, shard_size=4, batch_size=2,
                        data_name="images", progress=False)
    assert (tmp_path / "shard-00000.safetensors").exists() and not (tmp_path / "manifest.json").exists()
    run = {"model": toy_model(), "layers": ["fc"], "data": Images(8), "format": "safetensors", "shard_size": 4}
    run.update(change)
    if change.get("model") == "other":
        run["model"] = _OtherCNN()
        run["model"].load_state_dict(toy_model().state_dict())
    with pytest.raises(OutputError, match=f"refusing to resume into .*{match}"):
        extract_dataset(run.pop("model"), run.pop("layers"), run.pop("data"), tmp_path, batch_size=2,
                        data_name="images", progress=False, **run)


def test_resume_after_an_error_completes_the_same_bytes(tmp_path):
    options = {"shard_size": 4, "batch_size": 2, "data_name": "images", "progress": False}
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), LAYERS, FailsAt(12, bad=9), tmp_path / "a", **options)
    first = (tmp_path / "a" / "shard-00000.safetensors").stat().st_ino
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path / "a", **options)
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path / "b", **options)
    assert (tmp_path / "a" / "shard-00000.safetensors").stat().st_ino == first  # not recomputed
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_different_weights_are_refused_and_overwrite_starts_over(tmp_path):
    extract_dataset(toy_model(), ["fc"], Images(8), tmp_path, progress=False)
    other = toy_model()
    with torch.no_grad():
        other.fc.bias.add_(1)
    with pytest.raises(OutputError, match=r"model \(class or weights\): ToyCNN sha256:.* before"):
        extract_dataset(other, ["fc"], Images(8), tmp_path, progress=False)
    extract_dataset(other, ["fc"], Images(8), tmp_path, overwrite=True, progress=False)
    with torch.no_grad():
        expected = other(torch.stack([Images(8)[i][0] for i in range(8)]))
    torch.testing.assert_close(tensor(load_features(tmp_path)["fc"][:]), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_in_a_dataloader_visits_every_row_once_across_workers(tmp_path, workers):
    from fxstore.dataset.loader import BatchLoader

    extract_dataset(toy_model(), ["fc"], Images(40), tmp_path, batch_size=4, shard_size=5, progress=False)
    loader = BatchLoader(tmp_path, batch_size=4, seed=3)
    assert isinstance(loader, torch.utils.data.IterableDataset)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(DataLoader(loader, batch_size=None, num_workers=workers))
        targets = torch.cat([b["target"] for b in batches])
        fc = torch.cat([b["fc"] for b in batches])
        assert sorted(targets.tolist()) == sorted(i % 7 for i in range(40))
        rows = {tuple(r.tolist()) for r in fc}
        assert len(rows) == 40 and rows == {tuple(r.tolist()) for r in torch.as_tensor(load_features(tmp_path)["fc"][:])}


def test_a_resume_says_how_much_was_already_written(tmp_path, capsys):
    options = {"shard_size": 4, "batch_size": 2, "data_name": "images"}
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), LAYERS, FailsAt(12, bad=9), tmp_path, progress=False, **options)
    capsys.readouterr()
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path, progress=True, **options)
    assert f"fxstore: resuming '{tmp_path}': 2 of 3 shard(s) already written (8 rows); computing the rest" \
        in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), LAYERS, FailsAt(12, bad=9), tmp_path / "quiet", progress=False, **options)
    extract_dataset(toy_model(), LAYERS, Images(12), tmp_path / "quiet", progress=False, **options)
    assert "resuming" not in capsys.readouterr().err  # progress=False: nothing printed


def test_image_folder_class_names_are_in_the_manifest(tmp_path):
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for i, name in enumerate(["dog", "cat", "cat", "zebra"]):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    data = ImageFolder(tmp_path / "data", transform=transforms.ToTensor())
    manifest = extract_dataset(toy_model(), ["fc"], data, tmp_path / "out", progress=False)
    assert manifest["target"]["classes"] == data.classes == ["cat", "dog", "zebra"]
    assert fxstore.read_manifest(tmp_path / "out")["target"]["classes"] == data.classes
    subset = extract_dataset(toy_model(), ["fc"], torch.utils.data.Subset(data, [0, 2]), tmp_path / "sub",
                             progress=False)
    assert subset["target"]["classes"] == data.classes
    plain = extract_dataset(toy_model(), ["fc"], Images(4), tmp_path / "plain", progress=False)
    assert "classes" not in (plain["target"] or {})
