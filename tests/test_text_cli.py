"""``fxstore extract hf:DIR`` on text files; shuffle, loader, resume after SIGKILL, torchrun ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import kill_when, shard_bytes
from text_helpers import corpus, run_extraction, save

import fxstore
from fxstore.cli import main
from fxstore.cli.hf import load_hf
from fxstore.cli.sources import open_text_source

HELPERS = Path(__file__).parent
LAYERS = ["transformer.h.0", "transformer.h.1"]


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return save("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def extractor(gpt2):
    """One extractor for the repeated runs: its exported graph serves them all."""
    model, tok = load_hf(gpt2)
    return fxstore.FeatureExtractor(model, LAYERS, keep_output=False), tok


def rows(out):
    return {k: np.asarray(v[:].float() if isinstance(v[:0], torch.Tensor) else v[:])
            for k, v in fxstore.load_features(out).items()}


def write_sources(folder: Path, docs: list[str]) -> dict[str, Path]:
    import datasets

    table = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    paths = {"txt": folder / "docs.txt", "jsonl": folder / "docs.jsonl", "parquet": folder / "docs.parquet",
             "datasets": folder / "saved"}
    paths["txt"].write_text("".join(d + "\n\n" for d in docs))  # blank lines are not documents
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    table.to_parquet(str(paths["parquet"]))
    table.save_to_disk(str(paths["datasets"]))
    return paths


def test_every_text_source_reads_the_same_documents(tmp_path):
    docs = corpus(7)
    for kind, path in write_sources(tmp_path, docs).items():
        data = open_text_source(path)
        assert (data if kind == "txt" else list(data["text"])) == docs, kind


def test_cli_extract_equals_the_python_api(gpt2, extractor, tmp_path, capsys):
    docs = corpus(10)
    source = write_sources(tmp_path, docs)["jsonl"]
    status = main(["extract", f"hf:{gpt2}", "--layers", *LAYERS, "--data", str(source), "--text-field", "text",
                   "--max-length", "8", "--dtype", "bfloat16", "--out", str(tmp_path / "cli")])
    assert status == 0
    assert "token rows of 10 sequences" in capsys.readouterr().out
    model, tok = load_hf(gpt2)
    fxstore.extract_dataset(model, LAYERS, docs, tmp_path / "api", tokenizer=tok, max_length=8, dtype="bfloat16",
                            progress=False)
    cli, api = rows(tmp_path / "cli"), rows(tmp_path / "api")
    assert cli.keys() == api.keys() and all(np.array_equal(cli[k], api[k]) for k in api)
    manifest = fxstore.read_manifest(tmp_path / "cli")
    assert manifest["text"]["max_length"] == 8 and manifest["command"].startswith("fxstore extract hf:")


@pytest.mark.parametrize("case, message", [
    ("field", "no text field 'body'; its fields are ['id', 'text']"),
    ("empty", "document 1 is empty"),
    ("tokenizer", "holds no tokenizer"),
    ("layer", "transformer.h.7"),
])
def test_bad_inputs_print_one_line(case, message, gpt2, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    texts = ["a cat", "", "a dog"] if case == "empty" else ["a cat", "a dog"]
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    folder = gpt2
    if case == "tokenizer":
        folder = tmp_path / "bare"
        save("gpt2", folder, with_tokenizer=False)
    args = ["extract", f"hf:{folder}", "--layers", "transformer.h.7" if case == "layer" else "transformer.h.0",
            "--data", str(source), "--out", str(tmp_path / "out"), "-q"]
    if case == "field":
        args += ["--text-field", "body"]
    capsys.readouterr()  # drop what saving the model printed
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fxstore extract: error:") and message in err, err


def test_shuffle_is_a_deterministic_permutation(extractor, tmp_path):
    ex, tok = extractor
    docs = corpus(30)
    for name, seed in (("plain", None), ("a", 3), ("b", 3), ("c", 4)):
        fxstore.extract_dataset(ex, None, docs, tmp_path / name, tokenizer=tok, shuffle=seed, shard_size=50,
                                batch_size=4, progress=False)
    plain, a, c = rows(tmp_path / "plain"), rows(tmp_path / "a"), rows(tmp_path / "c")
    assert ex.trace_report.frontend == "export"  # one exported graph served every run
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")  # deterministic
    assert not (tmp_path / "a" / ".fxstore-unshuffled.partial").exists()
    assert len(fxstore.read_manifest(tmp_path / "a")["shards"]) == -(-len(plain["token_id"]) // 50)
    order = np.lexsort((a["position"], a["sequence"]))
    assert all(np.array_equal(a[k][order], plain[k]) for k in plain)  # a permutation of the same rows
    assert not np.array_equal(a["sequence"], plain["sequence"]) and not np.array_equal(a["sequence"], c["sequence"])
    # mixed across the whole dataset: the first shard holds rows of most documents
    assert len(set(a["sequence"][:50].tolist())) > 15


def test_batch_loader_streams_every_row_once_per_epoch(extractor, tmp_path):
    ex, tok = extractor
    fxstore.extract_dataset(ex, None, corpus(30), tmp_path, tokenizer=tok, shard_size=40, progress=False)
    plain = rows(tmp_path)
    loader = fxstore.BatchLoader(tmp_path, batch_size=32, keys=["transformer.h.1", "sequence", "position"],
                                 seed=1, buffer_shards=2)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(b["sequence"]) == 32 for b in batches[:-1])
        got = {k: torch.cat([b[k] for b in batches]).numpy() for k in batches[0]}
        order = np.lexsort((got["position"], got["sequence"]))
        assert np.array_equal(got["transformer.h.1"][order], plain["transformer.h.1"])
        epochs.append(got["sequence"])
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], plain["sequence"])


def _kill_after_two_shards(folder: Path, out: Path, shuffle: int | None) -> None:
    watched = out / ".fxstore-unshuffled.partial" if shuffle is not None else out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(HELPERS.parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(HELPERS / "text_helpers.py"), str(folder), str(out), "0.3",
                             "-" if shuffle is None else str(shuffle)], env=env)
    kill_when(proc, lambda: len(list(watched.glob("shard-*.safetensors"))) >= 2, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [0])  # killed while writing the unshuffled rows; both phases then resume
def test_killed_run_resumes_to_identical_bytes(gpt2, tmp_path, shuffle):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _kill_after_two_shards(gpt2, killed, shuffle)
    assert not (killed / "manifest.json").exists()
    resumed = run_extraction(str(gpt2), str(killed), shuffle=shuffle)
    uninterrupted = run_extraction(str(gpt2), str(clean), shuffle=shuffle)
    assert shard_bytes(killed) == shard_bytes(clean)
    assert len(resumed["shards"]) > 3
    assert {k: v for k, v in resumed.items() if k != "command"} == {
        k: v for k, v in uninterrupted.items() if k != "command"}


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(gpt2, tmp_path):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(corpus(40)) + "\n")

    def args(out):
        return ["extract", f"hf:{gpt2}", "--layers", "transformer.h.1", "--data", str(source), "--shuffle", "5",
                "--batch-size", "4", "--shard-size", "40", "--out", str(out)]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parent), *sys.path]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fxstore", *args(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("token rows of 40 sequences") == 1  # rank 0 reports
    assert "rank 0/2" in run.stderr and "tok/s" in run.stderr
    assert main([*args(tmp_path / "one"), "--quiet"]) == 0
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
