"""Keyword defaults for calling a model, so that a plain ``model(ids)`` call can be captured.

Hugging Face language models return a cache object (``DynamicCache`` and friends) beside the
logits unless called with ``use_cache=False``; the cache is not a tensor, so no frontend can
make it a graph output (``torch.export`` refuses it: "Found DynamicCache in output"). When the
user did not ask for the cache, fxstore calls the model with ``use_cache=False``, and says so
in the trace report. Passing ``use_cache=True`` explicitly still reaches the model.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch import nn

__all__ = ["call_defaults", "with_defaults", "dummy_call", "fresh"]


def call_defaults(model: nn.Module) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(defaults, notes)``: keyword arguments fxstore adds to calls the user made without them.

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
        >>> call_defaults(transformers.GPT2Model(config))[0]
        {'use_cache': False}
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return {}, ()
    if not _takes_use_cache(model):
        return {}, ()
    note = (f"called with use_cache=False: {type(model).__name__}'s config.use_cache=True would return a cache "
            "object, which is not a tensor (pass use_cache=True in the call to ask for it)")
    return {"use_cache": False}, (note,)


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``use_cache``, itself or through ``**kwargs`` handed to a
    wrapped model that does (PEFT's ``PeftModel`` around a transformers model)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in parameters:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return False
    return any(module is not model and getattr(getattr(module, "config", None), "use_cache", False)
               and _takes_use_cache(module) for module in model.modules())


def dummy_call(model: nn.Module, defaults: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``(args, kwargs)`` of a call ``model(input_ids)`` built from a Hugging Face model's own ``dummy_inputs``.

    Token ids are the model's (3 sequences of 5 tokens), the call as users write it
    (``input_ids`` positional, fxstore's keyword defaults added); ``None`` for other models, or
    when the ids do not fit the vocabulary.

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
        >>> args, kwargs = dummy_call(transformers.GPT2Model(config), {"use_cache": False})
        >>> tuple(args[0].shape), kwargs
        ((3, 5), {'use_cache': False})
    """
    try:
        dummy = getattr(model, "dummy_inputs", None)
    except Exception:  # a property of the model's own that fails: no dummy inputs
        return None
    ids = dummy.get("input_ids") if isinstance(dummy, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        return None
    try:
        first = next(iter(inspect.signature(model.forward).parameters.values()))
    except (TypeError, ValueError, StopIteration):
        return None
    positional = first.name == "input_ids" or first.kind is inspect.Parameter.VAR_POSITIONAL  # PEFT: (*args, **kwargs)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not positional or not isinstance(vocab, int) or int(ids.max()) >= vocab:
        return None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return (ids.to(device),), dict(defaults)


def with_defaults(defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every default the user did not pass."""
    return {**defaults, **kwargs} if defaults else kwargs


def fresh(function: Any) -> Any:
    """A copy of ``function`` with its own code object (other callables are returned as they are).

    ``torch.compile`` keeps its compiled graphs (and its recompile limit) per code object;
    giving each extractor its own ``forward`` code makes every extractor its own program,
    however many there are in one process. The copy keeps the closure, so a subclass's
    ``forward`` that calls ``super().forward(...)`` still finds its class.
    """
    if not isinstance(function, types.FunctionType):
        return function
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__doc__, copy.__qualname__ = function.__doc__, function.__qualname__
    return copy
