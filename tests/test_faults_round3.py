"""Fault campaign, round three (issue 27): the readers keep the writer's promises.

``load_features``, its lazy arrays and ``BatchLoader`` read through one path that checks each file as it
opens it; a folder rewritten under a reader is refused, never mixed in; damage fxstore can recognise is
repaired; kill points and refused runs leave nothing behind and delete nothing; messages stay short.
Each test is one scenario of the "Nothing lost" table of docs/datasets.md; the reference is an uninterrupted run of
the same extraction, and the rows a reader returns are compared with the model's own forward pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import (
    FAULT_SAMPLES,
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
from torch.utils.data import DataLoader

from fxstore.dataset import BatchLoader, extract_dataset, load_features
from fxstore.errors import OutputError

FORMATS = ["safetensors", "npy"]
N = FAULT_SAMPLES


def other_model() -> torch.nn.Module:
    """Other weights: another run whose shards have the same sizes and shapes."""
    model = toy_model()
    with torch.no_grad():
        model.fc.bias += 1
    return model


def shifted(n: int = N):
    """A dataset of the same class name and length whose every sample differs: a sibling run (same identity)."""
    class Images(FailsAt):  # noqa: D101 - the name the first run's data has
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + 1.0, y
    return Images(n, bad=-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The folder and data files of an uninterrupted run, per format; the model's own fc rows."""
    return reference_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def sibling(tmp_path_factory):
    """The same extraction over other data of the same name and length (same run identity, other inputs)."""
    out = tmp_path_factory.mktemp("sibling")
    run(out, "safetensors", data=shifted())
    return out


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def batches(out: Path, shuffle: bool, workers: int) -> list[dict[str, torch.Tensor]]:
    loader = BatchLoader(out, batch_size=5, shuffle=shuffle, seed=1)
    return list(DataLoader(loader, batch_size=None, num_workers=workers))


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked open or read (a FIFO) raises after 20 s."""
    def timeout(*_):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


LOADERS = [(False, 0), (True, 0), (True, 2)]
LOADER_IDS = ["in-order", "shuffled", "shuffled-2-workers"]
# A DataLoader whose worker raised takes 2 x 5 s to shut its workers down (torch's MP_STATUS_CHECK_INTERVAL):
# scenarios refused while reading run with workers once each, not in every variant.
READERS = [(False, 0), (True, 0)]
READER_IDS = ["in-order", "shuffled"]


# -- 1: one read path with the writer's checks ---------------------------------------------------------


def test_the_loader_reads_every_row_of_the_run_exactly(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    for shuffle, workers in LOADERS:
        rows = torch.cat([b["fc"] for b in batches(out, shuffle, workers)]).numpy()
        np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(reference["fc"]))


def _drop_last(out: Path) -> None:
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    m["num_samples"] -= m["shards"].pop()["count"]
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(("shuffle", "workers"), LOADERS, ids=LOADER_IDS)
def test_the_loader_refuses_a_manifest_that_lost_its_last_shard(tmp_path, reference, shuffle, workers):
    out = finished(tmp_path, "safetensors", reference)
    _drop_last(out)
    with pytest.raises(OutputError, match="does not match its manifest: manifest.json lists 16 samples, its run "
                                          "identity 24.*\nHint: run the same extraction again"):
        batches(out, shuffle, workers)
    run(out, "safetensors")  # the same command repairs
    assert_identical(out, "safetensors", reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_features_refuses_a_manifest_that_lost_its_last_shard(tmp_path, reference, fmt):
    out = finished(tmp_path, fmt, reference)
    _drop_last(out)
    with pytest.raises(OutputError, match="lists 16 samples, its run identity 24"):
        load_features(out)


def _swap(out: Path, a: int, b: int) -> None:
    pa, pb = out / f"shard-0000{a}.safetensors", out / f"shard-0000{b}.safetensors"
    data_a, data_b = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(data_b)
    pb.write_bytes(data_a)


@pytest.mark.parametrize(("shuffle", "workers"), LOADERS, ids=LOADER_IDS)
def test_the_loader_refuses_swapped_shards_when_made_and_when_reading(tmp_path, reference, shuffle, workers):
    out = finished(tmp_path, "safetensors", reference)
    _swap(out, 0, 1)
    with pytest.raises(OutputError, match=r"shard-00000.safetensors: its header says shard 1 \(rows from 8"):
        BatchLoader(out, batch_size=5, shuffle=shuffle)
    _swap(out, 0, 1)
    loader = BatchLoader(out, batch_size=5, shuffle=shuffle, seed=1)  # made on the intact folder
    _swap(out, 0, 1)  # then swapped under it
    with pytest.raises(OutputError, match=r"changed since it was opened: shard-0000[01].safetensors is another file"):
        list(DataLoader(loader, batch_size=None, num_workers=workers))


def _copy_sibling_shard(out: Path, sibling: Path) -> None:
    shutil.copy(sibling / "shard-00001.safetensors", out / "shard-00001.safetensors")  # same size and shapes
    assert (out / "shard-00001.safetensors").stat().st_size == (sibling / "shard-00001.safetensors").stat().st_size


@pytest.mark.parametrize(("shuffle", "workers"), LOADERS, ids=LOADER_IDS)
def test_a_shard_of_a_sibling_run_is_refused_by_the_loader(tmp_path, reference, sibling, shuffle, workers):
    out = finished(tmp_path, "safetensors", reference)
    _copy_sibling_shard(out, sibling)
    with pytest.raises(OutputError, match="shard-00001.safetensors: its header records other inputs than the "
                                          "manifest"):
        batches(out, shuffle, workers)


def test_a_shard_of_a_sibling_run_is_refused_by_load_features_without_hashing(tmp_path, reference, sibling):
    out = finished(tmp_path, "safetensors", reference)
    _copy_sibling_shard(out, sibling)
    with pytest.raises(OutputError, match="shard-00001.safetensors: its header records other inputs"):
        load_features(out)  # verify=False: headers only
    run(out, "safetensors")  # the same command repairs (the shard fails its checksum)
    assert_identical(out, "safetensors", reference)


def test_a_sibling_shard_copied_under_an_open_handle_is_refused(tmp_path, reference, sibling):
    out = finished(tmp_path, "safetensors", reference)
    feats = load_features(out)
    np.testing.assert_array_equal(feats["fc"][:8], reference["fc"][:8])  # shard 0 opened
    _copy_sibling_shard(out, sibling)
    with pytest.raises(OutputError, match="shard-00001.safetensors is another file now"):
        feats["fc"][8:16]
    np.testing.assert_array_equal(feats["fc"][:8], reference["fc"][:8])  # what was open stays readable


# -- 2: snapshots: a reader reads the run it opened, or refuses -------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_handle_whose_folder_was_overwritten_refuses_never_mixes(tmp_path, reference, fmt):
    out = finished(tmp_path, fmt, reference)
    feats = load_features(out)
    first = feats["conv1"][:2]  # conv1's file is open (and pinned to the old run) from here on
    run(out, fmt, model=other_model(), overwrite=True)  # another run's rows at the same names
    with pytest.raises(OutputError, match="changed since it was opened: (fc.npy|shard-00001.safetensors) is another "
                                          "file now.*never a mix.*\nHint: open the folder again"):
        feats["fc"][:] if fmt == "npy" else feats["conv1"][8:10]
    np.testing.assert_array_equal(feats["conv1"][:2], first)  # the old run's open file, still the old rows
    fresh = load_features(out)["fc"][:]
    np.testing.assert_array_equal(fresh, other_model()(torch.stack([Images(N)[i][0] for i in range(N)]))
                                  .detach().numpy())


@pytest.mark.parametrize(("shuffle", "workers"), LOADERS, ids=LOADER_IDS)
def test_a_loader_whose_folder_was_overwritten_refuses(tmp_path, reference, shuffle, workers):
    out = finished(tmp_path, "safetensors", reference)
    loader = BatchLoader(out, batch_size=5, shuffle=shuffle)
    run(out, "safetensors", model=other_model(), overwrite=True)
    with pytest.raises(OutputError, match=r"shard-0000\d.safetensors is another file now"):
        list(DataLoader(loader, batch_size=None, num_workers=workers))


def test_a_folder_changed_while_a_load_checks_it_is_refused(tmp_path, reference, sibling, monkeypatch):
    from fxstore.dataset import _snapshot

    out = finished(tmp_path, "safetensors", reference)
    check = _snapshot.check_folder

    def racing(*args, **kwargs):  # another process copies a shard in while the load checks the folder
        problems = check(*args, **kwargs)
        _copy_sibling_shard(out, sibling)
        return problems

    monkeypatch.setattr(_snapshot, "check_folder", racing)
    with pytest.raises(OutputError, match="changed while it was being checked"):
        load_features(out)


def test_a_file_removed_while_verify_reads_it_is_an_fxstore_error(tmp_path, reference, monkeypatch):
    from fxstore.dataset.formats import base

    out = finished(tmp_path, "safetensors", reference)
    digest = base.digest_file

    def removed_first(path, *args):  # another process deletes the shard between its lstat and its read
        Path(path).unlink(missing_ok=True)
        return digest(path, *args)

    monkeypatch.setattr(base, "digest_file", removed_first)
    with pytest.raises(OutputError, match="changed while it was being checked"):
        load_features(out, verify=True)


@pytest.mark.parametrize(("dtype", "shape"), [("float32", (24, 10)), ("float16", (5,)), ("int64", (3, 2, 4)),
                                              ("uint8", (1, 7)), ("float64", (2, 100_000))])
def test_fxstore_npy_headers_are_numpys_with_a_comment_numpy_ignores(tmp_path, dtype, shape):
    from fxstore.dataset.folder.checksums import digest_bytes
    from fxstore.dataset.formats._npy_header import npy_header

    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    run_digest, inputs = digest_bytes(b"a run"), digest_bytes(b"its inputs")
    head = npy_header(array.dtype, shape, run_digest, inputs)
    assert len(head) == len(npy_header(array.dtype, shape, run_digest))  # written in place at the finish
    assert len(head) % 64 == 0 and head.endswith(b"\n") and f"inputs={inputs}".encode() in head
    path = tmp_path / "a.npy"
    path.write_bytes(head + array.tobytes())
    for mmap_mode in (None, "r"):
        loaded = np.load(path, mmap_mode=mmap_mode)
        assert loaded.dtype == array.dtype
        np.testing.assert_array_equal(loaded, array)


def _their_rows(model=None) -> np.ndarray:
    """The fc rows of a sibling run (other data of the same name and length), from the model itself."""
    with torch.no_grad():
        return (toy_model() if model is None else model)(torch.stack([shifted()[i][0] for i in range(N)])).numpy()


def test_an_npy_file_of_a_sibling_run_is_refused_without_hashing_and_repaired(tmp_path, reference):
    out, other = finished(tmp_path / "a", "npy", reference), tmp_path / "b"
    run(other, "npy", data=shifted())
    shutil.copy(other / "fc.npy", out / "fc.npy")  # same identity, shape and size; other inputs
    for mmap_mode in (None, "r"):  # numpy reads fxstore's headers (the run is named in a comment)
        np.testing.assert_array_equal(np.load(out / "fc.npy", mmap_mode=mmap_mode), _their_rows())
    with pytest.raises(OutputError, match=r"fc.npy: its header records other inputs than the manifest.*\n"
                                          "Hint: run the same extraction again"):
        load_features(out)  # verify=False: the header alone
    run(out, "npy")  # its header names this run: fxstore's file, its rows recomputed
    assert_identical(out, "npy", reference)


REWRITES = [("other-data", "records other inputs than the manifest"), ("other-weights", "names another run")]


@pytest.mark.parametrize(("how", "message"), REWRITES, ids=[h for h, _ in REWRITES])
def test_an_npy_file_rewritten_in_place_keeping_its_size_and_time_is_refused_at_the_next_open(tmp_path, reference,
                                                                                               how, message):
    out, other = finished(tmp_path / "a", "npy", reference), tmp_path / "b"
    if how == "other-data":
        run(other, "npy", data=shifted())
    else:
        run(other, "npy", model=other_model())
    feats = load_features(out)
    np.testing.assert_array_equal(feats["relu2"][:], load_features(out, verify=True)["relu2"][:])  # relu2 open
    for name in ("fc.npy", "relu2.npy"):
        path = out / name
        info = path.stat()
        with open(path, "r+b") as f:  # in place: the same inode and size
            f.write((other / name).read_bytes())
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # and the time it had: the pin sees the same file
        assert path.stat().st_ino == info.st_ino and path.stat().st_mtime_ns == info.st_mtime_ns
    with pytest.raises(OutputError, match=f"fc.npy: its header {message}"):
        feats["fc"][N - 1]  # its header names another generation of the folder: never read
    with pytest.raises(OutputError, match=f"its header {message}"):
        load_features(out)


def test_an_npy_file_whose_header_names_no_run_is_refused_and_rewritten(tmp_path, reference):
    out = finished(tmp_path, "npy", reference)
    path = out / "fc.npy"
    data = path.read_bytes()
    offset = 10 + int.from_bytes(data[8:10], "little")
    plain = data[10:offset].split(b"#")[0]  # numpy's own dict literal, without fxstore's comment
    path.write_bytes(data[:10] + plain.ljust(offset - 11) + b"\n" + data[offset:])  # same size and rows
    np.testing.assert_array_equal(np.load(path), reference["fc"])
    with pytest.raises(OutputError, match=r"fc.npy: its header names no fxstore run"):
        load_features(out)
    run(out, "npy")  # every row matches the record: fxstore's rows under a foreign header, rewritten
    assert_identical(out, "npy", reference)


# -- 3: raw errors and hangs become fxstore errors -------------------------------------------------------------


def _replace(path: Path, by: str) -> None:
    path.unlink()
    if by == "directory":
        path.mkdir()
    elif by == "fifo":
        os.mkfifo(path)


BREAKS = [("deleted", "gone"), ("directory", "not a plain file"), ("fifo", "not a plain file")]


@pytest.mark.parametrize(("shuffle", "workers"), READERS, ids=READER_IDS)
@pytest.mark.parametrize(("by", "now"), BREAKS, ids=[b for b, _ in BREAKS])
def test_a_shard_deleted_or_replaced_under_the_loader_is_an_fxstore_error(tmp_path, reference, alarm, by, now,
                                                                          shuffle, workers):
    out = finished(tmp_path, "safetensors", reference)
    loader = BatchLoader(out, batch_size=5, shuffle=shuffle)
    _replace(out / "shard-00002.safetensors", by)
    with pytest.raises(OutputError, match=f"shard-00002.safetensors is {now}"):
        list(DataLoader(loader, batch_size=None, num_workers=workers))
    with pytest.raises(OutputError, match="shard-00002.safetensors: (missing|not a plain file)"):
        BatchLoader(out, batch_size=5)  # and a new loader refuses it when made, without opening it


def test_a_fifo_under_the_loader_with_workers_is_refused_without_hanging(tmp_path, reference, alarm):
    out = finished(tmp_path, "safetensors", reference)
    loader = BatchLoader(out, batch_size=5)
    _replace(out / "shard-00001.safetensors", "fifo")
    with pytest.raises(OutputError, match="shard-00001.safetensors is not a plain file"):
        list(DataLoader(loader, batch_size=None, num_workers=2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("by", "now"), BREAKS, ids=[b for b, _ in BREAKS])
def test_a_file_deleted_or_replaced_under_load_features_is_an_fxstore_error(tmp_path, reference, alarm, fmt, by,
                                                                            now):
    out = finished(tmp_path, fmt, reference)
    feats = load_features(out)
    name = "fc.npy" if fmt == "npy" else "shard-00002.safetensors"
    _replace(out / name, by)
    with pytest.raises(OutputError, match=f"{name} is {now}"):
        feats["fc"][:]
    with pytest.raises(OutputError, match=f"{name}: (missing|not a plain file)"):
        load_features(out)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def dies_in_repair(monkeypatch):
    """Make the next run die after its first recomputed shard, as a kill mid-repair would leave the folder."""
    from fxstore.dataset.formats import NpySink, SafetensorsSink

    def dying(finish):
        def wrapped(self, *args, **kwargs):
            finish(self, *args, **kwargs)
            raise RuntimeError("killed")
        return wrapped

    for sink in (NpySink, SafetensorsSink):
        monkeypatch.setattr(sink, "finish", dying(sink.finish))
    return monkeypatch


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_load_during_a_repair_is_an_fxstore_error_and_an_open_handle_never_mixes(tmp_path, reference, fmt,
                                                                                    dies_in_repair):
    out = finished(tmp_path, fmt, reference)
    damaged = out / ("fc.npy" if fmt == "npy" else "shard-00001.safetensors")
    _flip(damaged, damaged.stat().st_size - 3)  # data bytes: only verify=True sees it
    feats = load_features(out)
    with pytest.raises(RuntimeError, match="killed"):
        run(out, fmt)  # the repair starts, then dies
    with pytest.raises(OutputError, match="holds no finished extraction: a run or a repair of it has not finished") \
            as error:
        load_features(out)
    assert "(no manifest.json)" not in str(error.value)
    with pytest.raises(OutputError, match="changed since it was opened: (fc.npy is gone|shard-00001.safetensors is "
                                          "another file) now"):
        feats["fc"][:]
    dies_in_repair.undo()
    run(out, fmt)  # the same command completes the repair
    assert_identical(out, fmt, reference)


# -- 4: repairable damage is repaired ------------------------------------------------------------------------


def _header_edits():
    return [("bit-flip", lambda h: h.replace(b"descr", b"descs")),
            ("fortran-order", lambda h: h.replace(b"'fortran_order': False", b"'fortran_order': True ")),
            ("shape", lambda h: h.replace(b"(24, 10)", b"(42, 10)"))]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("how", "edit"), _header_edits(), ids=[h for h, _ in _header_edits()])
def test_an_npy_file_whose_header_was_damaged_is_recomputed_by_the_same_command(tmp_path, reference, how, edit,
                                                                              overwrite):
    out = finished(tmp_path, "npy", reference)
    _edit_header(out / "fc.npy", edit)
    with pytest.raises(OutputError, match=r"fc.npy: its header does not say \(24, 10\) float32.*\n"
                                          "Hint: run the same extraction again"):
        load_features(out)
    run(out, "npy", overwrite=overwrite)  # recognised from its record (name, size, row checksums)
    assert_identical(out, "npy", reference)


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    offset = 10 + int.from_bytes(data[8:10], "little")
    header = edit(data[:offset])
    assert len(header) == offset and header != data[:offset]
    path.write_bytes(header + data[offset:])


def _lose_the_run(h: bytes) -> bytes:
    return h.replace(b"descr", b"descs").replace(b"run=", b"rum=")


PARTIAL_EDITS = [*_header_edits(), ("run-named-too", _lose_the_run)]


@pytest.mark.parametrize(("how", "edit"), PARTIAL_EDITS, ids=[h for h, _ in PARTIAL_EDITS])
def test_a_partial_npy_file_whose_header_was_damaged_is_recomputed_by_the_same_command(tmp_path, reference, how,
                                                                                     edit):
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, "npy", data=FailsAt(N, bad=19))  # shards 0 and 1 done, the files still .partial
    _edit_header(tmp_path / ".fc.npy.partial", edit)
    run(tmp_path, "npy")  # recognised from its size and the run its comment names, or the rows its markers record
    assert_identical(tmp_path, "npy", reference)


def test_a_damaged_partial_npy_file_of_a_run_that_finished_no_shard_is_refused_untouched_a_documented_limit(
        tmp_path, reference):
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, "npy", data=FailsAt(N, bad=3))  # no shard done: no marker records any of its rows
    _edit_header(tmp_path / ".fc.npy.partial", _lose_the_run)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"did not write \(\.fc\.npy\.partial"):
            run(tmp_path, "npy", overwrite=overwrite)
        assert snapshot(tmp_path) == before
    (tmp_path / ".fc.npy.partial").unlink()  # what the message asks for
    run(tmp_path, "npy")
    assert_identical(tmp_path, "npy", reference)


def test_a_safetensors_header_with_wrong_data_offsets_is_refused_then_repaired(tmp_path, reference):
    out = finished(tmp_path, "safetensors", reference)
    path = out / "shard-00001.safetensors"
    data = path.read_bytes()
    assert data.count(b'"data_offsets":[0,') == 1
    path.write_bytes(data.replace(b'"data_offsets":[0,', b'"data_offsets":[4,'))  # same length, rows shifted
    for read in (load_features, lambda o: BatchLoader(o, batch_size=5)):
        with pytest.raises(OutputError, match="shard-00001.safetensors: '.*' has data offsets .* that do not hold it"):
            read(out)
    run(out, "safetensors")  # its header still names the run: recognised, recomputed
    assert_identical(out, "safetensors", reference)


@pytest.mark.parametrize("how", ["deleted", "forged"])
def test_the_kept_copy_of_an_npy_manifest_is_checked_and_restored(tmp_path, reference, how):
    out = finished(tmp_path, "npy", reference)
    kept = out / ".fxstore-files.json"
    if how == "deleted":
        kept.unlink()
    else:  # a valid manifest, but not this folder's: its checksums of shard 0 say other rows
        forged = json.loads(kept.read_text())
        forged["shards"][0]["sha256"]["fc"] = forged["shards"][1]["sha256"]["fc"]
        kept.write_text(json.dumps(forged))
    load_features(out)  # the data is intact: plain loads work
    with pytest.raises(OutputError, match=r"\.fxstore-files\.json: (missing|differs from manifest.json)"):
        load_features(out, verify=True)
    run(out, "npy")  # the same command restores it
    assert kept.read_bytes() == (out / "manifest.json").read_bytes()
    assert_identical(out, "npy", reference)
    (out / "manifest.json").unlink()  # and the restored copy does its job
    run(out, "npy")
    assert_identical(out, "npy", reference)


# -- 5: kill points; refused runs delete nothing ------------------------------------------------------------------


STALE_LOCKS = [("empty", b""), ("dead-process", b'{"fxstore_lock": 1, "pid": 999999999, "host": "gone", '
                                                b'"started": "2026-01-01 00:00:00", "command": "killed"}')]


@pytest.mark.parametrize("stage", ["finished", "interrupted"])
@pytest.mark.parametrize(("how", "content"), STALE_LOCKS, ids=[h for h, _ in STALE_LOCKS])
def test_a_stale_lock_left_by_a_kill_is_removed_by_the_next_run(tmp_path, reference, stage, how, content):
    if stage == "finished":
        out = finished(tmp_path, "safetensors", reference)
    else:
        out = tmp_path
        with pytest.raises(RuntimeError, match="interrupted"):
            run(out, "safetensors", data=FailsAt(N, bad=19))
    (out / ".fxstore-lock").write_bytes(content)  # what a SIGKILL right after creating (or writing) it leaves
    run(out, "safetensors")
    assert not (out / ".fxstore-lock").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*reference["safetensors"][1], "manifest.json"])
    assert_identical(out, "safetensors", reference)


_KILLED = """
import os, signal, sys
from fxstore.dataset.folder import files, lock

def killed_after(original, name):
    def call(*args):
        result = original(*args)
        if name in str(args[-1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

if sys.argv[2] == "lock":
    lock._open_lock = killed_after(lock._open_lock, ".fxstore-lock")
else:
    files.create_exclusive = killed_after(files.create_exclusive, ".fxstore-probe")
import dataset_helpers
dataset_helpers.run_extraction(sys.argv[1], "safetensors", 0.0, 24)
"""


@pytest.mark.parametrize("point", ["lock", "probe"])
def test_a_sigkill_right_after_the_lock_or_probe_is_created_leaves_a_folder_the_next_run_cleans(tmp_path, reference,
                                                                                                 point):
    out = finished(tmp_path, "safetensors", reference)
    helpers = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(helpers), *sys.path]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KILLED, str(out), point], env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert (out / f".fxstore-{point}").exists()  # what the kill left
    run(out, "safetensors")
    assert not (out / ".fxstore-lock").exists() and not (out / ".fxstore-probe").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*reference["safetensors"][1], "manifest.json"])
    assert_identical(out, "safetensors", reference)


@pytest.mark.parametrize(("how", "content"), STALE_LOCKS, ids=[h for h, _ in STALE_LOCKS])
def test_a_refused_run_deletes_nothing_not_even_empty_files(tmp_path, how, content):
    (tmp_path / ".fxstore-lock").write_bytes(content)
    (tmp_path / ".fxstore-probe").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        run(tmp_path, "safetensors")
    assert snapshot(tmp_path) == before
    (tmp_path / "notes.txt").unlink()  # once the folder is fxstore's, the next run cleans up after the kill
    run(tmp_path, "safetensors")
    assert not (tmp_path / ".fxstore-lock").exists() and not (tmp_path / ".fxstore-probe").exists()


@pytest.mark.parametrize("lost", [True, False], ids=["manifest-deleted", "manifest-intact"])
def test_a_user_file_of_the_right_shape_that_fails_every_checksum_is_not_overwritten(tmp_path, reference, lost):
    out = finished(tmp_path, "npy", reference)
    if lost:
        (out / "manifest.json").unlink()
    np.save(out / "fc.npy", np.full((N, 10), 7.0, dtype=np.float32))  # the user's own array, at fxstore's name
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds fc.npy at fxstore's name\(s\), but every row fails the checksums"
                                          r".*\nHint: move it away"):
        run(out, "npy")
    assert snapshot(out) == before
    run(out, "npy", overwrite=True)  # asked for: the folder starts over
    assert_identical(out, "npy", reference)


# -- 6: bounded messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_huge_file_name_in_a_manifest_is_cut_in_every_message(tmp_path, reference, fmt):
    out = finished(tmp_path, fmt, reference)
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    name = "x" * 2_000_000 + (".npy" if fmt == "npy" else ".safetensors")
    (m["features"]["fc"] if fmt == "npy" else m["shards"][0])["file"] = name
    path.write_text(json.dumps(m))
    with pytest.raises(OutputError) as error:
        load_features(out)
    assert len(str(error.value)) < 1500 and " characters)" in str(error.value)
    if fmt == "npy":  # a valid manifest that names another file: the same command repairs it
        run(out, fmt)
        assert_identical(out, fmt, reference)
        return
    with pytest.raises(OutputError, match="did not write") as error:  # not a valid manifest: refused, named
        run(out, fmt)
    assert len(str(error.value)) < 1500 and " characters)" in str(error.value)


def test_many_bad_files_are_listed_with_a_count(tmp_path):
    extract_dataset(toy_model(), ["fc"], Images(24), tmp_path, batch_size=2, shard_size=2, progress=False)
    for path in sorted(tmp_path.glob("shard-*.safetensors")):
        path.unlink()
    with pytest.raises(OutputError, match=r"shard-00007.safetensors: missing; \.\.\. and 4 more\.\n") as error:
        load_features(tmp_path)
    assert str(error.value).count("missing") == 8


# -- remaining limits, measured ------------------------------------------------------------------------------


def test_a_one_shard_npy_file_damaged_in_every_row_is_recomputed_by_the_same_command(tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    run(out, "npy", data=Images(8))  # one shard
    run(clean, "npy", data=Images(8))
    path = out / "fc.npy"
    _flip(path, path.stat().st_size - 1)  # its one shard fails its one checksum: every checksum
    with pytest.raises(OutputError, match="fc.npy: rows 0-7 fail their checksum"):
        load_features(out, verify=True)
    run(out, "npy", data=Images(8))  # its header names the run: fxstore's damaged file, not someone's
    assert shard_bytes(out) == shard_bytes(clean)


def test_rows_rewritten_in_place_keeping_the_header_size_and_time_are_not_seen_by_a_handle_a_documented_limit(
        tmp_path, reference):
    out = finished(tmp_path, "npy", reference)
    feats = load_features(out)
    path = out / "fc.npy"
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()  # the last value of the last row
    with open(path, "r+b") as f:  # in place: the same inode and size
        f.write(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # and the time it had
    assert feats["fc"][N - 1, 9] == 123.0  # read: the pin sees the same file
    with pytest.raises(OutputError, match="fc.npy: rows 16-23 fail their checksum"):
        load_features(out, verify=True)


def test_verify_counts_problems_not_more_damaged_files_than_the_folder_holds(tmp_path, capsys):
    """Round three, item 9: every damaged file plus the manifest's own problems never reads "6 of 4 data files"."""
    from fxstore.cli import main
    from fxstore.dataset import data_files, read_manifest, verify_folder

    out = tmp_path / "run"
    run(out, "safetensors")
    manifest = read_manifest(out)
    files = data_files(manifest)
    for shard in sorted(out.glob("*.safetensors")):
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0xFF
        shard.write_bytes(bytes(raw))
    (out / ".fxstore-files.json").write_text("{}")
    problems = verify_folder(out, manifest)
    assert len(problems) > 0
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{len(problems)} problem" in err and f"({files} data files)" in err
    assert f"of {files} data files" not in err
