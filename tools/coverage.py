"""Which models fxstore captures, and how: ``python -m tools.coverage``.

Builds every torchvision model (classification, segmentation, video, detection, optical
flow), a sample of timm models across families and small-config Hugging Face models, all
with random weights and small inputs (no downloads), and prints a markdown table: the
frontend the automatic choice picked, the number of selectable nodes, and whether it is
*verified*: the extractor's output is bit-equal to the plain model's, and the outputs of a
random sample of modules equal what forward hooks on the plain model record.

Usage::

    python -m tools.coverage                      # everything, table on stdout
    python -m tools.coverage --write docs/coverage.md
    python -m tools.coverage --only 'detection/*' 'hf/*'
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fxstore import FeatureExtractor, trace_report

from .checkout import commit

__all__ = ["Case", "Row", "cases", "check", "table", "main"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to check: ``"group/name"`` and how to build it with example inputs."""

    name: str
    build: Callable[[], tuple[nn.Module, Inputs]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the coverage table."""

    name: str
    frontend: str
    nodes: int
    verified: bool
    note: str
    seconds: float


# -- the models ----------------------------------------------------------------------------

TIMM_SAMPLE = (
    "resnet18", "resnet50d", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
    "mobilenetv3_small_050", "swin_tiny_patch4_window7_224", "regnetx_002", "levit_128s", "maxvit_tiny_tf_224",
    "eva02_tiny_patch14_224", "coatnet_0_rw_224", "efficientvit_b0", "fastvit_t8", "poolformer_s12", "ghostnet_100",
    "densenet121", "dla34", "hrnet_w18_small",
)


def _torchvision_cases() -> list[Case]:
    import torchvision.models as M

    def classification(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            kwargs: dict[str, Any] = {"weights": None}
            size = 64
            if name.startswith("vit_"):
                size = 28 if name.endswith("_14") else 32
                kwargs["image_size"] = size
            elif name.startswith("maxvit"):
                size = 224
            elif name == "inception_v3":
                size = 299
            if name in ("googlenet", "inception_v3"):
                kwargs["init_weights"] = False
            return M.get_model(name, **kwargs), ((torch.rand(1, 3, size, size),), {})
        return Case(f"classification/{name}", build)

    def segmentation(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            model = M.get_model(name, weights=None, weights_backbone=None, num_classes=5)
            return model, ((torch.rand(1, 3, 64, 64),), {})
        return Case(f"segmentation/{name}", build)

    def video(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            shape = (1, 3, 16, 224, 224) if name.startswith("mvit") or name == "s3d" else (1, 3, 8, 32, 32)
            if name.startswith("swin3d"):
                shape = (1, 3, 4, 64, 64)
            return M.get_model(name, weights=None), ((torch.rand(*shape),), {})
        return Case(f"video/{name}", build)

    def detection(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
            if not name.startswith("ssd"):
                kwargs.update(min_size=128, max_size=160)
            model = M.get_model(name, **kwargs)
            return model, (([torch.rand(3, 120, 160)],), {})
        return Case(f"detection/{name}", build)

    def flow(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            images = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
            return M.get_model(name, weights=None), (images, {"num_flow_updates": 3})
        return Case(f"optical_flow/{name}", build)

    out = [classification(n) for n in M.list_models(module=M)]
    out += [segmentation(n) for n in M.list_models(module=M.segmentation)]
    out += [video(n) for n in M.list_models(module=M.video)]
    out += [detection(n) for n in M.list_models(module=M.detection)]
    out += [flow(n) for n in M.list_models(module=M.optical_flow)]
    return out


def _timm_cases() -> list[Case]:
    def case(name: str) -> Case:
        def build() -> tuple[nn.Module, Inputs]:
            import timm

            model = timm.create_model(name, pretrained=False)
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))
            return model, ((torch.rand(1, *size),), {})
        return Case(f"timm/{name}", build)

    return [case(n) for n in TIMM_SAMPLE]


def _hf_cases() -> list[Case]:
    def gpt2() -> tuple[nn.Module, Inputs]:
        import transformers as T

        model = T.GPT2Model(T.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100))
        return model, ((torch.randint(0, 100, (2, 8)),), {"use_cache": False})

    def bert() -> tuple[nn.Module, Inputs]:
        import transformers as T

        config = T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                              vocab_size=100)
        return T.BertModel(config), ((torch.randint(0, 100, (2, 8)),), {})

    def llama() -> tuple[nn.Module, Inputs]:
        import transformers as T

        config = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=100)
        return T.LlamaModel(config), ((torch.randint(0, 100, (2, 8)),), {"use_cache": False})

    def vit() -> tuple[nn.Module, Inputs]:
        import transformers as T

        config = T.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                             image_size=32, patch_size=8)
        return T.ViTModel(config), ((torch.rand(2, 3, 32, 32),), {})

    return [Case("hf/gpt2", gpt2), Case("hf/bert", bert), Case("hf/llama", llama), Case("hf/vit", vit)]


def cases() -> list[Case]:
    """Every case, in table order; timm and transformers cases only when they are installed.

    Example:
        >>> from tools.coverage import cases
        >>> names = [c.name for c in cases()]
        >>> "detection/fasterrcnn_resnet50_fpn" in names and "hf/gpt2" in names
        True
    """
    out = _torchvision_cases()
    for module, group in (("timm", _timm_cases), ("transformers", _hf_cases)):
        try:
            __import__(module)
        except ImportError:
            continue
        out += group()
    return out


# -- checking one model ----------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    la = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def _recorded(model: nn.Module, names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> dict[str, list[torch.Tensor]]:
    """Forward hooks on the plain model: every tensor each module returns, cloned, in call order."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
            seen[name] += [t.detach().clone() for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _matches(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    """Every captured tensor equals the next unmatched hook tensor, in order.

    The export frontend captures the tensors a call hands on (not an unused second
    output), so ours may be a subsequence of what the hook sees.
    """
    position = 0
    for value in ours:
        while position < len(reference) and not (reference[position].shape == value.shape
                                                  and torch.equal(reference[position], value)):
            position += 1
        if position == len(reference):
            return False
        position += 1
    return bool(ours)


def check(case: Case, samples: int = 4, seed: int = 0, frontend: str = "auto") -> Row:
    """Build one model, capture it (by default with the automatic frontend choice), and verify it.

    Args:
        case: The model.
        samples: How many modules to compare with forward hooks.
        seed: Seed of the weights, inputs and module sample.
        frontend: The frontend to use (``"auto"``: the one fxstore picks).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        model, (args, kwargs) = case.build()
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = trace_report(model, example_inputs=(args, kwargs), frontend=frontend)
            rng = random.Random(case.name)
            modules = [m for m in report.modules if m]
            picked = rng.sample(modules, min(samples, len(modules)))
            extractor = FeatureExtractor(model, picked, frontend=report.frontend, example_inputs=(args, kwargs))
            output, features = extractor(*args, **kwargs)
            expected = model(*args, **kwargs)
            reference = _recorded(model, picked, args, kwargs)
        labelled = extractor.by_label(features)
        ours = {name: [t for v in labelled.get(name, []) for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
                for name in picked}
        bad = [name for name in picked if not _matches(ours[name], reference[name])]
        same = _same(output, expected)
        note = "" if same else "output differs"
        if bad:
            note = (note + "; " if note else "") + f"differs from hooks at {', '.join(bad)}"
        return Row(case.name, report.frontend, len(report.names), same and not bad, note,
                   time.perf_counter() - start)
    except Exception as e:  # a row per model: the table reports failures instead of stopping
        message = str(e).splitlines()[0][:100] if str(e) else ""
        return Row(case.name, "-", 0, False, f"{type(e).__name__}: {message}", time.perf_counter() - start)


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, with a summary line per group."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.name.split("/")[0], []).append(row)
    lines = ["| group | verified | frontends |", "|---|---|---|"]
    for group, members in groups.items():
        frontends: dict[str, int] = {}
        for row in members:
            frontends[row.frontend] = frontends.get(row.frontend, 0) + 1
        used = ", ".join(f"{f}: {n}" for f, n in sorted(frontends.items()))
        lines.append(f"| {group} | {sum(r.verified for r in members)} / {len(members)} | {used} |")
    lines += ["", "| model | frontend | nodes | verified | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.frontend} | {r.nodes} | {'yes' if r.verified else 'NO'} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the coverage check; exit status 1 if any model is not verified."""
    parser = argparse.ArgumentParser(prog="python -m tools.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="glob patterns over 'group/name'")
    parser.add_argument("--write", default=None, help="also write the table (with a header) to this file")
    parser.add_argument("--samples", type=int, default=4, help="modules compared with hooks per model")
    options = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    selected = [c for c in cases() if not options.only or any(fnmatch.fnmatchcase(c.name, p) for p in options.only)]
    rows = []
    for case in selected:
        row = check(case, samples=options.samples)
        rows.append(row)
        print(f"{row.name}: {row.frontend} {'ok' if row.verified else 'NOT VERIFIED ' + row.note} "
              f"({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if options.write:
        import platform

        import torchvision

        versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
        for module in ("timm", "transformers"):
            if module in sys.modules:
                versions += f", {module} {sys.modules[module].__version__}"
        header = (f"# fxstore coverage\n\nGenerated by `python -m tools.coverage` on {time.strftime('%Y-%m-%d')} "
                  f"({platform.machine()}, {versions}, commit {commit()}); {len(rows)} models, random weights, small inputs, "
                  f"{sum(r.seconds for r in rows) / 60:.0f} min.\n\n")
        with open(options.write, "w", encoding="utf-8") as f:
            f.write(header + text)
    return 0 if all(r.verified for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
