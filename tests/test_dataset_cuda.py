"""CUDA: pinned non-blocking copies and the background writer give the in-memory values (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_helpers import LAYERS, Images, shard_bytes, toy_model

from fxstore import FeatureExtractor
from fxstore.dataset import extract_dataset
from fxstore.dataset.reader import load_features

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_features_leave_the_graph_in_pinned_host_memory():
    model = toy_model().cuda()
    ex = FeatureExtractor(model, ["fc"], keep_output=False, device="cpu", non_blocking=True)
    _, feats = ex(torch.rand(2, 3, 16, 16, device="cuda"))
    torch.cuda.synchronize()
    assert feats["fc"].device.type == "cpu" and feats["fc"].is_pinned()


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_cuda_extraction_equals_in_memory_cuda_features(tmp_path, fmt):
    model, data = toy_model().cuda(), Images(24)
    for overlap in (True, False):
        extract_dataset(model, LAYERS, data, tmp_path / str(overlap), format=fmt, batch_size=4, shard_size=8,
                        device="cuda", overlap=overlap, progress=False)
    assert shard_bytes(tmp_path / "True") == shard_bytes(tmp_path / "False")
    ex = FeatureExtractor(model, LAYERS, keep_output=False).eval()
    with torch.no_grad():
        parts = [ex(torch.stack([data[i][0] for i in range(lo, lo + 4)]).cuda())[1] for lo in range(0, 24, 4)]
    feats = load_features(tmp_path / "True")
    for key in LAYERS:
        assert torch.equal(torch.from_numpy(np.array(feats[key])), torch.cat([p[key] for p in parts]).cpu())


def test_inputs_hashed_by_the_writer_thread_on_cuda_equal_those_hashed_inline_on_cpu(tmp_path):
    data = Images(24)
    cpu = extract_dataset(toy_model(), ["fc"], data, tmp_path / "cpu", batch_size=4, shard_size=8, progress=False)
    gpu = extract_dataset(toy_model().cuda(), ["fc"], data, tmp_path / "gpu", batch_size=4, shard_size=8,
                          device="cuda", progress=False)
    assert [s["inputs"] for s in gpu["shards"]] == [s["inputs"] for s in cpu["shards"]]
