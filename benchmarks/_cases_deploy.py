"""Case 10: a deployed extractor on CPU: eager, torch.compile, AOTInductor package, ONNX Runtime.

resnet50's layer3 and layer4, globally average-pooled inside the graph, at batch 1 and 16.
The AOTInductor package and the ONNX file are exported once with a dynamic batch (from a
batch-2 example) and serve both batch sizes; the compiled extractor compiles once per
batch size (its first call, outside the timing). Every contender is verified against
forward hooks on the plain model, pooled afterwards. Throughput (images/s) is in the notes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fxstore
from fxstore.dataset._reduce import global_avg_pool

from . import _contenders as C
from ._config import Profile
from ._measure import Failed, attempt, compare
from ._models import build
from ._report import Row
from ._timing import Contender, Features
from ._verify import forward_reference

__all__ = ["deployed"]

LAYERS = ["layer3", "layer4"]
RTOL, ATOL = 1e-3, 1e-4  # inductor and ONNX Runtime reorder float reductions


def _sizes(profile: Profile) -> tuple[str, int, tuple[int, ...], bool]:
    """Model, resolution, batch sizes, and whether the AOTInductor package is built (minutes of C++)."""
    if profile.name == "quick":
        return "resnet_tiny", 32, (1, 2), False
    return "resnet50", 224, (1, 16), True


def _extractor(model: nn.Module) -> fxstore.FeatureExtractor:
    return fxstore.FeatureExtractor(model, LAYERS, keep_output=False, detach=True, transform=global_avg_pool).eval()


def _eager(model: nn.Module, x: torch.Tensor) -> Contender:
    ex = _extractor(model)

    def run() -> Features:
        with torch.no_grad():
            return ex(x)[1]

    return Contender("fxstore eager extractor", run)


def _compiled(model: nn.Module, x: torch.Tensor, backend: str) -> Contender:
    compiled = torch.compile(_extractor(model), backend=backend, fullgraph=True, dynamic=False)

    def run() -> Features:
        with torch.no_grad():
            return compiled(x)[1]

    return Contender(f"fxstore compiled extractor ({backend})", run)


def _aoti(path: Path, x: torch.Tensor) -> Contender:
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(path))

    def run() -> Features:
        with torch.no_grad():
            return runner(x)

    return Contender("fxstore AOTInductor package", run)


def _onnx(path: Path, x: torch.Tensor) -> Contender:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    names = [o.name for o in session.get_outputs()]

    def run() -> Features:
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(None, feed))}

    return Contender("fxstore ONNX Runtime", run)


def _export(model: nn.Module, r: int, folder: Path, format: str) -> Path:
    path = folder / f"feats.{'onnx' if format == 'onnx' else 'pt2'}"
    _extractor(model).export(path, (torch.rand(2, 3, r, r),), format=format)
    return path


def deployed(profile: Profile, device: torch.device) -> list[Row]:
    """Case 10: latency and throughput of the deployed forms of one extractor, on CPU."""
    with tempfile.TemporaryDirectory(prefix="fxstore-bench-deploy-") as folder:
        return _deployed(profile, Path(folder))


def _deployed(profile: Profile, folder: Path) -> list[Row]:
    name, r, batches, with_aoti = _sizes(profile)
    cpu = torch.device("cpu")
    model = build(name, r)
    artifacts: dict[str, Path | Failed] = {}
    for format, label in (("onnx", "fxstore ONNX Runtime"), ("aoti", "fxstore AOTInductor package")):
        if format == "aoti" and not with_aoti:
            continue
        try:
            artifacts[format] = _export(model, r, folder, format)
        except Exception as e:  # an export that fails is a result of the case
            artifacts[format] = Failed(label, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
    rows: list[Row] = []
    for b in batches:
        x = torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(1))
        raw = forward_reference(model, LAYERS, x)
        reference = {k: global_avg_pool(raw[k]) for k in LAYERS}
        entries: list[Contender | Failed] = [
            C.plain(model, x),
            attempt("fxstore eager extractor", lambda x=x: _eager(model, x)),
            attempt("fxstore compiled extractor", lambda x=x: _compiled(model, x, profile.compile_backend)),
        ]
        makers: dict[str, Callable[[Path, torch.Tensor], Contender]] = {"aoti": _aoti, "onnx": _onnx}
        for format, artifact in artifacts.items():
            entries.append(artifact if isinstance(artifact, Failed)
                           else attempt(format, lambda m=makers[format], p=artifact, x=x: m(p, x)))
        case = f"15 deployed (CPU) · {name} b{b} {r}² · layer3 + layer4 avg-pooled"
        case_rows = compare(case, entries, reference, profile, cpu, rtol=RTOL, atol=ATOL)
        for row in case_rows:
            if row.median_s:
                row.notes = "; ".join(n for n in (row.notes, f"{b / row.median_s:.1f} img/s") if n)
        rows += case_rows
    return rows
