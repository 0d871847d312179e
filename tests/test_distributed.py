"""torchrun: two gloo processes share the shards; the result equals a one-process run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_helpers import shard_bytes

from fxstore.cli import main
from fxstore.dataset.reader import load_features

HELPERS = Path(__file__).parent


def _args(out: Path, fmt: str) -> list[str]:
    return ["extract", "dataset_helpers:toy_cnn", "--layers", "conv1", "relu2", "fc", "--data", "fake:40",
            "--image-size", "16", "--batch-size", "4", "--shard-size", "8", "--format", fmt, "--out", str(out)]


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_torchrun_two_processes_equal_one_process(tmp_path, fmt, monkeypatch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fxstore", *_args(tmp_path / "two", fmt)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote 40 samples") == 1  # rank 0 reports
    assert re.search(r"rank 0/2: 100%.* 24/24 ", run.stderr)  # rank 0 computed shards 0, 2, 4 of 0-4
    monkeypatch.syspath_prepend(str(HELPERS))
    assert main([*_args(tmp_path / "one", fmt), "--quiet"]) == 0

    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    two, one = load_features(tmp_path / "two"), load_features(tmp_path / "one")
    assert list(two) == ["conv1", "relu2", "fc", "target"]
    assert all(np.array_equal(np.asarray(two[k]), np.asarray(one[k])) for k in one)
