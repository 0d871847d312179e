"""Case 6: peak memory of storing the four stage outputs for N batches.

Every contender runs in a fresh process (``python -m benchmarks._memory SPEC``) so one
contender's freed memory cannot hide another's allocations. Method:

* CPU: ``tracemalloc`` does not see torch's allocations, so the resident set size is
  measured: the kernel's peak-RSS counter (``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs`` right before the N batches, and the peak is ``VmHWM`` after
  them minus ``VmRSS`` before. Where that file is not writable, a thread samples the RSS
  every millisecond (psutil) instead.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before.

All contenders run with autograd enabled (the situation where hooks that keep ``out``
keep every batch's autograd graph alive); the model runs once before the measurement so
allocator warm-up is not counted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._config import Profile
from ._models import STAGES, build
from ._report import Row
from ._verify import check, forward_reference

__all__ = ["memory", "measure", "CONTENDERS"]

CONTENDERS = {
    "plain": "plain model (outputs dropped)",
    "fxstore": "fxstore detach=True",
    "fxstore_bf16": "fxstore detach=True, dtype=bfloat16",
    "hooks": "hooks storing out.detach()",
    "hooks_graph": "hooks storing out (keeps autograd graph)",
    "fxstore_graph": "fxstore detach=False (keeps autograd graph)",
}
_MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextmanager
def _cpu_peak(result: dict[str, float]) -> Iterator[None]:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS")
        yield
        result["peak"] = _status("VmHWM") - base
        result["method"] = "VmHWM after clear_refs"
        return
    except OSError:
        pass
    import psutil

    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
    result["peak"] = max(peak[0], proc.memory_info().rss) - base
    result["method"] = "sampled RSS (psutil, 1 ms)"


@contextmanager
def _cuda_peak(result: dict[str, float], device: torch.device) -> Iterator[None]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    result["peak"] = torch.cuda.max_memory_allocated(device) - base
    result["method"] = "torch.cuda.max_memory_allocated"


def _runner(kind: str, model: torch.nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    import fxstore

    from ._contenders import HookRecipe

    names = list(STAGES)
    if kind == "plain":
        return lambda x: (model(x), {})[1]
    if kind.startswith("fxstore"):
        options: dict[str, Any] = {"detach": kind != "fxstore_graph"}
        if kind == "fxstore_bf16":
            options["dtype"] = torch.bfloat16
        ex = fxstore.FeatureExtractor(model, names, **options)
        return lambda x: ex(x)[1]
    recipe = HookRecipe(model, names, keep_graph=kind == "hooks_graph")
    return lambda x: {n: v[-1] for n, v in recipe(x).items() if n in names}


def _stored_bytes(kept: list[dict[str, torch.Tensor]]) -> int:
    seen: dict[int, int] = {}
    for features in kept:
        for t in features.values():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender on ``spec["steps"]`` batches; peak memory, stored bytes, times, verification."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build(spec["model"]).to(device)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.rand(spec["b"], 3, spec["r"], spec["r"], generator=gen).to(device) for _ in range(spec["steps"])]
    run = _runner(spec["contender"], model)
    run(xs[0])  # warm-up: allocator pools, lazy initialisation
    result: dict[str, Any] = {}
    times = []
    for attempt in range(3):
        kept: list[dict[str, torch.Tensor]] = []
        peak = _cuda_peak(result, device) if device.type == "cuda" else _cpu_peak(result)
        with (peak if attempt == 0 else _nothing()):
            start = time.perf_counter()
            for x in xs:
                kept.append(run(x))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if attempt == 0:
            result["stored"] = _stored_bytes(kept)
            last = kept[-1]
        del kept
    result["times"] = times
    result["time"] = statistics.median(times)
    if spec["contender"] == "plain":
        result["verified"] = "— (no capture)"
    else:
        reference = forward_reference(model, list(STAGES), xs[-1])
        result["verified"] = check(last, reference, list(STAGES))
    return result


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _isolated(spec: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks._memory", json.dumps(spec)], cwd=root, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(profile: Profile, device: torch.device) -> list[Row]:
    """Case 6: one row per contender; the median column is the time for the N batches."""
    case = (f"6 memory · {profile.resnet} b{profile.memory_b} {profile.memory_r}² × {profile.memory_steps} batches, "
            f"grad mode · 4 stages stored · peak = {'max_memory_allocated' if device.type == 'cuda' else 'RSS'} Δ, "
            f"{'fresh process each' if profile.isolate_memory else 'in-process'}")
    results: dict[str, dict[str, Any]] = {}
    for kind in CONTENDERS:
        spec = {"contender": kind, "model": profile.resnet, "b": profile.memory_b, "r": profile.memory_r,
                "steps": profile.memory_steps, "device": str(device), "threads": torch.get_num_threads()}
        results[kind] = _isolated(spec) if profile.isolate_memory else measure(spec)
    base = results["plain"]
    rows = []
    for kind, name in CONTENDERS.items():
        r = results[kind]
        if "error" in r:
            rows.append(Row(case, name, None, None, None, None, f"FAILED: {r['error']}"))
            continue
        ratio = r["time"] / base["time"] if "time" in base else None
        notes = (f"peak +{r['peak'] / _MIB:.0f} MiB, stored {r['stored'] / _MIB:.1f} MiB"
                 )
        rows.append(Row(case, name, r["time"], ratio, min(r["times"]), max(r["times"]), r["verified"], notes,
                        tuple(r["times"]), {"peak_bytes": r["peak"], "stored_bytes": r["stored"],
                                            "method": r["method"]}))
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
