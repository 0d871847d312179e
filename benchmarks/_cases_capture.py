"""Capture v2 cases: many compiled extractors in one process, compiled gradient taps over
changing batch sizes, and the cost of the first-call self-check.

- ``many``: twelve single-layer extractors of one model, each ``torch.compile(fullgraph=True)``
  in one process (before capture v2 extractors 9-12 hit dynamo's recompile limit). The
  timed call runs all twelve once; the notes say how many compiled and how many graphs.
- ``grads_shapes``: a training-style step (forward, loss, backward) at twelve batch sizes in
  a row, plain compiled model against ``ex.compile()`` with gradient taps; the timed call is
  the whole twelve-size sweep, after a first sweep that compiles.
- ``verify``: building an extractor and its first call, with the self-check (default) and
  with ``verify=False``, against one plain forward; the difference is what the check costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fxstore

from ._cases_compile import ATOL, RTOL
from ._config import Profile
from ._measure import compare
from ._models import build, vit_blocks
from ._report import Row
from ._timing import Contender, Features
from ._verify import forward_reference, gradient_reference, loss_of

__all__ = ["many_compiled", "grads_over_shapes", "verify_cost"]

_MANY_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                "layer1.0", "layer2.0", "layer3.0", "layer4.0")


def _graph_counter() -> tuple[Callable[..., Any], list[Any]]:
    graphs: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def many_compiled(profile: Profile, device: torch.device) -> list[Row]:
    """Twelve compiled extractors of one model in one process (dynamo, eager backend: the case
    is about dynamo's per-code caches, not kernels)."""
    model = build(profile.small_resnet).to(device)
    x = torch.rand(profile.compile_b, 3, profile.compile_r, profile.compile_r,
                   generator=torch.Generator().manual_seed(3)).to(device)
    layers = _MANY_LAYERS if profile.name != "quick" else _MANY_LAYERS[4:7]
    reference = forward_reference(model, list(layers), x)
    notes: dict[str, str] = {}

    def setup(name: str, make: Callable[[str], nn.Module], features: Callable[[Any, str], torch.Tensor] | None
              ) -> Contender:
        backend, graphs = _graph_counter()
        compiled, failures = [], []
        start = time.perf_counter()
        for layer in layers:
            fn = torch.compile(make(layer), fullgraph=True, backend=backend)
            try:
                with torch.no_grad():
                    fn(x)
                compiled.append((layer, fn))
            except Exception as e:  # the count of failures is the result
                failures.append(f"{layer}: {type(e).__name__}")
        notes[name] = (f"{len(compiled)}/{len(layers)} compiled fullgraph, {len(graphs)} graphs, "
                       f"compile {time.perf_counter() - start:.1f} s" + (f"; failed: {failures[0]}" if failures else ""))

        def run() -> Features | None:
            got: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for layer, fn in compiled:
                    out = fn(x)
                    if features is not None:
                        got[layer] = features(out, layer)
            return got if features is not None else None

        return Contender(name, run, verdict="" if not failures else f"FAILED: {len(failures)} did not compile")

    entries = [
        setup("plain model ×12, compiled", lambda _layer: build(profile.small_resnet).to(device), None),
        setup("fxstore ×12 (one layer each), compiled", lambda layer: fxstore.FeatureExtractor(
            model, [layer], keep_output=False, detach=True), lambda out, layer: out[1][layer]),
        setup("torchvision extractor ×12, compiled", lambda layer: create_feature_extractor(
            model, {layer: layer}), lambda out, layer: out[layer]),
    ]
    label = f"{profile.small_resnet} b{profile.compile_b} {profile.compile_r}² · {len(layers)} extractors"
    return compare(f"12 many compiled extractors · {label}", entries, reference, profile, device,
                   keys={e.name: list(layers) for e in entries[1:]}, rtol=RTOL, atol=ATOL, notes=notes)


def grads_over_shapes(profile: Profile, device: torch.device) -> list[Row]:
    """A compiled step with gradient taps over twelve batch sizes in a row."""
    model = build(profile.small_resnet).to(device)
    sizes = list(range(1, 13)) if profile.name != "quick" else [1, 2, 3]
    r = profile.backward_r
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.rand(b, 3, r, r, generator=generator).to(device) for b in sizes]
    names = ["layer2", "layer4"]
    reference = gradient_reference(model, names, inputs[-1])
    notes: dict[str, str] = {}

    def plain() -> Contender:
        backend, graphs = _graph_counter()
        compiled = torch.compile(model, backend=_wrapped(profile.backward_compile_backend, backend))

        def sweep() -> None:
            for x in inputs:
                model.zero_grad(set_to_none=True)
                loss_of(compiled(x)).backward()

        start = time.perf_counter()
        sweep()
        notes["plain fwd+bwd, compiled"] = f"first sweep {time.perf_counter() - start:.1f} s, {len(graphs)} graphs"
        return Contender("plain fwd+bwd, compiled", lambda: (sweep(), None)[1])

    def extractor() -> Contender:
        backend, graphs = _graph_counter()
        ex = fxstore.FeatureExtractor(model, grads=names)
        ex.compile(backend=_wrapped(profile.backward_compile_backend, backend))

        def sweep() -> Features:
            feats: dict[str, torch.Tensor] = {}
            for x in inputs:
                model.zero_grad(set_to_none=True)
                out, feats = ex(x)
                loss_of(out).backward()
            return ex.gradients(feats)

        start = time.perf_counter()
        sweep()
        notes["fxstore grads=, ex.compile()"] = f"first sweep {time.perf_counter() - start:.1f} s, {len(graphs)} graphs"
        return Contender("fxstore grads=, ex.compile()", sweep)

    entries = [plain(), extractor()]
    label = f"{profile.small_resnet} {r}² · batch {sizes[0]}..{sizes[-1]} · grads of 2 stages"
    return compare(f"13 compiled grads over {len(sizes)} batch sizes ({profile.backward_compile_backend}) · {label}",
                   entries, reference, profile, device, rtol=RTOL, atol=ATOL, notes=notes)


def _wrapped(backend_name: str, counter: Callable[..., Any]) -> Callable[..., Any]:
    """A backend that counts graphs, then hands them to ``backend_name``."""
    from torch._dynamo import lookup_backend

    real = lookup_backend(backend_name)

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        counter(gm, example_inputs)
        return real(gm, example_inputs)

    return backend


def verify_cost(profile: Profile, device: torch.device) -> list[Row]:
    """Build + first call, with and without the self-check, against one plain forward."""
    rows: list[Row] = []
    for name, r, pick in ((profile.resnet, profile.eager_r, lambda m: ["layer1", "layer2", "layer3", "layer4"]),
                          (profile.vit, profile.vit_r, vit_blocks)):
        model = build(name, image_size=r).to(device)
        x = torch.rand(1, 3, r, r, generator=torch.Generator().manual_seed(5)).to(device)
        layers = pick(model)
        reference = forward_reference(model, layers, x)

        def first_call(verify: bool, model: nn.Module = model, layers: list[str] = layers,
                       x: torch.Tensor = x) -> Callable[[], Features]:
            def run() -> Features:
                with torch.no_grad():
                    ex = fxstore.FeatureExtractor(model, layers, verify=verify)
                    out, feats = ex(x)
                return {**feats, "output": out}
            return run

        def plain(model: nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        entries = [Contender("plain forward", plain),
                   Contender("build + first call, verify=True (default)", first_call(True)),
                   Contender("build + first call, verify=False", first_call(False))]
        rows += compare(f"14 self-check cost · {name} b1 {r}² · {len(layers)} layers", entries, reference,
                        profile, device)
    return rows
