"""The friendly stateful API: storages that remember features across calls.

``ForwardModuleStorage`` and ``BackwardModuleStorage`` keep the calling conventions of
hook-based storages (one input, a list of inputs, a named group of layers with its own
input; ``storage[layer]``) on top of the pure :class:`~fxstore.FeatureExtractor`. The
state handling is shared with the hook reference backend (:mod:`fxstore.storage.hooks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, canonical_specs, gradient_of, parse_device, parse_dtype, spec_label
from ..errors import ConfigError, GradientNotReadyError, LayerNotFoundError

__all__ = ["ForwardModuleStorage", "BackwardModuleStorage", "StorageBase", "GroupView"]

def split_groups(layers: Any) -> dict[str | None, Any]:
    """``{group: layers}``; a plain list (or ``{layer: alias}``) is the unnamed group ``None``."""
    if isinstance(layers, Mapping) and layers and all(isinstance(v, (list, tuple)) for v in layers.values()):
        for name in layers:
            if not isinstance(name, str):
                raise ConfigError(f"group name {name!r} is not a string.\nHint: use {{'style': [layer, ...]}}.")
        return dict(layers)
    if layers is not None and not isinstance(layers, (Mapping, list, tuple, str, nn.Module, type)) \
            and not callable(layers) and isinstance(layers, Iterable):
        layers = list(layers)  # a generator is read once here: every group and backend sees the same list
    return {None: layers}


class StorageBase:
    """State and calling conventions shared by every storage backend.

    Subclasses implement :meth:`_run`, which runs one input for one group and returns
    the model output and ``{label: [tensor, ...]}`` for that call.
    """

    def __init__(self, model: nn.Module, layers: Any) -> None:
        self._model = model
        self._groups = split_groups(layers)
        self._labels: dict[str | None, dict[str, str]] = {}  # group -> handle -> label
        for group, group_layers in self._groups.items():
            handles: dict[str, str] = {}
            for spec, alias in canonical_specs(group_layers, model):
                label = alias or spec_label(spec)
                handles[label] = label
                handles.setdefault(spec_label(spec), label)
            self._labels[group] = handles
        self._module_names = {id(m): n for n, m in model.named_modules()}
        self._state: dict[str | None, dict[str, list[Any]]] = {g: {} for g in self._groups}

    # -- calling ---------------------------------------------------------------------------

    def __call__(self, inputs: Any, group: str | None = None, **kwargs: Any) -> Any:
        """Run one input, or a list of inputs in order, through ``group``'s layers.

        Args:
            inputs: One input (a tuple is several positional arguments), or a list of inputs.
            group: The named group to run (``None``: the unnamed group).
            **kwargs: Keyword arguments for the model, passed to every call
                (``storage(input_ids, attention_mask=mask)``).

        Returns:
            The model output for each input (a list for a list of inputs); ``None`` where a
            storage does not compute the output.
        """
        if group not in self._groups:
            known = [g for g in self._groups if g is not None]
            raise LayerNotFoundError(
                f"group {group!r} does not exist (groups: {known}).\n"
                "Hint: call storage(x, name) with a group given at construction, or storage(x) without groups."
            )
        many = isinstance(inputs, (list, tuple))
        batch = list(inputs) if many else [inputs]
        outputs = []
        calls: dict[str, list[Any]] = {}
        for x in batch:
            output, stored = self._run(group, x, kwargs)
            outputs.append(output)
            for label, values in stored.items():
                calls.setdefault(label, []).extend(values)
        state = self._state[group]
        if group is None:
            for label, values in calls.items():
                state.setdefault(label, []).extend(values)
        else:  # a named group keeps its latest call (an optimisation loop calls it every step)
            state.clear()
            state.update(calls)
        return outputs if many else outputs[0]

    def _run(self, group: str | None, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, list[Any]]]:
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        """``storage[layer]`` -> list of tensors in call order; ``storage[group]`` -> a view."""
        if isinstance(key, str) and key in self._groups:
            return GroupView(self, key)
        if None not in self._groups:
            raise LayerNotFoundError(
                f"{key!r} is not a group of this storage (groups: {sorted(g for g in self._groups if g)}).\n"
                "Hint: read a group first, storage['group'][layer], or pass a plain list of layers."
            )
        return [self._read(v) for v in self._state[None].get(self._label(None, key), [])]

    def _label(self, group: str | None, layer: Any) -> str:
        handles = self._labels[group]
        name = self._module_names.get(id(layer)) if isinstance(layer, nn.Module) else layer
        if isinstance(name, str) and name in handles:
            return handles[name]
        known = sorted(handles)
        where = "this storage" if group is None else f"group '{group}'"
        raise LayerNotFoundError(
            f"layer {layer if isinstance(layer, str) else type(layer).__name__!r} is not stored by {where} "
            f"(layers: {known}).\nHint: read with a layer object or name given at construction"
            + ("." if group is not None else ", or a group name.")
        )

    def _read(self, value: Any) -> torch.Tensor:
        return value

    @property
    def state(self) -> dict[Any, Any]:
        """Everything stored: ``{label: [tensors]}`` plus ``{group: {label: value}}``."""
        out: dict[Any, Any] = {label: self[label] for label in self._state.get(None, {})}
        for group in self._groups:
            if group is not None:
                out[group] = dict(GroupView(self, group))
        return out

    @property
    def layers(self) -> dict[str | None, list[str]]:
        """Labels stored per group (``None`` is the unnamed group)."""
        return {g: sorted(set(h.values())) for g, h in self._labels.items()}

    def clear(self) -> None:
        """Forget everything stored."""
        for state in self._state.values():
            state.clear()

    def __len__(self) -> int:
        return sum(len(s) for s in self._state.values())

    def __repr__(self) -> str:
        groups = {g if g is not None else "*": sorted(set(h.values())) for g, h in self._labels.items()}
        return f"{type(self).__name__}({groups})"


class GroupView(Mapping):
    """Read-only view of one group: ``view[layer]`` is a tensor, or a list of them.

    A group keeps its latest call; a layer that produced several tensors in it (a list
    of inputs, a module called several times) gives a list.
    """

    def __init__(self, storage: StorageBase, group: str) -> None:
        self._storage, self._group = storage, group

    def __getitem__(self, layer: Any) -> Any:
        label = self._storage._label(self._group, layer)
        values = [self._storage._read(v) for v in self._storage._state[self._group].get(label, [])]
        if not values:
            raise LayerNotFoundError(
                f"group '{self._group}' has nothing stored for {label!r} yet.\n"
                f"Hint: call storage(x, '{self._group}') first."
            )
        return values[0] if len(values) == 1 else values

    def __iter__(self) -> Iterator[str]:
        return iter(self._storage._state[self._group])

    def __len__(self) -> int:
        return len(self._storage._state[self._group])

    def __repr__(self) -> str:
        return f"GroupView({self._group!r}, layers={list(self)})"


class _FxStorage(StorageBase):
    """Storage backed by one :class:`FeatureExtractor` per group."""

    def __init__(self, model: nn.Module, layers: Any, extractor_options: dict[str, Any]) -> None:
        super().__init__(model, layers)
        self._extractors = {
            group: FeatureExtractor(model, **{**extractor_options, **self._layer_args(group_layers)})
            for group, group_layers in self._groups.items()
        }

    def _layer_args(self, layers: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _collect(self, extractor: FeatureExtractor, features: dict[str, torch.Tensor],
                 grads: bool = False) -> dict[str, list[Any]]:
        return extractor.by_label(features, grads)

    @property
    def extractors(self) -> dict[str | None, FeatureExtractor]:
        """The extractor of each group (``None`` is the unnamed group)."""
        return dict(self._extractors)


class ForwardModuleStorage(_FxStorage):
    """Store the outputs of chosen layers, call after call.

    Args:
        model: The model.
        layers: A list of layers (module objects, names, patterns, types, predicates), a
            dict ``{layer: alias}``, or named groups ``{"style": [...], "content": [...]}``
            that are run separately (``storage(x, "style")``), each running only the part
            of the model its layers need.
        keep_output: Also compute the model output and return it from the call.
        detach: Store without autograd history (``False`` keeps it, e.g. for style losses).
        device: Store on this device; from CUDA to ``"cpu"`` the copy is non-blocking into
            pinned memory and is waited for when a value is read.
        dtype: Store in this dtype (cast inside the graph).
        **trace_options: ``leaf_modules``, ``autowrap_functions``, ``autowrap_modules``,
            ``concrete_args``, ``transform`` as for :class:`FeatureExtractor`.

    Example:
        >>> import torch, torchvision, fxstore
        >>> cnn = torchvision.models.vgg11().eval()
        >>> storage = fxstore.ForwardModuleStorage(cnn, [cnn.features[3]])
        >>> storage([torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)])
        [None, None]
        >>> [tuple(t.shape) for t in storage[cnn.features[3]]]
        [(1, 128, 16, 16), (1, 128, 16, 16)]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any,
        *,
        keep_output: bool = False,
        detach: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **trace_options: Any,
    ) -> None:
        self._non_blocking = device is not None and str(device).startswith("cpu") and torch.cuda.is_available()
        options = dict(keep_output=keep_output, detach=detach, device=device, dtype=dtype,
                       non_blocking=self._non_blocking, **trace_options)
        super().__init__(model, layers, options)

    def _layer_args(self, layers: Any) -> dict[str, Any]:
        return {"layers": layers}

    def _run(self, group: str | None, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, list[Any]]]:
        extractor = self._extractors[group]
        output, features = extractor(*x, **kwargs) if isinstance(x, tuple) else extractor(x, **kwargs)
        if self._non_blocking and any(t.is_cuda for t in _tensors(x)):
            event = torch.cuda.Event()
            event.record()
            return output, {k: [_Pending(t, event) for t in v] for k, v in self._collect(extractor, features).items()}
        return output, self._collect(extractor, features)

    def _read(self, value: Any) -> torch.Tensor:
        return value.wait() if isinstance(value, _Pending) else value


class BackwardModuleStorage(_FxStorage):
    """Store gradients of the loss with respect to chosen layers' outputs.

    A normal training step fills it: ``out = storage(x)`` runs the model with gradient taps
    inside its graph, ``loss.backward()`` computes the gradients, ``storage[layer]`` reads
    them (one per call, in call order). Parameter gradients are unchanged by the taps.

    Args:
        model: The model.
        layers: Layers whose output gradients are stored (same forms as the forward storage).
        device: Move read gradients to this device.
        dtype: Cast read gradients to this dtype.
        **trace_options: As for :class:`FeatureExtractor`.

    Example:
        >>> import torch, torchvision, fxstore
        >>> cnn = torchvision.models.vgg11()
        >>> grads = fxstore.BackwardModuleStorage(cnn, [cnn.features[3]])
        >>> out = grads(torch.rand(1, 3, 32, 32))
        >>> torch.nn.functional.cross_entropy(out, torch.tensor([1])).backward()
        >>> tuple(grads[cnn.features[3]][0].shape)
        (1, 128, 16, 16)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **trace_options: Any,
    ) -> None:
        self._target = {"device": parse_device(device), "dtype": parse_dtype(dtype)}
        super().__init__(model, layers, dict(keep_output=True, **trace_options))

    def _layer_args(self, layers: Any) -> dict[str, Any]:
        return {"layers": None, "grads": layers}

    def _run(self, group: str | None, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, list[Any]]]:
        extractor = self._extractors[group]
        output, features = extractor(*x, **kwargs) if isinstance(x, tuple) else extractor(x, **kwargs)
        return output, self._collect(extractor, features, grads=True)

    def _read(self, ticket: Any) -> torch.Tensor:
        grad = gradient_of(ticket)
        if grad is None:
            raise GradientNotReadyError(
                "a stored call has no gradient yet.\n"
                "Hint: call loss.backward() on a loss computed from the storage's output first."
            )
        if self._target["dtype"] is not None or self._target["device"] is not None:
            grad = grad.to(device=self._target["device"], dtype=self._target["dtype"])
        return grad


class _Pending:
    """A tensor copied without blocking, plus the event that says the copy is done."""

    __slots__ = ("tensor", "event")

    def __init__(self, tensor: torch.Tensor, event: Any) -> None:
        self.tensor, self.event = tensor, event

    def wait(self) -> torch.Tensor:
        self.event.synchronize()
        return self.tensor


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]

