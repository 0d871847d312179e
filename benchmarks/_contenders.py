"""The ways of capturing layer outputs that the cases compare.

Each builder returns a :class:`~benchmarks._timing.Contender` whose ``run`` does one
forward pass (under ``torch.no_grad()``) and returns ``{key: tensor}`` with the model
output under ``"output"``. Contenders that register hooks get their *own deep copy* of
the model, so their hooks never fire inside another contender sharing the modules.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fxstore

from ._timing import Contender, Features
from ._verify import OUTPUT

__all__ = [
    "plain", "extractor", "hooks", "HookRecipe", "hook_backend", "torchvision_extractor", "torchlens",
    "torchlens_status", "features_of",
]


def features_of(output: Any, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fxstore's ``(output, features)`` as one dict (the output under ``"output"`` if kept)."""
    return {**features, OUTPUT: output} if output is not None else dict(features)


def plain(model: nn.Module, x: torch.Tensor, name: str = "plain model") -> Contender:
    """The model alone: the limit every capture is measured against."""

    def run() -> None:
        with torch.no_grad():
            model(x)

    return Contender(name, run)


def extractor(model: nn.Module, layers: Any, x: torch.Tensor, name: str = "fxstore", **options: Any) -> Contender:
    """``fxstore.FeatureExtractor(model, layers, **options)``."""
    ex = fxstore.FeatureExtractor(model, layers, **options)

    def run() -> Features:
        with torch.no_grad():
            return features_of(*ex(x))

    return Contender(name, run)


class HookRecipe:
    """The classic recipe, hand-written: forward hooks appending ``out.detach()`` to a list.

    Args:
        model: Hooks are registered on this module's submodules.
        names: Module names to hook.
        keep_graph: Append ``out`` itself (keeps the autograd graph alive).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], keep_graph: bool = False) -> None:
        self.model = model
        self.store: dict[str, list[torch.Tensor]] = {}
        self.keep_graph = keep_graph
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.store.setdefault(name, []).append(output if self.keep_graph else output.detach())

        return hook

    def __call__(self, x: torch.Tensor, model: Callable[[torch.Tensor], Any] | None = None) -> Features:
        """Run ``model`` (default: the hooked model) and return what the hooks stored."""
        self.store.clear()
        out = (model if model is not None else self.model)(x)
        return {**self.store, OUTPUT: out}


def hooks(model: nn.Module, names: Sequence[str], x: torch.Tensor, name: str = "hooks (minimal recipe)") -> Contender:
    """:class:`HookRecipe` on a copy of ``model``."""
    recipe = HookRecipe(copy.deepcopy(model), names)

    def run() -> Features:
        with torch.no_grad():
            return recipe(x)

    return Contender(name, run)


def hook_backend(model: nn.Module, names: Sequence[str], x: torch.Tensor,
                 name: str = "fxstore hook backend") -> Contender:
    """``fxstore.HookForwardModuleStorage`` (the reference backend, with its bookkeeping) on a copy."""
    storage = fxstore.HookForwardModuleStorage(copy.deepcopy(model), list(names), detach=True)

    def run() -> Features:
        storage.clear()
        with torch.no_grad():
            out = storage(x)
        return {**{n: storage[n] for n in names}, OUTPUT: out}

    return Contender(name, run)


def torchvision_extractor(model: nn.Module, names: Sequence[str], x: torch.Tensor, keep_output: bool = True,
                          name: str = "torchvision create_feature_extractor") -> Contender:
    """``create_feature_extractor`` returning ``names`` (plus the last node as the output)."""
    nodes = {n: n for n in names}
    if keep_output:
        nodes[get_graph_node_names(model)[1][-1]] = OUTPUT
    ex = create_feature_extractor(model, return_nodes=nodes)

    def run() -> Features:
        with torch.no_grad():
            return ex(x)

    return Contender(name, run)


def torchlens_status(enabled: bool = True) -> str | None:
    """``None`` if TorchLens can be used, else why not (shown in the table)."""
    if not enabled:
        return "skipped in --quick"
    if importlib.util.find_spec("torchlens") is None:
        return "not installed (pip install torchlens)"
    try:
        import torchlens  # noqa: F401
        from torchlens.options import CaptureOptions  # noqa: F401
    except Exception as e:  # any import-time failure means "not usable here"
        return f"import failed: {type(e).__name__}: {e}"
    return None


def torchlens(model: nn.Module, names: Sequence[str], x: torch.Tensor, every: int = 1,
              name: str = "TorchLens") -> Contender:
    """``torchlens.trace`` saving only ``names``; torch functions are unwrapped after each call."""
    import torchlens as tl
    from torchlens.options import CaptureOptions

    twin = copy.deepcopy(model)
    options = CaptureOptions(layers_to_save=list(names), unwrap_when_done=True)

    def run() -> Features:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = tl.trace(twin, x, capture=options)
        return {n: trace[n].out for n in names}

    return Contender(name, run, every=every, note=f"torchlens {tl.__version__}" + (
        f", 1 in {every} repetitions" if every > 1 else ""))
