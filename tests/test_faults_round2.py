"""Fault campaign, round two (issue 18): ownership that cannot be faked, data identity that sees content,
manifests checked against the run identity, shards that name their place, stuck folders, bounded reads.

Each test is one scenario of the "Nothing lost" table of docs/datasets.md, with the outcome it measures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import (
    FAULT_SAMPLES,
    LAYERS,
    FailsAt,
    Images,
    assert_identical,
    reference_runs,
    shard_bytes,
    toy_model,
)
from dataset_helpers import fault_run as run
from dataset_helpers import finished_copy as finished
from dataset_helpers import folder_entries as snapshot

import fxstore
from fxstore import ConfigError
from fxstore.dataset import extract_dataset
from fxstore.dataset.reader import load_features
from fxstore.errors import OutputError

FORMATS = ["safetensors", "npy"]
N = FAULT_SAMPLES


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The folder and data files of an uninterrupted run, per format; the model's own fc rows."""
    return reference_runs(tmp_path_factory)


def refused_untouched(folder: Path, fmt: str, match: str, **options) -> OutputError:
    """Run into ``folder``, expect an ``OutputError`` matching ``match``, and check nothing in it changed."""
    before = snapshot(folder)
    with pytest.raises(OutputError, match=match) as error:
        run(folder, fmt, **options)
    assert snapshot(folder) == before
    return error.value


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked read (a FIFO) raises after 20 s."""
    def timeout(*_):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- 1-3: user files are never claimed -----------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("format", "name"), [("safetensors", "shard-00042.safetensors"), ("npy", ".fc.npy.partial")],
                         ids=["shard-past-the-manifest", "npy-partial"])
def test_a_user_file_with_an_fxstore_name_is_never_deleted(tmp_path, reference, overwrite, format, name):
    out = finished(tmp_path, format, reference)
    (out / name).write_text("mine\n")
    refused_untouched(out, format, rf"did not write \({re.escape(name)}\)", overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name", ["manifest.json", ".fxstore-files.json"])
def test_a_copied_manifest_does_not_claim_the_users_npy_files(tmp_path, reference, overwrite, name):
    shutil.copy(reference["npy"][0] / "manifest.json", tmp_path / name)
    np.save(tmp_path / "target.npy", np.arange(5))
    np.save(tmp_path / "fc.npy", np.ones((3, 3), dtype=np.float32))
    refused_untouched(tmp_path, "npy", r"did not write \(fc.npy; target.npy\)", overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_hand_written_run_record_naming_user_files_is_refused(tmp_path, reference, overwrite):
    identity = json.loads((reference["safetensors"][0] / "manifest.json").read_text())["identity"]
    (tmp_path / ".fxstore-run.json").write_text(json.dumps({"fxstore_run": 1, "identity": identity,
                                                            "files": ["notes.txt", "thesis.tex"]}))
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "thesis.tex").write_text("\\documentclass{article}")
    error = refused_untouched(tmp_path, "safetensors", r"\.fxstore-run\.json \(not an fxstore run record.*notes.txt; "
                              r"thesis.tex\).*\nHint: move those files away", overwrite=overwrite)
    assert "overwrite=True" not in str(error)  # the refusal does not suggest deleting


def test_a_shard_replaced_by_a_user_file_of_another_size_is_refused_not_repaired(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    (out / "shard-00001.safetensors").write_text("my own file, not a shard")
    refused_untouched(out, "safetensors", r"did not write \(shard-00001.safetensors\)")


# -- 4: links, FIFOs and probe/lock names ------------------------------------------------------------


@pytest.mark.parametrize("name", [".fxstore-probe", ".fxstore-run.json.fxstore-tmp", ".manifest.json.fxstore-tmp",
                                  ".shard-00000.safetensors.fxstore-tmp", "shard-00000.safetensors",
                                  ".fxstore-progress", "manifest.json", ".fxstore-run.json"])
def test_a_symlink_at_an_fxstore_name_is_never_followed_nor_deleted(tmp_path, name):
    out, outside = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("keep me")
    (out / name).symlink_to(outside)
    with pytest.raises(OutputError, match="in the way|did not write|not readable JSON"):
        run(out, "safetensors")
    assert outside.read_text() == "keep me" and (out / name).is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [name]  # a refused run leaves nothing behind


def test_a_lock_file_symlink_is_never_written_through_nor_deleted(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("keep me")
    (out / ".fxstore-lock").symlink_to(outside)
    with pytest.raises(OutputError, match="is not an fxstore lock file .*does not open, follow or delete it"):
        run(out, "safetensors")
    assert outside.read_text() == "keep me" and (out / ".fxstore-lock").is_symlink()


def test_a_user_probe_file_and_an_empty_lock_file_survive_a_refused_run(tmp_path):
    (tmp_path / ".fxstore-probe").write_text("mine")
    with pytest.raises(OutputError, match=r"\.fxstore-probe' is in the way"):
        run(tmp_path, "safetensors")
    assert (tmp_path / ".fxstore-probe").read_text() == "mine"
    (tmp_path / ".fxstore-probe").unlink()
    (tmp_path / ".fxstore-lock").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        run(tmp_path, "safetensors")
    assert (tmp_path / ".fxstore-lock").read_text() == "" and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["manifest.json", ".fxstore-run.json", ".fxstore-lock", ".fxstore-progress/00000"])
def test_a_fifo_at_an_fxstore_name_is_refused_without_blocking(tmp_path, alarm, name):
    if name.startswith(".fxstore-progress"):
        with pytest.raises(RuntimeError, match="interrupted"):
            run(tmp_path, "safetensors", data=FailsAt(N, bad=19))
        (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    with pytest.raises(OutputError, match="not an fxstore lock file|did not write"):
        run(tmp_path, "safetensors")
    assert (tmp_path / name).exists()


def test_a_manifest_linked_to_dev_zero_or_nested_deeply_or_huge_gives_an_fxstore_error(tmp_path, alarm):
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.json"
    manifest.symlink_to("/dev/zero")
    with pytest.raises(OutputError, match="not a valid fxstore manifest: not readable JSON"):
        load_features(out)
    manifest.unlink()
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OutputError, match="not a valid fxstore manifest: not readable JSON.*nested deeper"):
        load_features(out)
    with pytest.raises(OutputError, match="did not write .*manifest.json"):
        run(out, "safetensors")
    manifest.unlink()
    with open(manifest, "wb") as f:  # sparse: 300 MB that are never read
        f.truncate(300 << 20)
    with pytest.raises(OutputError, match="more than the .* fxstore reads"):
        load_features(out)


# -- 5-6: data identity that sees content --------------------------------------------------------------


def _shifted(n: int, changed: set[int]):
    """A dataset named ``Images``, of the same length, whose samples ``changed`` differ."""
    class Images(FailsAt):  # noqa: D101 - the same class name and length as the first run's data
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x + 1.0 if i in changed else x), y
    return Images(n, bad=-1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("changed", [{0}, {12}], ids=["first-kept-shard", "last-kept-shard"])
def test_other_data_of_the_same_class_and_length_is_refused_on_resume(tmp_path, fmt, changed):
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, fmt, data=FailsAt(N, bad=19))  # shards 0 and 1 kept
    with pytest.raises(OutputError, match=r"the inputs of shard (0|1) \(samples (0-7|8-15)\) differ"):
        run(tmp_path, fmt, data=_shifted(N, changed))
    run(tmp_path, fmt)  # the original data still resumes
    load_features(tmp_path, verify=True)


def test_other_data_is_refused_on_a_finished_folder_too(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    with pytest.raises(OutputError, match=r"the inputs of shard 2 \(samples 16-23\) differ"):
        run(out, "safetensors", data=_shifted(N, {20}))


def test_a_change_in_a_middle_kept_shard_is_not_detected_a_documented_limit(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, "safetensors", data=FailsAt(40, bad=39))  # shards 0-3 kept; only 0 and 3 are read again
    run(tmp_path, "safetensors", data=_shifted(40, {12}))  # shard 1 changed: resumed without noticing
    assert load_features(tmp_path, verify=True)["fc"].shape == (40, 10)


# -- 7-8: manifests checked against the identity, shards that name their place ------------------------


def _edit(out: Path, change) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _drop_last(m):
    m["num_samples"] -= m["shards"].pop()["count"]


def _no_shards(m):
    m["shards"], m["num_samples"] = [], 0


def _no_target(m):
    m["target"] = None
    for s in m["shards"]:
        if isinstance(s["sha256"], dict):
            s["sha256"].pop("target")


LOST_ROWS = [("drop-last-shard", _drop_last, "lists 16 samples, its run identity 24"),
             ("no-shards", _no_shards, "lists 0 samples, its run identity 24"),
             ("no-target", _no_target, "drops the target of its run identity")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("how", "change", "match"), LOST_ROWS, ids=[h for h, _, _ in LOST_ROWS])
def test_a_manifest_that_lost_rows_or_the_target_is_refused_then_repaired(tmp_path, reference, fmt, how, change,
                                                                            match):
    out = finished(tmp_path, fmt, reference)
    _edit(out, change)
    for verify in (False, True):
        with pytest.raises(OutputError, match=f"does not match its manifest: .*{match}"):
            load_features(out, verify=verify)
    run(out, fmt)  # the same command repairs
    assert_identical(out, fmt, reference)


def test_swapped_shards_are_caught_on_every_load_without_hashing(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    a, b = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(OutputError, match=r"shard-00000.safetensors: its header says shard 1 \(rows from 8"):
        load_features(out)  # verify=False: headers only
    run(out, "safetensors")
    assert_identical(out, "safetensors", reference)


def test_a_shard_of_another_run_is_caught_by_its_header(tmp_path, reference):
    out = finished(tmp_path / "a", "safetensors", reference)
    other = tmp_path / "b"
    model = toy_model()
    with torch.no_grad():
        model.fc.bias += 1  # other weights: another run, shards of the same size and shapes
    extract_dataset(model, LAYERS, Images(N), other, batch_size=4, shard_size=8, progress=False, data_name="Images")
    shutil.copy(other / "shard-00001.safetensors", out / "shard-00001.safetensors")  # same size and shapes
    with pytest.raises(OutputError, match="shard-00001.safetensors: its header names another run"):
        load_features(out)


# -- 9-10: stuck folders, empty selections ---------------------------------------------------------------


def test_a_safetensors_folder_whose_manifest_was_deleted_resumes(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    (out / "manifest.json").unlink()
    with pytest.raises(OutputError, match="run the extraction \\(again: it resumes\\)"):
        load_features(out)
    run(out, "safetensors")
    assert_identical(out, "safetensors", reference)


@pytest.fixture
def npy_writes(monkeypatch):
    """The rows an npy run writes (``NpySink.write`` calls), counted."""
    from fxstore.dataset.formats import NpySink

    rows, write = [], NpySink.write

    def counted(self, shard, start, arrays):
        rows.extend(range(start, start + len(next(iter(arrays.values())))))
        return write(self, shard, start, arrays)

    monkeypatch.setattr(NpySink, "write", counted)
    return rows


def test_an_npy_folder_whose_manifest_was_deleted_is_rebuilt_without_recomputing(tmp_path, reference, npy_writes,
                                                                                  caplog):
    out = finished(tmp_path, "npy", reference)
    (out / "manifest.json").unlink()
    with pytest.raises(OutputError, match=r"it was deleted, and the run's \.fxstore-files\.json can rebuild it.*\n"
                                          r"Hint: run the extraction \(again: it resumes\)"):
        load_features(out)
    with caplog.at_level("WARNING", logger="fxstore"):
        run(out, "npy")
    assert "lost its manifest.json; rebuilding it from .fxstore-files.json" in caplog.text
    assert npy_writes == []  # every row verified against the kept checksums, none computed again
    assert_identical(out, "npy", reference)


def test_an_npy_folder_without_manifest_recomputes_only_the_damaged_rows(tmp_path, reference, npy_writes):
    out = finished(tmp_path, "npy", reference)
    (out / "manifest.json").unlink()
    data = bytearray((out / "fc.npy").read_bytes())
    data[-8:] = b"\xff" * 8  # the last row of the last shard
    (out / "fc.npy").write_bytes(bytes(data))
    run(out, "npy")
    assert npy_writes == list(range(16, N))  # only shard 2 (rows 16-23) computed again
    assert_identical(out, "npy", reference)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_npy_folder_that_lost_its_manifest_and_its_copy_is_refused_a_documented_limit(tmp_path, reference,
                                                                                         overwrite):
    out = finished(tmp_path, "npy", reference)
    (out / "manifest.json").unlink()
    (out / ".fxstore-files.json").unlink()
    refused_untouched(out, "npy", r"did not write \(fc.npy; conv1.npy|did not write \(conv1.npy", overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_kept_copy_that_is_not_a_manifest_is_refused(tmp_path, reference, overwrite):
    out = finished(tmp_path, "npy", reference)
    (out / ".fxstore-files.json").write_text('{"fxstore_manifest": 2, "mine": true}\n')
    refused_untouched(out, "npy", r"did not write \(\.fxstore-files\.json \(not a copy of an fxstore "
                                       r"manifest: format None", overwrite=overwrite)


@pytest.mark.parametrize("layers", [[], None, (), {}, ""])
def test_an_empty_layer_selection_is_refused_before_any_work(tmp_path, layers):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="selects no layer"):
        extract_dataset(toy_model(), layers, Images(4), out, progress=False)
    assert not out.exists()


# -- 11: messages -------------------------------------------------------------------------------------


def test_messages_for_a_missing_folder_a_file_as_folder_and_a_very_long_name(tmp_path):
    with pytest.raises(OutputError, match="'.*nosuch' does not exist") as error:
        load_features(tmp_path / "nosuch")
    assert "resume" not in str(error.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder") as error:
        run(tmp_path / "file", "safetensors")
    assert "resume" not in str(error.value)
    with pytest.raises(OutputError) as error:
        run(tmp_path / ("x" * 100_000), "safetensors")
    assert len(str(error.value)) < 1000 and "characters" in str(error.value)


# -- text: content digest ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from text_helpers import save

    return save("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from fxstore.cli.hf import load_hf

    return load_hf(gpt2_dir)


def test_cli_text_file_edited_keeping_its_token_count_is_refused(gpt2_dir, tmp_path, capsys):
    from text_helpers import corpus

    from fxstore.cli import main

    docs, out = tmp_path / "docs.txt", tmp_path / "out"
    docs.write_text("\n".join(corpus(20)) + "\n")
    args = ["extract", f"hf:{gpt2_dir}", "--layers", "transformer.h.1", "--data", str(docs), "--batch-size", "4",
            "--shard-size", "40", "--out", str(out), "--quiet"]
    assert main(args) == 0
    original = docs.read_text()
    docs.write_text(original.replace("cat", "dog"))  # same path, same token count, other words
    capsys.readouterr()
    assert main(args) == 1
    assert "data: its tokens differ" in capsys.readouterr().err
    docs.write_text(original)
    assert main(args) == 0


@pytest.mark.parametrize("shuffle", [None, 3])
def test_text_edited_between_a_crash_and_the_resume_is_refused(tmp_path, gpt2, monkeypatch, shuffle):
    from text_helpers import corpus

    from fxstore.dataset.formats import safetensors as _sinks

    model, tok = gpt2
    docs = corpus(30)
    finish, calls = _sinks.SafetensorsSink.finish, []

    def dies_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        finish(self, *args, **kwargs)

    options = dict(tokenizer=tok, shard_size=40, batch_size=4, shuffle=shuffle, progress=False, data_name="docs.txt")
    out, clean = tmp_path / "out", tmp_path / "clean"
    with monkeypatch.context() as m:
        m.setattr(_sinks.SafetensorsSink, "finish", dies_at_the_third)
        with pytest.raises(RuntimeError, match="killed"):
            extract_dataset(model, ["transformer.h.1"], docs, out, **options)
    edited = [d.replace("cat", "dog") for d in docs]  # other words, the same token count
    assert edited != docs
    with pytest.raises(OutputError, match="data: its tokens differ .*the text was changed"):
        extract_dataset(model, ["transformer.h.1"], edited, out, **options)
    extract_dataset(model, ["transformer.h.1"], docs, out, **options)
    extract_dataset(model, ["transformer.h.1"], docs, clean, **options)
    assert shard_bytes(out) == shard_bytes(clean)


def test_a_kill_while_the_staging_folder_is_removed_resumes(tmp_path, gpt2, monkeypatch):
    from text_helpers import corpus

    from fxstore.dataset import _text

    model, tok = gpt2
    options = dict(tokenizer=tok, shard_size=40, batch_size=4, shuffle=1, progress=False)
    out, clean = tmp_path / "out", tmp_path / "clean"
    remove = _text.remove_staging

    def half(staging):  # what a kill midway leaves: the manifest and some shards gone, the marker still there
        (staging / "manifest.json").unlink()
        next(staging.glob("shard-*.safetensors")).unlink()
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(_text, "remove_staging", half)
        with pytest.raises(RuntimeError, match="killed"):
            extract_dataset(model, ["transformer.h.1"], corpus(30), out, **options)
    assert (out / ".fxstore-unshuffled.partial" / ".fxstore-staging").exists()
    assert remove is _text.remove_staging
    extract_dataset(model, ["transformer.h.1"], corpus(30), out, **options)
    assert not (out / ".fxstore-unshuffled.partial").exists()
    extract_dataset(model, ["transformer.h.1"], corpus(30), clean, **options)
    assert shard_bytes(out) == shard_bytes(clean)
    assert fxstore.load_features(out, verify=True)["token_id"].shape[0] > 0


def test_inputs_are_recorded_per_shard_in_the_manifest(tmp_path):
    m = run(tmp_path, "safetensors")
    assert all(s["inputs"].startswith("sha256:") for s in m["shards"])
    assert len({s["inputs"] for s in m["shards"]}) == len(m["shards"])
    torch.testing.assert_close(torch.as_tensor(load_features(tmp_path)["fc"][:2]),
                               toy_model()(torch.stack([Images(2)[i][0] for i in range(2)])).detach())


def test_a_repair_of_many_shards_logs_one_short_line(tmp_path, caplog):
    m = extract_dataset(toy_model(), ["fc"], Images(24), tmp_path, batch_size=2, shard_size=2, progress=False)
    for s in m["shards"]:
        path = tmp_path / s["file"]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    extract_dataset(toy_model(), ["fc"], Images(24), tmp_path, batch_size=2, shard_size=2, progress=False)
    line = next(r.getMessage() for r in caplog.records if "repairing" in r.getMessage())
    assert line.count("checksum mismatch") == 8 and line.endswith("; ... and 4 more")
    load_features(tmp_path, verify=True)


def _loader(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=4)


@pytest.mark.parametrize("changed", [{0}, {12}], ids=["first-kept-shard", "last-kept-shard"])
def test_a_dataloader_of_other_data_is_refused_before_new_shards_are_written(tmp_path, changed):
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, "safetensors", data=_loader(FailsAt(N, bad=23)))  # shards 0 and 1 kept
    with pytest.raises(OutputError, match=r"the inputs of shard (0|1) \(samples (0-7|8-15)\) differ"):
        run(tmp_path, "safetensors", data=_loader(_shifted(N, changed)))
    assert not (tmp_path / "shard-00002.safetensors").exists()  # refused before any new shard
    run(tmp_path, "safetensors", data=_loader(Images(N)))
    load_features(tmp_path, verify=True)
