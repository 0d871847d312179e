"""Models by name: torchvision names, ``timm:NAME`` and ``package.module:factory`` paths.

Nothing is downloaded. Weights are random (seeded, so the same name gives the same
model in every process and every run), or come from a local ``state_dict`` file loaded
with ``torch.load(..., weights_only=True)``, which never runs pickled code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import ConfigError

__all__ = ["load_model"]


def load_model(name: str, weights: str | os.PathLike[str] | None = None, *, seed: int = 0) -> nn.Module:
    """Build a model by name, in eval mode.

    Args:
        name: A torchvision model name (``"resnet50"``), ``"timm:NAME"`` (needs timm),
            ``"hf:DIR"`` (a local Hugging Face folder, see :func:`fxstore.cli.hf.load_hf`), or
            an import path ``"package.module:factory"`` of a callable returning a module.
        weights: A local ``state_dict`` file (``torch.save(model.state_dict(), path)``);
            default: random weights initialised from ``seed``.
        seed: Seed of the random initialisation (the global RNG state is left as it was).

    Returns:
        The model, in eval mode.

    Raises:
        ConfigError: an unknown name, a missing or unsafe weights file, or weights that do
            not fit the model; the message suggests close names.

    Example:
        >>> import torch
        >>> from fxstore.cli.models import load_model
        >>> a, b = load_model("resnet18"), load_model("resnet18")
        >>> torch.equal(a.conv1.weight, b.conv1.weight), a.training
        (True, False)
    """
    if isinstance(name, str) and name.startswith("hf:"):  # a local Hugging Face folder
        from .hf import load_hf

        return load_hf(name, need_tokenizer=False)[0]
    build = _factory(name)
    with torch.random.fork_rng(devices=[]):  # restores the CPU generator; CUDA's is never touched
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every CUDA generator
        model = build()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model '{name}' built a {type(model).__name__}, not a torch.nn.Module.\n"
            "Hint: point to a function or class that returns an nn.Module."
        )
    if weights is not None:
        _load_weights(model, name, weights)
    return model.eval()


def _factory(name: str) -> Callable[[], Any]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name {name!r} is empty or not a string.\nHint: e.g. 'resnet50'.")
    if name.startswith("timm:"):
        return _timm(name[len("timm:"):])
    if ":" in name:
        return _import_path(name)
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        mean = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"'{name}' is not a torchvision model.{mean}\n"
            "Hint: use a name from torchvision.models.list_models(), 'timm:NAME', or 'package.module:factory'."
        )
    return lambda: torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> Callable[[], Any]:
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"model 'timm:{name}' needs timm, which is not installed.\nHint: pip install timm.") from e
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        mean = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"'{name}' is not a timm model.{mean}\nHint: see timm.list_models().")
    return lambda: timm.create_model(name, pretrained=False)


def _import_path(path: str) -> Callable[[], Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import '{module_name}' for model '{path}': {e}.\n"
            "Hint: use 'package.module:factory' with the package importable (on PYTHONPATH)."
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            f"'{module_name}' has no callable '{attr}' for model '{path}'.\n"
            "Hint: name a function or class that builds the model without arguments."
        )
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ConfigError(
            f"'{path}' cannot be called without arguments ({e}).\n"
            "Hint: point to a function that builds the model with no arguments, e.g. a small wrapper "
            "def make(): return MyModel(width=64)."
        ) from e
    except ValueError:  # no signature (a builtin): call it and see
        pass
    return factory


def _load_weights(model: nn.Module, name: str, path: str | os.PathLike[str]) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ConfigError(f"weights file '{path}' does not exist.\nHint: pass a saved state_dict file.") from e
    except Exception as e:  # unpickling refused by weights_only, or not a torch file
        raise ConfigError(
            f"cannot load weights file '{path}' safely: {type(e).__name__}: {str(e).splitlines()[0]}\n"
            "Hint: save it with torch.save(model.state_dict(), path); pickled objects are refused."
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file '{path}' holds a {type(state).__name__}, not a state_dict.\n"
                          "Hint: save it with torch.save(model.state_dict(), path).")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(
            f"weights file '{path}' does not fit model '{name}': {first}\n"
            "Hint: the file must be the state_dict of this very architecture."
        ) from e
