"""Small models and data for the dataset, CLI and torchrun tests (importable by subprocesses)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class ToyCNN(nn.Module):
    """Two convolutions, a pooling head: feature maps, a flatten node and logits in a few ms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def toy_cnn() -> ToyCNN:
    """Factory for ``--model dataset_helpers:toy_cnn`` (the CLI seeds the weights)."""
    return ToyCNN()


_CALLS = [0]


@torch.fx.wrap
def _hold(x: torch.Tensor) -> torch.Tensor:
    """From the fourth call on, wait while the file ``$FXSTORE_TEST_HOLD`` exists.

    The first three calls are the probe batch: the self-check of a truncated extractor runs the
    plain model and the uncut trace, then the captured program runs; so the folder is prepared
    (and a second run reaches the lock) before anything pauses.
    """
    _CALLS[0] += 1
    while _CALLS[0] > 3 and os.path.exists(os.environ.get("FXSTORE_TEST_HOLD", "/nonexistent")):
        time.sleep(0.02)
    return x


class HeldCNN(ToyCNN):
    """ToyCNN that a test can pause mid-run (to start a second run against a live one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_hold(x))


def held_cnn() -> HeldCNN:
    """Factory for ``dataset_helpers:held_cnn``."""
    return HeldCNN()


class Images(Dataset):
    """Deterministic random images with integer labels; optionally slow, to be killed mid-run."""

    def __init__(self, n: int, size: int = 16, delay: float = 0.0) -> None:
        self.n, self.size, self.delay = n, size, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.delay:
            time.sleep(self.delay)
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 7


class FailsAt(Images):
    """Raises at one sample: the run stops after its earlier shards, like an interrupted run."""

    def __init__(self, n: int, bad: int) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.bad:
            raise RuntimeError("interrupted")
        return super().__getitem__(i)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends first or nothing is ready in time."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, "the extraction ended before it could be killed"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def shard_bytes(folder) -> dict[str, bytes]:
    """Every data file of an output folder, by name: everything but the manifest and its kept copy
    (an npy folder's ``.fxstore-files.json``), which name the command that wrote them."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name not in ("manifest.json", ".fxstore-files.json")}


LAYERS = ["conv1", "relu2", "fc"]


def toy_model() -> ToyCNN:
    """The same random ToyCNN in every process."""
    torch.manual_seed(0)
    return ToyCNN().eval()


def run_extraction(out: str, fmt: str, delay: float = 0.0, n: int = 48) -> dict:
    """The extraction the kill-and-resume test interrupts and repeats."""
    from fxstore.dataset import extract_dataset

    return extract_dataset(toy_model(), LAYERS, Images(n, delay=delay), out, format=fmt, batch_size=4,
                           shard_size=8, progress=False)


FAULT_SAMPLES = 24
"""How many images the extraction of the fault campaigns (``tests/test_faults_round*.py``) reads."""


def fault_run(out, fmt: str, data=None, model=None, **options) -> dict:
    """The extraction of the fault campaigns: 24 images (or ``data``) through ``toy_model()`` (or ``model``),
    batches of 4, shards of 8, named ``Images`` whatever class ``data`` is."""
    from fxstore.dataset import extract_dataset

    return extract_dataset(toy_model() if model is None else model, LAYERS,
                           Images(FAULT_SAMPLES) if data is None else data, out, format=fmt, batch_size=4,
                           shard_size=8, progress=False, data_name="Images", **options)


def reference_runs(tmp_path_factory) -> dict:
    """The reference of the fault campaigns: ``{format: (folder, data files by name)}`` of an uninterrupted
    :func:`fault_run` per format, and ``"fc"``: the model's own ``fc`` rows (its forward pass, no fxstore)."""
    refs: dict = {}
    for fmt in ("safetensors", "npy"):
        out = tmp_path_factory.mktemp(f"reference-{fmt}")
        fault_run(out, fmt)
        refs[fmt] = (out, shard_bytes(out))
    with torch.no_grad():
        refs["fc"] = toy_model()(torch.stack([Images(FAULT_SAMPLES)[i][0] for i in range(FAULT_SAMPLES)])).numpy()
    return refs


def finished_copy(out, fmt: str, reference: dict):
    """``out`` holding a copy of the reference's finished ``fmt`` folder."""
    shutil.copytree(reference[fmt][0], out, dirs_exist_ok=True)
    return out


def assert_identical(out, fmt: str, reference: dict) -> None:
    """``out`` holds the reference's data files byte for byte, and its verified fc rows are the model's own."""
    from fxstore.dataset import load_features

    assert shard_bytes(out) == reference[fmt][1]
    np.testing.assert_array_equal(load_features(out, verify=True)["fc"][:], reference["fc"])


def folder_entries(folder) -> dict[str, object]:
    """Every entry of ``folder`` with its bytes (links as their target), without following anything."""
    return {p.name: ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
            for p in sorted(folder.iterdir())}


if __name__ == "__main__":  # run as a script: use the importable module, so class names match
    import sys

    import dataset_helpers

    dataset_helpers.run_extraction(sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:5]))
