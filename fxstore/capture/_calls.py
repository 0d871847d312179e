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

from torch import nn

__all__ = ["call_defaults", "with_defaults", "fresh"]


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
