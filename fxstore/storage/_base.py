"""The state every storage shares: groups of layers, what each call stored, and reading it back.

:class:`StorageBase` keeps the calling conventions of hook-based storages (one input, a list of
inputs, a named group of layers with its own input; ``storage[layer]``); a backend only runs one
input for one group (:meth:`StorageBase._run`). It imports no capture code but layer naming.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import canonical_specs, spec_label
from ..errors import ConfigError, LayerNotFoundError

__all__ = ["StorageBase", "GroupView", "split_groups"]


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
        return self.stored(key)[1]

    def stored(self, layer: Any, group: str | None = None) -> tuple[str, list[torch.Tensor]]:
        """``(label, values)``: the label ``layer`` is stored under in ``group``, and its values in call order.

        Raises:
            LayerNotFoundError: ``group`` does not store ``layer``.
        """
        label = self._label(group, layer)
        return label, [self._read(v) for v in self._state[group].get(label, [])]

    def stored_labels(self, group: str | None = None) -> list[str]:
        """The labels ``group`` holds values for, in the order they were first stored."""
        return list(self._state[group])

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
        label, values = self._storage.stored(layer, self._group)
        if not values:
            raise LayerNotFoundError(
                f"group '{self._group}' has nothing stored for {label!r} yet.\n"
                f"Hint: call storage(x, '{self._group}') first."
            )
        return values[0] if len(values) == 1 else values

    def __iter__(self) -> Iterator[str]:
        return iter(self._storage.stored_labels(self._group))

    def __len__(self) -> int:
        return len(self._storage.stored_labels(self._group))

    def __repr__(self) -> str:
        return f"GroupView({self._group!r}, layers={list(self)})"
