"""Fault injection: every fault a user meets leaves no user file lost, and the folder either refuses
with a clear message or ends byte-identical to an uninterrupted run.

The reference is one uninterrupted run per format (``dataset_helpers.run_extraction``: 24
samples, shards of 8). Faults: SIGKILL at random points (one process and torchrun with 2
ranks), damaged and truncated files, tampered manifests, foreign files, concurrent runs,
full disks (a real tmpfs where this machine can mount one, and ``RLIMIT_FSIZE``), read-only
folders, bad devices. The "Nothing lost" table (docs/datasets.md) lists these scenarios.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import LAYERS, FailsAt, Images, shard_bytes, toy_model
from dataset_helpers import run_extraction as _run_extraction

from fxstore import ConfigError
from fxstore.dataset import extract_dataset
from fxstore.dataset.reader import load_features
from fxstore.errors import OutputError

HELPERS = Path(__file__).with_name("dataset_helpers.py")
FORMATS = ["safetensors", "npy"]
N = 24
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parent), *sys.path]), "OMP_NUM_THREADS": "1"}


def run_extraction(out: str, fmt: str) -> dict:
    return _run_extraction(out, fmt, n=N)


def _script(out: Path, fmt: str, delay: float) -> list[str]:
    return [str(HELPERS), str(out), fmt, str(delay), str(N)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Folder, bytes and manifest of an uninterrupted run, per format."""
    refs = {}
    for fmt in FORMATS:
        out = tmp_path_factory.mktemp(f"reference-{fmt}")
        manifest = run_extraction(str(out), fmt)
        refs[fmt] = (shard_bytes(out), _stable(manifest), out)
    return refs


def _finished(out: Path, fmt: str, reference) -> Path:
    """A copy of the uninterrupted run's folder."""
    shutil.copytree(reference[fmt][2], out, dirs_exist_ok=True)
    return out


def _stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "command"}


def assert_identical(out: Path, fmt: str, reference) -> None:
    """``out`` holds exactly the files of the uninterrupted run, byte for byte, and verifies."""
    data, manifest, _ = reference[fmt]
    assert shard_bytes(out) == data
    assert _stable(json.loads((out / "manifest.json").read_text())) == manifest
    feats = load_features(out, verify=True)
    assert set(feats) == {*LAYERS, "target"}


def _events(out: Path) -> int:
    """Progress a run left on disk: the lock, the run record, each shard marker, the manifest."""
    progress = out / ".fxstore-progress"
    return ((out / ".fxstore-lock").exists() + (out / ".fxstore-run.json").exists()
            + (len(list(progress.iterdir())) if progress.is_dir() else 0) + 2 * (out / "manifest.json").exists())


def _kill_at(proc: subprocess.Popen, out: Path, events: int, extra: float, tree: bool = False) -> int:
    """SIGKILL ``proc`` once ``out`` shows ``events`` events, plus ``extra`` seconds; the events seen then."""
    deadline = time.monotonic() + 240
    try:
        while _events(out) < events and proc.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        time.sleep(extra)
    finally:
        ranks = _descendants(proc.pid) if tree else []  # torchrun's ranks run in sessions of their own
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        _wait_gone(ranks)
    return _events(out)


def _wait_gone(pids: list[int]) -> None:
    """Wait until every thread of every killed rank has exited: only then is its folder lock released.

    A rank whose main thread is already a zombie can have other threads still exiting that hold its descriptors
    (and so the lock), so each thread's state is read, not the process's.
    """
    deadline = time.monotonic() + 30
    for pid in pids:
        while time.monotonic() < deadline and not all(state in ("Z", "X", None) for state in _thread_states(pid)):
            time.sleep(0.01)


def _thread_states(pid: int) -> list[str | None]:
    """The state letter of each thread of ``pid`` (None for one that vanished while read)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    states = []
    for task in tasks:
        try:
            states.append(Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            states.append(None)
    return states


def _descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


# -- SIGKILL at random points -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_at_a_random_point_then_resume_is_byte_identical(tmp_path, reference, fmt, seed):
    rng = random.Random(f"{fmt}{seed}")
    events, extra = rng.randint(0, 6), rng.uniform(0, 0.05)  # 0: during start-up ... 6: after the manifest
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *_script(out, fmt, 0.04)], env=ENV)
    _kill_at(proc, out, events, extra)
    run_extraction(str(out), fmt)
    assert_identical(out, fmt, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "seed"), [("safetensors", 4), ("npy", 5)])
def test_torchrun_two_ranks_killed_then_one_process_resumes_byte_identical(tmp_path, reference, fmt, seed):
    rng = random.Random(seed)
    events = rng.randint(3, 4)  # lock, record, 1-2 shards of 3
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *_script(out, fmt, 0.1)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = _kill_at(proc, out, events, rng.uniform(0, 0.05), tree=True)
    assert seen >= events and not (out / "manifest.json").exists()  # really interrupted mid-run
    run_extraction(str(out), fmt)
    assert_identical(out, fmt, reference)


# -- damaged and truncated files -------------------------------------------------------------------


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def _data_file(out: Path, fmt: str) -> Path:
    return out / ("shard-00002.safetensors" if fmt == "safetensors" else "relu2.npy")


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_bytes_in_a_finished_folder_are_found_and_repaired(tmp_path, reference, fmt, caplog):
    _finished(tmp_path, fmt, reference)
    target = _data_file(tmp_path, fmt)
    _flip(target, target.stat().st_size - 200)
    with pytest.raises(OutputError, match=f"does not match its manifest: {target.name}: .*checksum"):
        load_features(tmp_path, verify=True)
    untouched = tmp_path / ("shard-00000.safetensors" if fmt == "safetensors" else "fc.npy")
    before = untouched.read_bytes()
    run_extraction(str(tmp_path), fmt)  # the same command: verifies, recomputes what is damaged, completes
    assert f"repairing '{tmp_path}': {target.name}" in caplog.text
    assert_identical(tmp_path, fmt, reference)
    assert untouched.read_bytes() == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_or_missing_file_in_a_finished_folder_is_refused_then_repaired(tmp_path, reference, fmt):
    _finished(tmp_path, fmt, reference)
    target = _data_file(tmp_path, fmt)
    os.truncate(target, target.stat().st_size // 2)
    with pytest.raises(OutputError, match=rf"{target.name}: \d+ bytes, \d+ recorded \(truncated"):
        load_features(tmp_path)  # the structure check runs on every load, no checksums needed
    run_extraction(str(tmp_path), fmt)
    assert_identical(tmp_path, fmt, reference)
    target.unlink()
    with pytest.raises(OutputError, match=f"{target.name}: missing"):
        load_features(tmp_path)
    run_extraction(str(tmp_path), fmt)
    assert_identical(tmp_path, fmt, reference)


def _interrupted(out: Path, fmt: str) -> None:
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(toy_model(), LAYERS, FailsAt(N, bad=19), out, format=fmt, batch_size=4, shard_size=8,
                        data_name="Images", progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "marker"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_damage_in_an_interrupted_folder_is_recomputed_on_resume(tmp_path, reference, fmt, damage, caplog):
    _interrupted(tmp_path, fmt)
    target = tmp_path / ("shard-00001.safetensors" if fmt == "safetensors" else ".relu2.npy.partial")
    offset = 200 if fmt == "safetensors" else target.stat().st_size // 2  # rows of shard 1 (of 3)
    if damage == "truncate":  # npy: every shard of this file must be computed again
        os.truncate(target, target.stat().st_size - 100)
    elif damage == "flip":
        _flip(target, offset)
    else:
        (tmp_path / ".fxstore-progress" / "00001").write_text("{not json")
    run_extraction(str(tmp_path), fmt)
    assert "recomputing" in caplog.text
    assert_identical(tmp_path, fmt, reference)


# -- tampered manifests ----------------------------------------------------------------------------


def _tamper(manifest: dict, how: str, outside: Path) -> object:
    first = next(iter(manifest["features"]))
    if how == "json-list":
        return [manifest]
    if how == "parent-path":
        manifest["shards"][0]["file"] = "../outside/x.safetensors"
    elif how == "absolute-path":
        manifest["shards"][0]["file"] = str(outside / "x.safetensors")
    elif how == "etc-passwd":
        manifest["features"][first]["file"] = "/etc/passwd"
    elif how == "count-lies":
        manifest["shards"][0]["count"] += 1
    elif how == "count-and-total-lie":
        manifest["shards"][-1]["count"] += 1
        manifest["num_samples"] += 1
    elif how == "shape-lies":
        manifest["features"][first]["shape"][0] += 1
    elif how == "shape-and-identity-lie":
        manifest["features"][first]["shape"][0] += 1
        manifest["identity"]["features"][first]["shape"][0] += 1
    elif how == "checksum-lies":
        shard = manifest["shards"][0]
        shard["sha256"] = ("sha256:" + "0" * 64) if isinstance(shard["sha256"], str) else {
            k: "sha256:" + "0" * 64 for k in shard["sha256"]}
    return manifest


SCHEMA_BREAKING = [("safetensors", "json-list", "a JSON list, not an object"),
                   ("safetensors", "not-json", "not readable JSON"),
                   ("safetensors", "parent-path", "shard 0 names the file '../outside/x.safetensors'"),
                   ("safetensors", "absolute-path", "shard 0 names the file '/"),
                   ("npy", "etc-passwd", "the file of 'conv1' is '/etc/passwd', not a .npy file name inside the folder"),
                   ("safetensors", "count-lies", "shard 1 starts at 8, not at 9 where shard 0 ended"),
                   ("safetensors", "shape-lies", "features differ from the run identity")]


@pytest.mark.parametrize(("fmt", "how", "match"), SCHEMA_BREAKING, ids=[f"{f}-{h}" for f, h, _ in SCHEMA_BREAKING])
def test_a_manifest_that_breaks_its_schema_is_refused_and_never_followed(tmp_path, reference, fmt, how, match):
    out, outside = _finished(tmp_path / "out", fmt, reference), tmp_path / "outside"
    outside.mkdir()
    shutil.copy(out / ("shard-00001.safetensors" if fmt == "safetensors" else "fc.npy"), outside / "x.safetensors")
    path = out / "manifest.json"
    tampered = _tamper(json.loads(path.read_text()), how, outside)
    path.write_text("{oops" if how == "not-json" else json.dumps(tampered))
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=f"is not a valid fxstore manifest: {match}"):
        load_features(out, verify=True)
    for overwrite in (False, True):  # a manifest fxstore cannot trust claims nothing: the folder is refused as is
        with pytest.raises(OutputError, match="holds files fxstore did not write .*manifest.json"):
            extract_dataset(toy_model(), LAYERS, Images(N), out, format=fmt, batch_size=4, shard_size=8,
                            overwrite=overwrite, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


PLAUSIBLE_LIES = [("safetensors", "count-and-total-lie", r"shard-00002.safetensors: 'conv1' is \[8, 8, 16, 16\] F32, "
                                                         r"the manifest says \[9, 8, 16, 16\]"),
                  ("npy", "count-and-total-lie", r"conv1.npy: its header does not say \(25, 8, 16, 16\)"),
                  ("npy", "shape-and-identity-lie", r"conv1.npy: .*header does not say \(24, 9, 16, 16\)"),
                  ("safetensors", "checksum-lies", "shard-00000.safetensors: checksum mismatch"),
                  ("npy", "checksum-lies", "conv1.npy: rows 0-7 fail their checksum")]


@pytest.mark.parametrize(("fmt", "how", "match"), PLAUSIBLE_LIES, ids=[f"{f}-{h}" for f, h, _ in PLAUSIBLE_LIES])
def test_a_manifest_that_lies_about_its_files_is_caught_then_repaired_or_refused(tmp_path, reference, fmt, how,
                                                                                   match):
    out = _finished(tmp_path, fmt, reference)
    path = out / "manifest.json"
    path.write_text(json.dumps(_tamper(json.loads(path.read_text()), how, tmp_path)))
    with pytest.raises(OutputError, match=f"does not match its manifest: {match}"):
        load_features(out, verify=True)
    if how == "shape-and-identity-lie":  # the manifest claims another run than its kept copy: refused, nothing touched
        files = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(OutputError, match=r"holds a different extraction \(layers, their shapes or dtypes: "
                                              r"\{'conv1': \(\[9, 16, 16\]"):
            run_extraction(str(out), fmt)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    else:  # the same command verifies, recomputes what does not match, and rewrites the manifest
        run_extraction(str(out), fmt)
        assert_identical(out, fmt, reference)


# -- foreign files -----------------------------------------------------------------------------------


def test_overwrite_refuses_and_deletes_nothing_when_a_foreign_file_is_there(tmp_path):
    (tmp_path / "manifest.json").write_text('{"mine": true}')
    (tmp_path / "notes.txt").write_text("my notes")
    np.save(tmp_path / "target.npy", np.arange(3))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"manifest.json \(not an fxstore manifest: fxstore_manifest is None.*"
                                              r"; notes.txt; target.npy\)"):
            extract_dataset(toy_model(), ["fc"], Images(8), tmp_path, format="npy", overwrite=overwrite,
                            progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("name", ["shard-00000.safetensors", "manifest.json", ".fxstore-run.json", ".fxstore-lock"])
def test_a_user_file_with_an_fxstore_name_is_never_overwritten(tmp_path, name):
    (tmp_path / name).write_text("the user's own file")
    with pytest.raises(OutputError, match="fxstore did not write|not an fxstore lock file"):
        extract_dataset(toy_model(), ["fc"], Images(8), tmp_path, progress=False)
    assert (tmp_path / name).read_text() == "the user's own file"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_added_to_a_finished_folder_is_kept_and_the_folder_refused(tmp_path, reference, fmt):
    _finished(tmp_path, fmt, reference)
    (tmp_path / "README.txt").write_text("what these features are")
    with pytest.raises(OutputError, match=r"holds files fxstore did not write \(README.txt\)"):
        extract_dataset(toy_model(), LAYERS, Images(N), tmp_path, format=fmt, batch_size=4, shard_size=8,
                        overwrite=True, progress=False)
    (tmp_path / "README.txt").unlink()
    assert_identical(tmp_path, fmt, reference)


def test_failed_npy_preallocation_is_never_reused_for_other_data(tmp_path, monkeypatch):
    import fxstore.dataset.formats.npy as sinks

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(sinks.os, "posix_fallocate", full)
        with pytest.raises(OutputError, match="No space left on device"):
            extract_dataset(toy_model(), ["fc"], Images(64), tmp_path, format="npy", progress=False)
    with pytest.raises(OutputError, match="refusing to resume .*number of samples: 64 before, 16 now"):
        extract_dataset(toy_model(), ["fc"], Images(16), tmp_path, format="npy", progress=False)
    m = extract_dataset(toy_model(), ["fc"], Images(16), tmp_path, format="npy", overwrite=True, progress=False)
    feats = load_features(tmp_path, verify=True)
    with torch.no_grad():
        expected = toy_model()(torch.stack([Images(16)[i][0] for i in range(16)]))
    assert m["num_samples"] == 16 and feats["fc"].shape == (16, 10) and feats["target"].shape == (16,)
    torch.testing.assert_close(torch.from_numpy(np.array(feats["fc"])), expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fxstore-files.json", "fc.npy", "manifest.json", "target.npy"]


# -- concurrent runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_run_on_a_busy_folder_is_refused_at_once_naming_the_first(tmp_path, reference, fmt):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *_script(out, fmt, 0.06)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".fxstore-progress").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        for overwrite in (False, True):
            started = time.monotonic()
            with pytest.raises(OutputError, match=rf"being written by another fxstore run \(process {proc.pid} on "):
                extract_dataset(toy_model(), LAYERS, Images(N), out, format=fmt, batch_size=4, shard_size=8,
                                overwrite=overwrite, progress=False)
            assert time.monotonic() - started < 10  # refused, not waiting
    finally:
        assert proc.wait(timeout=240) == 0
    assert_identical(out, fmt, reference)


def test_a_surviving_rank_of_a_dead_run_still_holds_the_folder(tmp_path):
    _interrupted(tmp_path, "safetensors")
    fd = os.open(tmp_path, os.O_RDONLY)  # what every rank of a run holds: a shared lock on the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.raises(OutputError, match="still used by a process of an earlier run"):
            run_extraction(str(tmp_path), "safetensors")
    finally:
        os.close(fd)
    run_extraction(str(tmp_path), "safetensors")


# -- full disks -------------------------------------------------------------------------------------------

_DISK_SCRIPT = r"""
import hashlib, json, os, subprocess, sys
sys.path[:0] = sys.argv[3].split(os.pathsep)
import dataset_helpers
import fxstore.dataset.run as extract
from fxstore.errors import OutputError
out, fmt = sys.argv[1], sys.argv[2]
result = {}
def attempt(name):
    try:
        dataset_helpers.run_extraction(out, fmt, n=24)
        result[name] = "ok"
    except OutputError as e:
        result[name] = str(e).splitlines()[0]
attempt("checked")                      # the free-space check sees the small disk
real = extract.check_free_space
extract.check_free_space = lambda out, needed: None  # the disk fills after the check (another writer)
attempt("unchecked")
subprocess.run(["mount", "-o", "remount,size=64m", os.path.dirname(out)], check=True)
extract.check_free_space = real
attempt("after freeing space")
result["files"] = {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest()
                   for n in sorted(os.listdir(out))}
print(json.dumps(result))
"""


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    run = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
                         capture_output=True, timeout=30)
    return run.returncode == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truly_full_disk_fails_cleanly_then_resumes_byte_identical(tmp_path, reference, fmt):
    if not _can_mount_tmpfs():
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (the RLIMIT_FSIZE test still runs)")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "disk.py"
    script.write_text(_DISK_SCRIPT)
    paths = os.pathsep.join([str(HELPERS.parent), *sys.path])
    size = "96k" if fmt == "npy" else "160k"  # the whole output is ~300 KB
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$1" && '
                          f'exec "$2" "$3" "$1/out" "$4" "$5"', "sh", str(disk), sys.executable, str(script), fmt,
                          paths], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]  # never a SIGBUS or a traceback
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["checked"].startswith(f"the output folder '{disk}/out' needs about ")
    assert "No space left on device" in result["unchecked"]
    assert result["after freeing space"] == "ok"
    data = reference[fmt][0]
    expected = {n: __import__("hashlib").sha256(b).hexdigest() for n, b in data.items()}
    assert {n: h for n, h in result["files"].items() if n not in ("manifest.json", ".fxstore-files.json")} == expected


_FSIZE_SCRIPT = r"""
import os, resource, sys
sys.path[:0] = sys.argv[3].split(os.pathsep)
import dataset_helpers
import fxstore.dataset.run as extract
from fxstore.errors import OutputError
extract.check_free_space = lambda out, needed: None
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
try:
    dataset_helpers.run_extraction(sys.argv[1], sys.argv[2], n=24)
except OutputError as e:
    print(str(e).splitlines()[0])
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_size_limit_fails_cleanly_then_resumes_byte_identical(tmp_path, reference, fmt):
    script, out = tmp_path / "fsize.py", tmp_path / "out"
    script.write_text(_FSIZE_SCRIPT)
    limit = 40_000 if fmt == "npy" else 30_000  # npy: relu2.npy (~49 KB) cannot be allocated; shards ~37 KB
    run = subprocess.run([sys.executable, str(script), str(out), fmt, os.pathsep.join([str(HELPERS.parent),
                          *sys.path]), str(limit)], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "File too large" in run.stdout, (run.stdout, run.stderr[-2000:])
    run_extraction(str(out), fmt)
    assert_identical(out, fmt, reference)


# -- read-only folders ---------------------------------------------------------------------------------------


def test_a_read_only_folder_is_refused_cleanly_and_still_loads(tmp_path, reference):
    _finished(tmp_path / "out", "safetensors", reference)
    script = ("import sys; sys.path[:0] = sys.argv[2].split(':'); import dataset_helpers\n"
              "from fxstore.dataset import load_features\n"
              "assert len(load_features(sys.argv[1], verify=True)['fc']) == 24\n"
              "try:\n    dataset_helpers.run_extraction(sys.argv[1], 'safetensors', n=24)\n"
              "except Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0])\n")
    paths = os.pathsep.join([str(HELPERS.parent), *sys.path])
    if os.geteuid() != 0:
        os.chmod(tmp_path / "out", 0o555)
        command = [sys.executable, "-c", script, str(tmp_path / "out"), paths]
    elif _can_mount_tmpfs():  # root ignores permissions: a read-only bind mount is read-only for everyone
        command = ["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && '
                   'exec "$2" -c "$3" "$1" "$4"', "sh", str(tmp_path / "out"), sys.executable, script, paths]
    else:
        pytest.skip("running as root without mount namespaces: no folder is read-only here")
    try:
        run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(tmp_path / "out", 0o755)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("OutputError cannot write the output folder")
    assert "Read-only file system" in run.stdout or "Permission denied" in run.stdout
    assert_identical(tmp_path / "out", "safetensors", reference)


# -- bad devices ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "match"), [
    ("meta", "device='meta' holds no data"),
    ("cuda:7" if torch.cuda.is_available() else "cuda", "is not available on this machine"),
    ("tpu", "device='tpu' is not a device"),
])
def test_a_bad_device_is_refused_and_the_model_is_left_as_it_was(tmp_path, device, match):
    model = toy_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        extract_dataset(model, ["fc"], Images(4), tmp_path, device=device, progress=False)
    after = model.state_dict()
    assert all(m.training for m in model.modules())
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_failing_run_leaves_the_model_on_its_device_in_its_mode(tmp_path):
    model = toy_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_dataset(model, ["fc"], FailsAt(16, bad=9), tmp_path, shard_size=4, device="cpu", progress=False)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# -- the command line ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_fault_script(tmp_path):
    """tests/faults_cli.sh: the same faults through the ``fxstore`` command, as a user meets them."""
    script = Path(__file__).with_name("faults_cli.sh")
    run = subprocess.run(["bash", str(script), str(tmp_path)], env={**ENV, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all CLI fault scenarios passed" in run.stdout


# -- the data's identity ----------------------------------------------------------------------------------------


def _images(root: Path, seed: int, broken: int | None = None) -> None:
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(8):
        pixels = np.random.default_rng(seed + i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        if i == broken:
            (root / "a" / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(pixels).save(root / "a" / f"{i}.png")


def test_two_different_data_folders_of_one_name_never_resume_into_each_other(tmp_path, monkeypatch, capsys):
    from fxstore.cli import main

    monkeypatch.syspath_prepend(str(HELPERS.parent))
    monkeypatch.chdir(tmp_path)
    args = ["extract", "dataset_helpers:toy_cnn", "--layers", "fc", "--data", "images", "--image-size", "16",
            "--batch-size", "2", "--shard-size", "4", "--out", "out", "--quiet"]
    _images(tmp_path / "images", seed=0, broken=6)
    assert main(args) == 1  # interrupted by the broken image after shard 0
    assert (tmp_path / "out" / "shard-00000.safetensors").exists() and not (tmp_path / "out" / "manifest.json").exists()
    shutil.rmtree(tmp_path / "images")
    _images(tmp_path / "images", seed=100)  # another folder, the same name
    capsys.readouterr()
    assert main(args) == 1
    assert ("refusing to resume into 'out': it holds a different extraction (data: 'images image_size=16 files=8 "
            "sha256:") in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert load_features(tmp_path / "out", verify=True)["fc"].shape == (8, 10)
