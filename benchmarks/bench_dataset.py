"""Dataset extraction throughput with the background writer on and off (samples/s).

Runs on CPU or CUDA; the data are random tensors held in memory, so the numbers measure
compute + device->host copy + disk write, not image decoding. Each configuration is run
``--repeats`` times into a fresh folder; the table shows the median and the on/off ratio.

    python benchmarks/bench_dataset.py --device cuda --model resnet50 --samples 4096
    python benchmarks/bench_dataset.py --device cpu --model resnet18 --image-size 64 --samples 512 --save

``--save`` records the result (with date, commit, machine and command) in
``benchmarks/results/dataset-<device>-<date>-<commit>.json``; docs/datasets.md quotes that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fxstore.cli.models import load_model
from fxstore.dataset import extract_dataset


def _run(model: torch.nn.Module, data: TensorDataset, out: Path, args: argparse.Namespace, overlap: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    extract_dataset(model, args.layers, data, out, format=args.format, reduce=args.pool, dtype=args.dtype,
                    batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, overlap=overlap,
                    progress=False, target_key=False)
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3", "layer4"])
    parser.add_argument("--pool", default="none", choices=["none", "avg", "max", "flatten"])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "npy"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    args = parser.parse_args()

    model = load_model(args.model).to(args.device)
    data = TensorDataset(torch.rand(args.samples, 3, args.image_size, args.image_size,
                                    generator=torch.Generator().manual_seed(0)))
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="fxstore-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    _run(model, TensorDataset(data.tensors[0][: args.batch_size * 2]), root / "warmup", args, True)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for overlap in (False, True):  # interleaved, so drift hits both
            rates[overlap].append(_run(model, data, root / f"overlap-{overlap}", args, overlap))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    size = sum(p.stat().st_size for p in (root / "overlap-True").iterdir())
    print(f"{args.model} {args.image_size}px, layers {args.layers}, pool {args.pool}, {args.dtype}, {args.format}, "
          f"{args.samples} samples x {args.repeats}, batch {args.batch_size}, {size / 2**20:.0f} MiB written")
    print(f"device: {args.device} ({device}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'background writer':<20}{'median samples/s':>18}{'runs':>30}")
    for overlap in (False, True):
        runs = ", ".join(f"{r:.0f}" for r in rates[overlap])
        print(f"{'on' if overlap else 'off':<20}{statistics.median(rates[overlap]):>18.1f}{runs:>30}")
    print(f"ratio on/off: {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}")
    if not args.out_dir:
        shutil.rmtree(root, ignore_errors=True)
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the package's root
        from benchmarks._report import RESULTS, machine

        info = machine(torch.device(args.device), torch.get_num_threads(),
                       "python benchmarks/bench_dataset.py " + " ".join(sys.argv[1:]))
        result = {"options": {k: v for k, v in vars(args).items() if k != "out_dir"},
                  "samples_per_s": {"off": rates[False], "on": rates[True]},
                  "median_samples_per_s": {"off": statistics.median(rates[False]),
                                           "on": statistics.median(rates[True])},
                  "written_mib": size / 2**20}
        path = RESULTS / f"dataset-{args.device}-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
        path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
