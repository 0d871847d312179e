"""A model's identity, two ways: a digest of its values, and the state that keys what was built from it.

:func:`model_fingerprint` digests every parameter and buffer value (the dataset manifest and the
deployed artifacts record it). :func:`model_state` is the cheap identity of a model *object*: the
identity, dtype, device and shape of every parameter and buffer, and every module's identity and
mode. :class:`BuildCache` keys what workflows build from a model (extractors: a trace, an export
and a self-check each) by the model object, weakly, and by that state, so that a workflow called
again and again (``patch_sweep`` per prompt pair, ``steering_vectors``) builds once.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import sys
import threading
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["model_fingerprint", "model_state", "BuildCache", "build_cache"]

T = TypeVar("T")


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 over the class, parameter and buffer names, dtypes, shapes and values.

    Example:
        >>> import copy, torch
        >>> from fxstore.capture import model_fingerprint
        >>> a = torch.nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(copy.deepcopy(a))
        True
        >>> model_fingerprint(a).startswith("sha256:")
        True
    """
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        for part in _plain(_values(model, name, tensor).detach()):
            data = part.to("cpu").contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s values: a traceable tensor subclass (torchao's quantized
    weights) is hashed through its inner tensors (``__tensor_flatten__``), as it cannot be viewed as bytes."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in _plain(getattr(tensor, name))]


def _values(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values; a meta tensor offloaded by accelerate (``device_map`` with ``"disk"`` / ``"cpu"``)
    has them in its module's hook, which loads them for each call.

    Raises:
        ConfigError: a meta tensor without values anywhere (nothing to fingerprint).
    """
    if tensor.device.type != "meta":
        return tensor
    path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(path)
        return vars(module).get("_hf_hook").weights_map[leaf]
    except (AttributeError, KeyError, TypeError):
        raise ConfigError(
            f"the model's {name!r} is on the meta device with no offloaded values: fxstore cannot fingerprint "
            "the model.\nHint: load its weights (from_pretrained, load_checkpoint_and_dispatch) before extracting."
        ) from None


def model_state(model: nn.Module) -> tuple[Any, ...]:
    """What a program built from ``model`` depends on besides parameter values: which objects it holds, and modes.

    Every module (path, identity, ``training``) and every parameter and buffer (path, identity,
    dtype, device, shape). Replacing a module, parameter or buffer (``load_state_dict(assign=True)``
    included), ``model.train()``/``eval()``, ``model.half()`` or ``model.to(device)`` change it; an
    in-place change of values (``load_state_dict``, an optimizer step, ``weight.add_``) does not:
    fxstore's programs read the parameters when they run, so they stay right.

    Example:
        >>> import torch
        >>> from fxstore.capture import model_state
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
        >>> before = model_state(net)
        >>> with torch.no_grad():
        ...     _ = net[0].weight.mul_(2)
        >>> model_state(net) == before
        True
        >>> net[0].weight = torch.nn.Parameter(torch.zeros(2, 2))
        >>> model_state(net) == before
        False
    """
    modules = tuple((name, id(m), m.training) for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), t.dtype, t.device, tuple(t.shape))
                    for named in (model.named_parameters(remove_duplicate=False),
                                  model.named_buffers(remove_duplicate=False))
                    for name, t in named)
    return modules, tensors


@dataclasses.dataclass
class _Entry:
    model: weakref.ref[nn.Module]
    state: tuple[Any, ...]
    value: Any


class BuildCache:
    """What workflows build from a model, kept per model object (weakly), key and model state.

    :meth:`get` returns the value built for ``(model, key)`` while :func:`model_state` of the
    model is what it was at build time, and builds it again otherwise (a stale value is never
    returned). The value is built on a *stand-in* of the model: a second instance of its class
    sharing its ``__dict__`` values (the same submodules, parameters, buffers and hooks, by
    reference), so a cached extractor computes what the model computes but does not keep the
    model object alive: when the user drops the model, its entries go. A value that would keep
    the model alive anyway (say, a model whose attributes refer back to it) is returned but not
    kept. At most ``max_entries`` values are kept, the least recently used going first.

    A cached value is shared by every call that gets it: a workflow sets whatever state it
    changes (an edit's buffers) on every call, and two threads must not use one at once.

    Args:
        max_entries: How many values to keep.

    Attributes:
        builds: Values built (a counter, for tests and benchmarks).
        hits: Values served from the cache.

    Example:
        >>> import torch
        >>> from fxstore.capture import BuildCache
        >>> cache, net = BuildCache(max_entries=4), torch.nn.Linear(2, 2)
        >>> first = cache.get(net, "twice", lambda m: [m])
        >>> cache.get(net, "twice", lambda m: [m]) is first, cache.builds, cache.hits
        (True, 1, 1)
        >>> _ = net.eval()
        >>> cache.get(net, "twice", lambda m: [m]) is first   # a module's mode changed: built again
        False
        >>> first[0] is net, first[0].weight is net.weight   # the stand-in shares the model's parameters
        (False, True)
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = int(max_entries)
        self._entries: collections.OrderedDict[tuple[int, Hashable], _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._dead: list[weakref.ref[nn.Module]] = []  # models gone, their entries not yet dropped
        self.builds = 0
        self.hits = 0

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def clear(self) -> None:
        """Drop every value (after changing what :func:`model_state` does not watch, such as ``model.config``)."""
        with self._lock:
            self._entries.clear()

    def get(self, model: nn.Module, key: Hashable, build: Callable[[nn.Module], T]) -> T:
        """The value ``build(stand_in)`` for ``(model, key)``: kept from an earlier call while the model is as it was.

        Args:
            model: The user's model (held weakly).
            key: What else the value depends on (layers, options). A key that cannot be hashed
                (a layer predicate object without ``__hash__``) builds on the model, uncached.
            build: Builds the value from the model's stand-in (or from the model itself when no
                stand-in can be made; such a value is not kept).
        """
        try:
            hash(key)
        except TypeError:
            self.builds += 1
            return build(model)
        state = model_state(model)
        slot = (id(model), key)
        with self._lock:
            self._purge()
            entry = self._entries.get(slot)
            if entry is not None and entry.model() is model and entry.state == state:
                self._entries.move_to_end(slot)
                self.hits += 1
                return entry.value  # type: ignore[no-any-return]
        stand_in = _stand_in(model)
        value = build(model if stand_in is None else stand_in)
        self.builds += 1
        if stand_in is None or _reaches(value, model):
            return value
        ref = weakref.ref(model, self._forget)
        with self._lock:
            self._entries[slot] = _Entry(ref, state, value)
            self._entries.move_to_end(slot)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._purge()
        return value

    def _forget(self, ref: weakref.ref[nn.Module]) -> None:
        """The model behind ``ref`` is gone: drop its entries (now, unless the cache is busy).

        A weakref callback runs wherever the collector runs, possibly inside :meth:`get` in this
        very thread: it never waits for the lock, and leaves the entries to the next purge then.
        """
        self._dead.append(ref)
        if self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _purge(self) -> None:
        """Drop the entries of models that are gone (the lock is held)."""
        while self._dead:
            ref = self._dead.pop()
            for slot in [s for s, e in self._entries.items() if e.model is ref]:
                del self._entries[slot]


build_cache = BuildCache()
"""The cache fxstore's workflows share (``patch_sweep``, ``steering_vectors``)."""


def _stand_in(model: nn.Module) -> nn.Module | None:
    """A second instance of the model's class with the same ``__dict__`` values (``None`` if none can be made).

    A model with an instance-level ``forward`` (accelerate's hook on a dispatched model, nnsight's
    controller) gets none: that wrapper is bound to the model, so a stand-in would run the model.
    """
    if "forward" in vars(model):
        return None
    try:
        stand_in = object.__new__(type(model))
        stand_in.__dict__.update(vars(model))
    except (TypeError, AttributeError):
        return None
    return stand_in


def _reaches(value: Any, target: Any, limit: int = 500_000) -> bool:
    """Whether ``target`` is reachable from ``value`` through references (``True`` past ``limit`` objects).

    Python modules, classes and module namespaces are not followed: what they hold is alive anyway.
    """
    namespaces = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    seen = {id(value)}
    todo = [value]
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if len(seen) > limit:
            return True
        for ref in gc.get_referents(obj):
            if id(ref) in seen or isinstance(ref, (types.ModuleType, type)) or id(ref) in namespaces:
                continue
            seen.add(id(ref))
            todo.append(ref)
    return False
