"""Dataset statistics: fxstore (eager, compiled) against torchmetrics' FID loop and ``extract_dataset`` + numpy.

Two workloads, random weights and synthetic data held in memory:

* images: resnet50's pooled features (``avgpool``, D = 2048) over random images. Contenders:
  ``fxstore.feature_statistics`` eager and ``compile=True``; torchmetrics'
  ``FrechetInceptionDistance(feature=<resnet50 up to the pooled features>)`` ``update`` loop over the
  same batches; ``extract_dataset`` (float32 rows to disk) then ``numpy`` mean and covariance;
* tokens: a GPT-2-small-sized model (12 layers, 768 wide) residual stream after block 6, one row
  per token. Contenders: fxstore eager and compiled; ``extract_dataset`` + numpy.

Reported per contender: the median rate over ``--repeats`` interleaved runs (images/s or tokens/s),
the peak resident memory above the start of the run, and the bytes kept (the statistics file, the
metric's state, or the extracted rows). The compiled runs are timed after one warm-up call: each call
builds a new extractor, so dynamo traces again, but inductor's cache is warm.

    python benchmarks/bench_stats.py --save
    python benchmarks/bench_stats.py --device cuda --samples 4096 --image-size 224 --sequences 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(fn: Callable[[], int], device: str) -> dict[str, float]:
    """Run ``fn`` (it returns the bytes it kept): seconds, peak memory above the start, bytes kept."""
    result: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with _cpu_peak(result):
        start = time.perf_counter()
        kept = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - start
    if device.startswith("cuda"):
        result["peak"] = torch.cuda.max_memory_allocated() - base
    result["kept"] = kept
    return result


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


def _image_contenders(args: argparse.Namespace, root: Path) -> tuple[dict[str, Callable[[], int]], int]:
    import torchvision
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval().to(args.device)
    images = torch.rand(args.samples, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images)
    common = dict(batch_size=args.batch_size, device=args.device, progress=False)

    def fxstore_run(compile: bool) -> int:
        s = fxstore.feature_statistics(net, ["avgpool"], data, reduce="flatten", compile=compile, **common)
        return s["avgpool"].save(root / "stats.safetensors").stat().st_size

    def torchmetrics_run() -> int:
        metric = FrechetInceptionDistance(feature=_Pooled(net), normalize=True).to(args.device)
        with torch.inference_mode():
            for i in range(0, len(images), args.batch_size):
                metric.update(images[i:i + args.batch_size].to(args.device), real=True)
        return metric.real_features_sum.nbytes + metric.real_features_cov_sum.nbytes

    def extract_numpy_run() -> int:
        out = root / "rows"
        shutil.rmtree(out, ignore_errors=True)
        fxstore.extract_dataset(net, ["avgpool"], data, out, reduce="flatten", target_key=False, **common)
        rows = np.asarray(fxstore.load_features(out)["avgpool"], dtype=np.float64)
        rows.mean(0), np.cov(rows, rowvar=False)
        return _folder_bytes(out)

    return {"fxstore eager": lambda: fxstore_run(False), "fxstore compiled": lambda: fxstore_run(True),
            "torchmetrics FID update loop": torchmetrics_run, "extract_dataset + numpy": extract_numpy_run}, len(images)


def _token_contenders(args: argparse.Namespace, root: Path) -> tuple[dict[str, Callable[[], int]], int]:
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
    docs = [torch.randint(0, vocab, (args.seq_len,), generator=g).tolist() for _ in range(args.sequences)]
    common = dict(tokenizer=tok, batch_size=args.text_batch_size, device=args.device, progress=False)
    layer = "h.6"

    def fxstore_run(compile: bool) -> int:
        s = fxstore.feature_statistics(model, [layer], docs, compile=compile, **common)
        return s[layer].save(root / "tokens.safetensors").stat().st_size

    def extract_numpy_run() -> int:
        out = root / "token-rows"
        shutil.rmtree(out, ignore_errors=True)
        fxstore.extract_dataset(model, [layer], docs, out, **common)
        rows = np.asarray(fxstore.load_features(out)[layer], dtype=np.float64)
        rows.mean(0), np.cov(rows, rowvar=False)
        return _folder_bytes(out)

    return ({"fxstore eager": lambda: fxstore_run(False), "fxstore compiled": lambda: fxstore_run(True),
             "extract_dataset + numpy": extract_numpy_run}, args.sequences * args.seq_len)


def _bench(name: str, unit: str, contenders: dict[str, Callable[[], int]], items: int,
           args: argparse.Namespace) -> dict[str, Any]:
    for fn in contenders.values():  # warm-up: compile, allocator, caches
        fn()
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for key, fn in contenders.items():  # interleaved, so drift hits all
            runs[key].append(_measure(fn, args.device))
    print(f"\n{name}: {items} {unit}s x {args.repeats} runs (medians)")
    print(f"{'contender':<32}{unit + 's/s':>12}{'peak MiB':>10}{'kept MiB':>10}")
    table = {}
    for key, rs in runs.items():
        rate = statistics.median(items / r["seconds"] for r in rs)
        peak = statistics.median(r["peak"] for r in rs) / _MIB
        kept = rs[-1]["kept"] / _MIB
        print(f"{key:<32}{rate:>12.1f}{peak:>10.0f}{kept:>10.1f}")
        table[key] = {"rate": rate, "peak_mib": peak, "kept_mib": kept,
                      "rates": [items / r["seconds"] for r in rs], "peaks_mib": [r["peak"] / _MIB for r in rs]}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=256, help="images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--text-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["images", "tokens"])
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    args = parser.parse_args()
    from benchmarks._report import RESULTS, machine

    # the machine and commit now: the code this process imported, whatever HEAD is when it ends
    info = machine(torch.device(args.device), torch.get_num_threads(),
                   "python benchmarks/bench_stats.py " + " ".join(sys.argv[1:]))
    root = Path(tempfile.mkdtemp(prefix="fxstore-bench-stats-"))
    result: dict[str, Any] = {"options": vars(args)}
    try:
        if args.only != "tokens":
            contenders, n = _image_contenders(args, root)
            result["images"] = _bench(f"resnet50 avgpool (D=2048), {args.image_size}px, batch {args.batch_size}",
                                      "image", contenders, n, args)
        if args.only != "images":
            contenders, n = _token_contenders(args, root)
            result["tokens"] = _bench(f"GPT-2-small-sized h.6 (D=768), {args.sequences}x{args.seq_len} tokens, "
                                      f"batch {args.text_batch_size}", "token", contenders, n, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.save:
        info["load_average_end"] = os.getloadavg()
        path = RESULTS / f"stats-{args.device}-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
        path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
