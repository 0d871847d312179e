"""Kill a running extraction (SIGKILL, mid-run) and run it again: same bytes as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_helpers import kill_when, run_extraction, shard_bytes

from fxstore.dataset.reader import load_features

HELPERS = Path(__file__).with_name("dataset_helpers.py")


def _done(out: Path, fmt: str) -> int:
    if fmt == "safetensors":
        return len(list(out.glob("shard-*.safetensors")))
    progress = out / ".fxstore-progress"
    return len(list(progress.iterdir())) if progress.is_dir() else 0


def _kill_after_two_shards(out: Path, fmt: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(HELPERS), str(out), fmt, "0.05"], env=env)
    kill_when(proc, lambda: _done(out, fmt) >= 2, timeout=120)


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_killed_run_resumes_to_identical_bytes(tmp_path, fmt):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _kill_after_two_shards(killed, fmt)
    assert not (killed / "manifest.json").exists() and 2 <= _done(killed, fmt) < 6  # really interrupted

    resumed = run_extraction(str(killed), fmt)
    uninterrupted = run_extraction(str(clean), fmt)

    assert shard_bytes(killed) == shard_bytes(clean)
    assert {k: v for k, v in resumed.items() if k != "command"} == {
        k: v for k, v in uninterrupted.items() if k != "command"}
    a, b = load_features(killed), load_features(clean)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)
