"""Dataset statistics: fxstore (eager, compiled) against torchmetrics' FID loop, a hook loop and ``extract_dataset`` + numpy.

Two workloads, random weights and synthetic data held in memory:

* images: resnet50's pooled features (``avgpool``, D = 2048) over random images. Contenders:
  ``fxstore.feature_statistics`` eager and compiled; torchmetrics'
  ``FrechetInceptionDistance(feature=<resnet50 up to the pooled features>)`` ``update`` loop over the
  same batches (the reference of the ratios); ``extract_dataset`` (float32 rows to disk) then
  ``numpy`` mean and covariance;
* tokens: a GPT-2-small-sized model (12 layers, 768 wide) residual stream after block 6, one row per
  real token of documents of random lengths (so batches are padded). Contenders: fxstore eager and
  compiled; a forward-hook loop doing what torchmetrics' ``update`` does (real rows to float64, their
  sum and ``x.T @ x``; the forward stopped after block 6: the reference of the ratios);
  ``extract_dataset`` + numpy.

Per contender: the first call (fxstore builds, self-checks and compiles its step then; later calls on
the same model reuse it), then ``--repeats`` interleaved calls whose median gives the rate (images/s or
tokens/s) and its ratio to the reference of the same run; the peak memory of a repeated call above its
start, each contender in a fresh process after one call of its own (CPU: the kernel's peak resident set,
VmHWM after clearing it; CUDA: allocated), and the bytes kept (the statistics file, the metric's state, or the rows).
fxstore's moments are checked against the reference's in the same run. With ``--save`` the JSON file
in ``benchmarks/results`` is rewritten after every measurement (a stopped run keeps what it measured).

    python benchmarks/bench_stats.py --save        # the recording (about 6 minutes on an idle 2-core CPU)
    python benchmarks/bench_stats.py --quick       # smoke run: tiny sizes, aot_eager
    python benchmarks/bench_stats.py --device cuda --samples 4096 --image-size 224 --sequences 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the package's root

import fxstore  # noqa: E402
from benchmarks._memory import _cpu_peak  # noqa: E402

_MIB = 2**20
Moments = Any  # (mean, covariance) float64 per contender (the accuracy check), and the fingerprint time


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(fn: Callable[[], int], device: str) -> dict[str, float]:
    """Run ``fn`` (it returns the bytes it kept): seconds, peak memory above the start, bytes kept."""
    result: dict[str, float] = {}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with _cpu_peak(result):
        start = time.perf_counter()
        kept = fn()
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - start
    if cuda:
        result["peak"] = torch.cuda.max_memory_allocated() - base
        result["method"] = "torch.cuda.max_memory_allocated"
    result["kept"] = kept
    return result


def _moments(count: int, total: torch.Tensor, outer: torch.Tensor) -> Moments:
    mean = total.double().cpu() / count
    return mean, (outer.double().cpu() - count * torch.outer(mean, mean)) / (count - 1)


def _fingerprint_seconds(model: torch.nn.Module, moments: dict[str, Any]) -> None:
    """How long one ``model_fingerprint`` takes: every fxstore call digests the weights once (token runs:
    twice, once in the text identity), a fixed cost per call included in its rate."""
    start = time.perf_counter()
    fxstore.capture.model_fingerprint(model)
    moments["fingerprint_s"] = time.perf_counter() - start


class _Pooled(torch.nn.Module):
    """resnet50 up to its pooled features ``[N, 2048]``: torchmetrics' feature module."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)


def _image_contenders(args: argparse.Namespace, root: Path, moments: dict[str, Moments]) -> tuple[
        dict[str, Callable[[], int]], int]:
    import torchvision
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval().to(args.device)
    images = torch.rand(args.samples, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images)
    common = dict(batch_size=args.batch_size, device=args.device, progress=False)

    def fxstore_run(compile: bool | str, name: str) -> int:
        s = fxstore.feature_statistics(net, ["avgpool"], data, reduce="flatten", compile=compile, **common)["avgpool"]
        moments[name] = (s.mean, s.cov)
        return s.save(root / "stats.safetensors").stat().st_size

    def torchmetrics_run() -> int:
        metric = FrechetInceptionDistance(feature=_Pooled(net), normalize=True).to(args.device)
        with torch.inference_mode():
            for i in range(0, len(images), args.batch_size):
                metric.update(images[i:i + args.batch_size].to(args.device), real=True)
        moments["reference"] = _moments(int(metric.real_features_num_samples), metric.real_features_sum,
                                        metric.real_features_cov_sum)
        return metric.real_features_sum.nbytes + metric.real_features_cov_sum.nbytes

    def extract_numpy_run() -> int:
        out = root / "rows"
        shutil.rmtree(out, ignore_errors=True)
        fxstore.extract_dataset(net, ["avgpool"], data, out, reduce="flatten", target_key=False, **common)
        rows = np.asarray(fxstore.load_features(out)["avgpool"], dtype=np.float64)
        rows.mean(0), np.cov(rows, rowvar=False)
        return _folder_bytes(out)

    _fingerprint_seconds(net, moments)
    return {"torchmetrics FID update loop": torchmetrics_run,
            "fxstore eager": lambda: fxstore_run(False, "fxstore eager"),
            "fxstore compiled": lambda: fxstore_run(args.compile, "fxstore compiled"),
            "extract_dataset + numpy": extract_numpy_run}, len(images)


class _Stop(Exception):
    """Raised by the hook loop's hook: the layers after block 6 are not needed."""


def _token_contenders(args: argparse.Namespace, root: Path, moments: dict[str, Moments]) -> tuple[
        dict[str, Callable[[], int]], int]:
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = 50257
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                               unk_token="t0")), unk_token="t0")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    model = transformers.GPT2Model(config).eval().to(args.device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.sequences,), generator=g).tolist()
    docs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    common = dict(tokenizer=tok, batch_size=args.text_batch_size, device=args.device, progress=False)
    layer = "h.6"

    def fxstore_run(compile: bool | str, name: str) -> int:
        s = fxstore.feature_statistics(model, [layer], docs, compile=compile, **common)[layer]
        moments[name] = (s.mean, s.cov)
        return s.save(root / "tokens.safetensors").stat().st_size

    def hook_loop_run() -> int:
        d = config.n_embd
        total = torch.zeros(d, dtype=torch.float64, device=args.device)
        outer = torch.zeros(d, d, dtype=torch.float64, device=args.device)
        mask = torch.zeros(0)

        def hook(module: Any, inputs: Any, output: Any) -> None:
            nonlocal total, outer
            hidden = output[0] if isinstance(output, tuple) else output
            rows = hidden[mask].double()
            total += rows.sum(0)
            outer += rows.T.mm(rows)  # what torchmetrics' FID update does
            raise _Stop

        handle = model.h[6].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                for i in range(0, len(docs), args.text_batch_size):
                    chunk = docs[i:i + args.text_batch_size]
                    width = max(len(c) for c in chunk)
                    ids = torch.tensor([c + [0] * (width - len(c)) for c in chunk], device=args.device)
                    mask = torch.arange(width, device=args.device) < torch.tensor([len(c) for c in chunk],
                                                                                  device=args.device)[:, None]
                    try:
                        model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        moments["reference"] = _moments(sum(lengths), total, outer)
        return total.nbytes + outer.nbytes

    def extract_numpy_run() -> int:
        out = root / "token-rows"
        shutil.rmtree(out, ignore_errors=True)
        fxstore.extract_dataset(model, [layer], docs, out, **common)
        rows = np.asarray(fxstore.load_features(out)[layer], dtype=np.float64)
        rows.mean(0), np.cov(rows, rowvar=False)
        return _folder_bytes(out)

    _fingerprint_seconds(model, moments)
    return ({"hook loop (float64 sum, x.T @ x)": hook_loop_run,
             "fxstore eager": lambda: fxstore_run(False, "fxstore eager"),
             "fxstore compiled": lambda: fxstore_run(args.compile, "fxstore compiled"),
             "extract_dataset + numpy": extract_numpy_run}, sum(lengths))


def _probe(args: argparse.Namespace, workload: str, key: str) -> dict[str, Any]:
    """The peak memory of one repeated call of contender ``key``, measured in a fresh process (``--probe``)."""
    sizes = ["--device", args.device, "--samples", str(args.samples), "--image-size", str(args.image_size),
             "--batch-size", str(args.batch_size), "--sequences", str(args.sequences), "--seq-len",
             str(args.seq_len), "--text-batch-size", str(args.text_batch_size), "--compile", args.compile]
    done = subprocess.run([sys.executable, __file__, "--only", workload, "--probe", key, *sizes],
                          capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    return {"peak_mib": probe["peak"] / _MIB, "peak_method": probe["method"]}


def _run_probe(contenders: dict[str, Callable[[], int]], key: str, device: str) -> None:
    """``--probe``: run contender ``key`` once (its build), then measure a second call; print the JSON line."""
    contenders[key]()
    gc.collect()
    run = _measure(contenders[key], device)
    print(json.dumps({"peak": run["peak"], "method": run.get("method", "torch.cuda.max_memory_allocated")}))


def _bench(name: str, unit: str, contenders: dict[str, Callable[[], int]], items: int, moments: dict[str, Moments],
           args: argparse.Namespace, table: dict[str, Any], save: Callable[[], None], workload: str) -> None:
    """Fill ``table`` (saved after every measurement): first calls, then interleaved repeats.

    The first contender is the reference of the ratios.
    """
    reference = next(iter(contenders))
    table.update(title=name, unit=unit, items=items, reference=reference, rows={})
    rows = table["rows"]
    for key, fn in contenders.items():  # the first calls: build, self-check, compile
        first = _measure(fn, args.device)
        rows[key] = {"first_call_s": first["seconds"], "runs": []}
        save()
    for _ in range(args.repeats):
        for key, fn in contenders.items():  # interleaved, so drift hits all
            run = _measure(fn, args.device)
            row = rows[key]
            row["runs"].append({"seconds": run["seconds"]})
            seconds = statistics.median(r["seconds"] for r in row["runs"])
            row.update(rate=items / seconds, seconds=seconds, kept_mib=run["kept"] / _MIB,
                       build_s=max(0.0, row["first_call_s"] - seconds))
            save()
    for key in contenders:  # each in a fresh process: another contender's freed memory hides no allocation
        rows[key].update(_probe(args, workload, key))
        save()
    for row in rows.values():
        row["ratio_to_reference"] = row["rate"] / rows[reference]["rate"]
    ref_mean, ref_cov = moments["reference"]
    for key in ("fxstore eager", "fxstore compiled"):  # the same moments as the reference, in the same run
        mean, cov = moments[key]
        rows[key]["max_rel_diff_to_reference"] = max(
            float((mean - ref_mean).abs().max() / ref_mean.abs().max()),
            float((cov - ref_cov).abs().max() / ref_cov.abs().max()))
    table["model_fingerprint_s"] = moments["fingerprint_s"]
    save()
    print(f"\n{name}: {items} {unit}s, first call then the median of {args.repeats} interleaved calls")
    print(f"{'contender':<34}{'first s':>9}{'build s':>9}{unit + 's/s':>12}{'ratio':>7}{'peak MiB':>10}"
          f"{'kept MiB':>10}")
    for key, row in rows.items():
        print(f"{key:<34}{row['first_call_s']:>9.2f}{row['build_s']:>9.2f}{row['rate']:>12.1f}"
              f"{row['ratio_to_reference']:>7.2f}{row['peak_mib']:>10.0f}{row['kept_mib']:>10.2f}")
    for key in ("fxstore eager", "fxstore compiled"):
        print(f"{key}: moments vs {reference}: max relative difference {rows[key]['max_rel_diff_to_reference']:.1e}")
    print(f"model_fingerprint (fxstore's identity of the weights, per call): {moments['fingerprint_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=1024, help="images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=32, help="documents of seq-len/2 to seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--text-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default="inductor", help="the compiled contenders' backend")
    parser.add_argument("--only", choices=["images", "tokens"])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat, aot_eager")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    parser.add_argument("--probe", metavar="CONTENDER", help=argparse.SUPPRESS)  # one peak-memory measurement
    args = parser.parse_args()
    if args.quick:
        args.samples, args.image_size, args.batch_size, args.sequences, args.seq_len = 48, 32, 16, 4, 32
        args.text_batch_size, args.repeats, args.compile = 2, 1, "aot_eager"
    from benchmarks._report import RESULTS, machine

    # the machine and commit now: the code this process imported, whatever HEAD is when it ends
    info = machine(torch.device(args.device), torch.get_num_threads(),
                   "python benchmarks/bench_stats.py " + " ".join(sys.argv[1:]))
    path = RESULTS / f"stats-{args.device}-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
    root = Path(tempfile.mkdtemp(prefix="fxstore-bench-stats-"))
    result: dict[str, Any] = {"options": vars(args)}

    def save() -> None:
        if args.save:
            info["load_average_end"] = os.getloadavg()
            path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")

    if args.probe:
        make = _image_contenders if args.only == "images" else _token_contenders
        contenders, _ = make(args, root, {})
        try:
            _run_probe(contenders, args.probe, args.device)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    try:
        if args.only != "tokens":
            moments: dict[str, Moments] = {}
            contenders, n = _image_contenders(args, root, moments)
            _bench(f"resnet50 avgpool (D=2048), {args.image_size}px, batch {args.batch_size}", "image", contenders,
                   n, moments, args, result.setdefault("images", {}), save, "images")
        if args.only != "images":
            moments = {}
            contenders, n = _token_contenders(args, root, moments)
            _bench(f"GPT-2-small-sized h.6 (D=768), {args.sequences} documents of {args.seq_len // 2}-"
                   f"{args.seq_len} tokens, batch {args.text_batch_size}", "token", contenders, n, moments, args,
                   result.setdefault("tokens", {}), save, "tokens")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.save:
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
