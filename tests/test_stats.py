"""Dataset statistics: moments, top-k, firing and the Fréchet distance against independent references
(numpy float64 on the rows ``extract_dataset`` writes, a brute-force sort, the model's own
``output_hidden_states``, torchmetrics' FID and scipy's ``sqrtm``); resume and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from dataset_helpers import FailsAt, Images, toy_cnn
from text_helpers import BLOCKS, corpus, save

import fxstore
from fxstore import ConfigError, LayerNotFoundError, OutputError
from fxstore.cli import main
from fxstore.cli.models import load_model
from fxstore.cli.sources import open_source

HELPERS = Path(__file__).parent


def _dense(model, layers, data, tmp_path, **kw):
    """The rows ``extract_dataset`` writes (the reference's input), as float64 numpy arrays."""
    if "tokenizer" not in kw:
        kw["target_key"] = False
    fxstore.extract_dataset(model, layers, data, tmp_path / "rows", progress=False, **kw)
    return {k: np.asarray(v) for k, v in fxstore.load_features(tmp_path / "rows").items()}


def _brute_top(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-rows, axis=0, kind="stable")[:k]  # ties: the lower row first
    return np.take_along_axis(rows, order, 0).T, order.T


def _check_moments(s, rows: np.ndarray) -> None:
    rows = rows.astype(np.float64)
    assert s.count == len(rows)
    np.testing.assert_allclose(s.mean.numpy(), rows.mean(0), rtol=1e-6, atol=1e-12)
    cov = np.cov(rows, rowvar=False)
    np.testing.assert_allclose(s.cov.numpy(), cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())
    np.testing.assert_array_equal(s.fired.numpy(), (rows > 0).sum(0))
    np.testing.assert_allclose(s.frequency.numpy(), (rows > 0).mean(0), rtol=1e-12)


def test_image_moments_topk_and_firing_equal_numpy_on_extract_dataset_rows(tmp_path):
    model, data = toy_cnn().eval(), Images(37)
    layers = ["relu2", "fc"]
    stats = fxstore.feature_statistics(model, layers, data, reduce="avg", batch_size=8, shard_size=16, top_k=5,
                                       progress=False)
    dense = _dense(model, layers, data, tmp_path, reduce="avg", batch_size=8, shard_size=16)
    assert set(stats) == {"relu2", "fc"}
    for key, s in stats.items():
        _check_moments(s, dense[key])
        values, indices = _brute_top(dense[key].astype(np.float64), 5)
        np.testing.assert_array_equal(s.top_values.numpy(), values)
        np.testing.assert_array_equal(s.top_indices.numpy(), indices)
        assert s.top_positions is None and s.identity["layers"] == [["relu2", None], ["fc", None]]


def test_per_layer_reduce_and_dtype_equal_numpy_on_the_same_rows(tmp_path):
    model, data = toy_cnn().eval(), Images(13)
    layers, reduce = ["conv2", "relu2", "fc"], {"conv2": "max", "relu2": "avg"}  # fc: as it is
    stats = fxstore.feature_statistics(model, layers, data, reduce=reduce, dtype="float16", batch_size=4,
                                       progress=False)
    dense = _dense(model, layers, data, tmp_path, reduce=reduce, dtype="float16", batch_size=4)
    for key in layers:
        assert dense[key].dtype == np.float16
        _check_moments(stats[key], dense[key])
    assert stats["fc"].identity["options"]["reduce"] == [["conv2", "max"], ["relu2", "avg"]]
    with pytest.raises(ConfigError, match="reduce has an entry for 'layer9'"):
        fxstore.feature_statistics(model, layers, data, reduce={"layer9": "avg"}, progress=False)


def test_topk_ties_go_to_the_lower_sample_index():
    # relu of a constant-heavy input: many units are 0 for most samples, so k > positives ties at 0
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU()).eval()
    x = torch.randn(30, 4) * 0.1
    x[::3] = 0  # identical rows: equal values in every unit
    data = torch.utils.data.TensorDataset(x)
    s = fxstore.feature_statistics(model, ["1"], data, batch_size=7, shard_size=10, top_k=12, progress=False)["1"]
    rows = model(x).detach().double().numpy()
    values, indices = _brute_top(rows, 12)
    np.testing.assert_array_equal(s.top_values.numpy(), values)
    np.testing.assert_array_equal(s.top_indices.numpy(), indices)


def test_resnet_pooled_features_and_moments_false(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    data = Images(12, size=32)
    s = fxstore.feature_statistics(model, ["layer4"], data, reduce="avg", batch_size=5, progress=False)["layer4"]
    _check_moments(s, _dense(model, ["layer4"], data, tmp_path, reduce="avg", batch_size=5)["layer4"])
    light = fxstore.feature_statistics(model, ["layer4"], data, reduce="avg", batch_size=5, moments=False,
                                       progress=False)["layer4"]
    assert light.cov is None and torch.equal(light.mean, s.mean) and light.top_values.shape == (512, 0)
    with pytest.raises(ConfigError, match="moments=False"):
        fxstore.frechet_distance(light, s)


def test_large_width_covariance():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4096)).eval()
    x = torch.randn(20, 8)
    s = fxstore.feature_statistics(model, ["0"], torch.utils.data.TensorDataset(x), batch_size=8, top_k=2,
                                   progress=False)["0"]
    rows = model(x).detach().double().numpy()
    assert s.cov.shape == (4096, 4096) and s.cov.dtype == torch.float64
    np.testing.assert_allclose(s.cov[:64].numpy(), np.cov(rows[:, :64], rows, rowvar=False)[:64, 64:], rtol=1e-5,
                               atol=1e-9)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # right and left padding
def test_token_rows_equal_output_hidden_states_without_padding(tmp_path, kind):
    folder = save(kind, tmp_path / kind)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    docs = corpus(9)
    layer = BLOCKS[kind].format(0)
    s = fxstore.feature_statistics(model, [layer], docs, tokenizer=tok, batch_size=4, shard_size=20,
                                   top_k=4, progress=False)[layer]
    rows, where = [], []
    with torch.no_grad():
        for i, doc in enumerate(docs):  # one document at a time: no padding at all
            ids = tok(doc, return_tensors="pt")["input_ids"]
            hidden = model(ids, output_hidden_states=True).hidden_states[1][0]
            rows.append(hidden.double().numpy())
            where += [(i, p) for p in range(ids.shape[1])]
    rows = np.concatenate(rows)
    assert s.count == len(rows)
    np.testing.assert_allclose(s.mean.numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(rows, rowvar=False), rtol=1e-4, atol=1e-5)
    values, order = _brute_top(rows, 4)
    np.testing.assert_allclose(s.top_values.numpy(), values, rtol=1e-5, atol=1e-6)
    found = {(int(i), int(p)) for i, p in zip(s.top_indices.flatten(), s.top_positions.flatten(), strict=True)}
    assert found == {where[r] for r in order.flatten()}
    # and exactly the rows extract_dataset writes (the same batches): moments to rtol 1e-6
    dense = _dense(model, [layer], docs, tmp_path, tokenizer=tok, batch_size=4, shard_size=20)
    _check_moments(s, dense[layer])


def test_frechet_distance_equals_torchmetrics_and_scipy():
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    feature = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten()).eval()
    feature.num_features = 8
    real, fake = torch.rand(40, 3, 12, 12), torch.rand(40, 3, 12, 12) * 0.8 + 0.1
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    for i in range(0, 40, 16):
        metric.update(real[i:i + 16], real=True)
        metric.update(fake[i:i + 16], real=False)
    expected = float(metric.compute())
    a, b = (fxstore.feature_statistics(feature, ["3"], torch.utils.data.TensorDataset(x), batch_size=16,
                                       progress=False)["3"] for x in (real, fake))
    fd = fxstore.frechet_distance(a, b)
    assert fd == pytest.approx(expected, rel=1e-5)  # torchmetrics returns float32
    mu1, mu2, s1, s2 = a.mean.numpy(), b.mean.numpy(), a.cov.numpy(), b.cov.numpy()
    root = linalg.sqrtm(s1 @ s2).real
    assert fd == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root), rel=1e-9)
    assert fxstore.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_save_and_load_keep_every_array_and_the_identity(tmp_path):
    stats = fxstore.feature_statistics(toy_cnn(), ["relu2"], Images(10), reduce="avg", batch_size=4, top_k=2,
                                       progress=False)
    s = stats["relu2"]
    back = fxstore.FeatureStatistics.load(s.save(tmp_path / "ref.safetensors"))
    for field in ("mean", "cov", "fired", "top_values", "top_indices"):
        assert torch.equal(getattr(back, field), getattr(s, field))
    assert back.count == 10 and back.identity == s.identity
    assert back.identity["model"]["fingerprint"].startswith("sha256:")
    assert back.identity["options"]["reduce"] == "avg" and back.identity["data"]["num_samples"] == 10
    (tmp_path / "other.safetensors").write_bytes(b"not a file")
    with pytest.raises(OutputError, match="other.safetensors"):
        fxstore.FeatureStatistics.load(tmp_path / "other.safetensors")


def test_bad_inputs_are_refused_with_hints():
    model, data = toy_cnn(), Images(6)
    with pytest.raises(LayerNotFoundError):
        fxstore.feature_statistics(model, ["nope"], data, progress=False)
    with pytest.raises(ConfigError, match=r"not one row per sample.*\n.*reduce='avg'"):
        fxstore.feature_statistics(model, ["relu2"], data, progress=False)
    with pytest.raises(ConfigError, match="top_k=-1"):
        fxstore.feature_statistics(model, ["fc"], data, top_k=-1, progress=False)
    with pytest.raises(ConfigError, match="reduce='mean'"):
        fxstore.feature_statistics(model, ["fc"], data, reduce="mean", progress=False)
    with pytest.raises(ConfigError, match="layers=\\[\\]"):
        fxstore.feature_statistics(model, [], data, progress=False)
    one = fxstore.feature_statistics(model, ["fc"], Images(1), progress=False)["fc"]
    with pytest.raises(ConfigError, match="at least 2"):
        fxstore.frechet_distance(one, one)


def test_an_interrupted_run_resumes_and_equals_one_run(tmp_path):
    model, ckpt = toy_cnn().eval(), tmp_path / "run.ckpt"
    kw = dict(reduce="avg", batch_size=4, shard_size=8, top_k=3, checkpoint=ckpt, progress=False, data_name="images")
    with pytest.raises(RuntimeError, match="interrupted"):
        fxstore.feature_statistics(model, ["relu2"], FailsAt(30, bad=19), **kw)
    read: list[int] = []

    class Counted(Images):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    resumed = fxstore.feature_statistics(model, ["relu2"], Counted(30), **kw)["relu2"]
    # shards 0-1 came from the checkpoint: their samples are read once, to check their digest, and not computed
    # (0-1 once more: the probe batch); shards 2-3 are read once, to compute them
    assert [read.count(i) for i in range(30)] == [2, 2] + [1] * 28
    once = fxstore.feature_statistics(model, ["relu2"], Images(30), reduce="avg", batch_size=4, shard_size=8,
                                      top_k=3, progress=False)["relu2"]
    for field in ("mean", "cov", "fired", "top_values", "top_indices"):
        torch.testing.assert_close(getattr(resumed, field), getattr(once, field), rtol=1e-12, atol=1e-12)
    class Changed(Images):  # sample 25 (the last kept shard) differs; the first batch and the length do not
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x + 1 if i == 25 else x), y

    with pytest.raises(OutputError, match=r"inputs of shard 3 \(samples 24-29\) differ"):
        fxstore.feature_statistics(model, ["relu2"], Changed(30), **kw)
    with pytest.raises(OutputError, match=r"another run \(.*num_samples: 30 then, 31 now"):
        fxstore.feature_statistics(model, ["relu2"], Images(31), **kw)
    with pytest.raises(OutputError, match="top_k: 3 then, 4 now"):
        fxstore.feature_statistics(model, ["relu2"], Images(30), **{**kw, "top_k": 4})


def test_compiled_equals_eager():
    model, data = toy_cnn().eval(), Images(12)
    eager, compiled = (fxstore.feature_statistics(model, ["fc"], data, batch_size=4, top_k=2, progress=False,
                                                  compile=c)["fc"] for c in (False, "aot_eager"))
    torch.testing.assert_close(compiled.cov, eager.cov, rtol=1e-6, atol=1e-12)
    assert torch.equal(compiled.top_indices, eager.top_indices)


def _stats_args(out: Path, samples: int = 40) -> list[str]:
    return ["stats", "dataset_helpers:toy_cnn", "--layers", "relu2", "fc", "--pool", "avg", "--data", f"fake:{samples}",
            "--image-size", "16", "--batch-size", "4", "--shard-size", "8", "--top-k", "3", "--out", str(out)]


@pytest.mark.parametrize("samples", [40, 6])  # 6: one shard, so rank 1 computes nothing and adds nothing
def test_cli_torchrun_two_processes_equal_one(tmp_path, monkeypatch, samples):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fxstore", *_stats_args(tmp_path / "two.safetensors", samples)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"wrote the statistics of {samples} rows") == 1
    monkeypatch.syspath_prepend(str(HELPERS))
    assert main([*_stats_args(tmp_path / "one.safetensors", samples), "--quiet"]) == 0
    for layer in ("relu2", "fc"):
        two = fxstore.FeatureStatistics.load(tmp_path / "two.safetensors", layer)
        one = fxstore.FeatureStatistics.load(tmp_path / "one.safetensors", layer)
        assert two.count == one.count == samples
        torch.testing.assert_close(two.cov, one.cov, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(two.mean, one.mean, rtol=1e-12, atol=1e-14)
        assert torch.equal(two.top_values, one.top_values) and torch.equal(two.top_indices, one.top_indices)
        assert torch.equal(two.fired, one.fired)


def test_cli_fid_of_two_files_and_of_a_file_and_data(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(HELPERS))
    for name, samples in (("a", 40), ("b", 24)):
        assert main([*_stats_args(tmp_path / f"{name}.safetensors", samples), "--quiet"]) == 0
    a = fxstore.FeatureStatistics.load(tmp_path / "a.safetensors", "fc")
    b = fxstore.feature_statistics(load_model("dataset_helpers:toy_cnn"), ["fc"], open_source("fake:24", 16),
                                   progress=False)["fc"]
    capsys.readouterr()
    assert main(["fid", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--layer", "fc"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(fxstore.frechet_distance(a, b), abs=2e-6)
    assert main(["fid", str(tmp_path / "a.safetensors"), "fake:24", "--layer", "fc", "--image-size", "16",
                 "-q"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(fxstore.frechet_distance(a, b), abs=2e-6)
    assert main(["fid", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    assert "--layer" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "a.safetensors"), "fake:24", "--layer", "fc", "--image-size", "16",
                 "--seed", "1", "-q"]) == 1  # other weights than A's model: refused
    assert "not the one" in capsys.readouterr().err


def test_skip_special_rows_equal_extract_dataset_rows(tmp_path):
    import transformers

    folder = save("bert", tmp_path / "bert")  # [CLS] ... [SEP] around every document, a pad token
    model, tok = transformers.BertModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    docs, layer = corpus(7), BLOCKS["bert"].format(1)
    s = fxstore.feature_statistics(model, [layer], docs, tokenizer=tok, batch_size=3, skip_special=True, top_k=2,
                                   progress=False)[layer]
    fxstore.extract_dataset(model, [layer], docs, tmp_path / "rows", tokenizer=tok, batch_size=3, skip_special=True,
                            progress=False)
    dense = fxstore.load_features(tmp_path / "rows")
    rows = np.asarray(dense[layer])
    assert s.count == len(rows) == sum(len(d.split()) for d in docs)  # no [CLS]/[SEP] row
    _check_moments(s, rows)
    _, order = _brute_top(rows.astype(np.float64), 2)
    np.testing.assert_array_equal(s.top_indices.numpy(), np.asarray(dense["sequence"])[order])
    np.testing.assert_array_equal(s.top_positions.numpy(), np.asarray(dense["position"])[order])


def test_cli_stats_of_a_language_model_equals_the_library(tmp_path, capsys):
    import transformers

    folder = save("gpt2", tmp_path / "gpt2")
    docs = corpus(6)
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    layer = BLOCKS["gpt2"].format(1)
    assert main(["stats", f"hf:{folder}", "--layers", layer, "--data", str(tmp_path / "docs.txt"), "--top-k", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "s.safetensors"), "-q"]) == 0
    cli = fxstore.FeatureStatistics.load(tmp_path / "s.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    lib = fxstore.feature_statistics(model, [layer], docs, tokenizer=tok, batch_size=4, top_k=2, progress=False)[layer]
    assert cli.count == lib.count and cli.identity["data"]["text"]["tokens"] == lib.identity["data"]["text"]["tokens"]
    torch.testing.assert_close(cli.cov, lib.cov, rtol=1e-12, atol=1e-14)
    assert torch.equal(cli.top_positions, lib.top_positions)
    assert main(["stats", f"hf:{folder}", "--layers", layer, "--data", str(tmp_path / "docs.txt"), "--pool", "avg",
                 "--out", str(tmp_path / "x.safetensors"), "-q"]) == 1
    assert "--pool" in capsys.readouterr().err


def test_repeated_calls_build_and_compile_once_and_stay_exact(tmp_path):
    """A model seen before is neither traced, self-checked nor compiled again (``build_cache``), and the
    second call's statistics are those of the model's current weights (changed in place in between)."""
    from torch._dynamo.utils import counters

    from fxstore.capture import build_cache

    model, data = toy_cnn().eval(), Images(13)
    kw = dict(reduce="avg", batch_size=4, top_k=3, progress=False, compile="aot_eager")
    fxstore.feature_statistics(model, ["relu2", "fc"], data, **kw)
    builds, graphs = build_cache.builds, counters["stats"]["unique_graphs"]
    with torch.no_grad():
        model.fc.weight.mul_(-2.0)  # in place: the cached program reads the weights when it runs
    stats = fxstore.feature_statistics(model, ["relu2", "fc"], data, **kw)
    assert (build_cache.builds, counters["stats"]["unique_graphs"]) == (builds, graphs)
    dense = _dense(model, ["relu2", "fc"], data, tmp_path, reduce="avg", batch_size=4)
    for key in ("relu2", "fc"):
        _check_moments(stats[key], dense[key])
        values, indices = _brute_top(dense[key].astype(np.float64), 3)
        np.testing.assert_array_equal(stats[key].top_values.numpy(), values)
        np.testing.assert_array_equal(stats[key].top_indices.numpy(), indices)


def test_compiled_token_rows_take_the_mask_as_an_input(tmp_path):
    """Token rows reduced inside the compiled step (the padding mask an input): batches padded differently
    give the rows ``extract_dataset`` writes, and a second call compiles nothing new."""
    from torch._dynamo.utils import counters

    folder = save("gpt2", tmp_path / "gpt2")
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    docs, layer = corpus(11), BLOCKS["gpt2"].format(1)
    kw = dict(tokenizer=tok, batch_size=4, top_k=2, progress=False)
    first = fxstore.feature_statistics(model, [layer], docs, compile="aot_eager", **kw)[layer]
    graphs = counters["stats"]["unique_graphs"]
    again = fxstore.feature_statistics(model, [layer], docs, compile="aot_eager", **kw)[layer]
    assert counters["stats"]["unique_graphs"] == graphs
    dense = _dense(model, [layer], docs, tmp_path, tokenizer=tok, batch_size=4)[layer]
    for s in (first, again):
        _check_moments(s, dense)
        values, _ = _brute_top(dense.astype(np.float64), 2)
        np.testing.assert_array_equal(s.top_values.numpy(), values)


def test_a_step_built_before_takes_rows_of_another_width(tmp_path):
    """The cached, compiled step on data whose rows are wider (``reduce="flatten"`` of larger images): the
    accumulators follow the data, the moments equal numpy's."""
    model = toy_cnn().eval()
    kw = dict(reduce="flatten", batch_size=4)
    fxstore.feature_statistics(model, ["relu2"], Images(9, size=16), compile="aot_eager", progress=False, **kw)
    wide = Images(9, size=24)
    s = fxstore.feature_statistics(model, ["relu2"], wide, compile="aot_eager", progress=False, **kw)["relu2"]
    assert s.mean.shape == (2304,)
    _check_moments(s, _dense(model, ["relu2"], wide, tmp_path, **kw)["relu2"])
