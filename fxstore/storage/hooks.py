"""The hook-based reference backend: the same storage API, done the classic way.

Forward hooks store a copy of each module output (so a later in-place op such as
``ReLU(inplace=True)`` cannot overwrite it, as it does in the classic recipe that stores the
output itself); full backward hooks store each gradient of a module's output. This is what
fxstore replaces; it stays as an independent reference for the tests and as the baseline for
the benchmarks. Its known failure modes (see "Why not hooks?" in the README): the copy costs one full write per
stored output even where nothing overwrites it; under ``torch.compile`` hooks registered after compilation, or removed,
are not seen by the compiled graph; functional ops (``x + y``, ``torch.flatten``) have no
module to hook; a full backward hook on a module whose output is modified in place
raises; and the whole model always runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..capture import (
    Edit,
    ModuleRef,
    StoragePolicy,
    canonical_specs,
    checked_edits,
    parse_device,
    parse_dtype,
    spec_label,
)
from ..errors import GradientNotReadyError, InvalidLayerError, LayerNotFoundError
from ._base import StorageBase

__all__ = ["HookForwardModuleStorage", "HookBackwardModuleStorage"]


class _HookStorage(StorageBase):
    """Registers one hook per (group, module) on the user's model; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, layers: Any) -> None:
        super().__init__(model, layers)
        self._active: str | None | bool = False  # the group being run, False when idle
        self._calls: dict[str, list[Any]] = {}
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        for group, group_layers in self._groups.items():
            for spec, alias in canonical_specs(group_layers, model):
                label = alias or spec_label(spec)
                for module in _modules_for(spec, modules, model):
                    self._handles.append(self._register(module, group, label))

    def _register(self, module: nn.Module, group: str | None, label: str) -> RemovableHandle:
        raise NotImplementedError

    def _run(self, group: str | None, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, list[Any]]]:
        self._active, self._calls = group, {}
        try:
            output = self._model(*x, **kwargs) if isinstance(x, tuple) else self._model(x, **kwargs)
        finally:
            self._active = False
        return output, self._calls

    def remove(self) -> None:
        """Remove every hook this storage registered on the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class HookForwardModuleStorage(_HookStorage):
    """Forward-hook storage (reference backend). Same API as :class:`~fxstore.ForwardModuleStorage`.

    Args:
        model: The model; hooks are registered on it until :meth:`remove`.
        layers: Module objects, module names or module types (hooks cannot see functional
            ops), a dict ``{layer: alias}``, or named groups.
        detach: Store ``out.detach()``.
        device: Store ``out.to(device)``.
        dtype: Store ``out.to(dtype)``.
        edits: ``{module: edit}`` (module objects, names or types): each edit
            (``fxstore.Add``, ...) replaces that module's output (its first element for a tuple)
            in the storage's own calls, through a forward hook that runs before the storing
            hooks, so stored values are the edited ones, as in ``FeatureExtractor(edits=...)``.
            An edit switched off (``edit.update(enabled=False)``) leaves the output alone: the
            hook returns the module's own output object.

    Example:
        >>> import torch, torchvision, fxstore
        >>> cnn = torchvision.models.vgg11().eval()
        >>> storage = fxstore.HookForwardModuleStorage(cnn, ["features.3"], detach=True)
        >>> _ = storage(torch.rand(1, 3, 32, 32))
        >>> tuple(storage["features.3"][0].shape)
        (1, 128, 16, 16)
    """

    def __init__(self, model: nn.Module, layers: Any, *, detach: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 edits: dict[Any, Edit] | None = None) -> None:
        self._policy = StoragePolicy.build(detach=detach, device=device, dtype=dtype)
        super().__init__(model, layers)
        self.edits: dict[str, Edit] = {}
        modules = dict(model.named_modules())
        for label, canonical, edit in checked_edits(edits, model):
            self.edits[label] = edit
            for module in _modules_for(canonical, modules, model):
                self._handles.append(self._register_edit(module, edit, label))

    def _register_edit(self, module: nn.Module, edit: Edit, label: str) -> RemovableHandle:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if self._active is not False and bool(edit.enabled):
                return edit(output, f"'{label}'")
            return None

        return module.register_forward_hook(hook, prepend=True)

    def _register(self, module: nn.Module, group: str | None, label: str) -> RemovableHandle:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._active == group and self._active is not False:
                self._calls.setdefault(label, []).append(self._store(output))

        return module.register_forward_hook(hook)

    def _store(self, output: Any) -> Any:
        """The output as it is now: copied (``overwritten_later=True``), so a later in-place op
        (vgg's ``ReLU(inplace=True)``) cannot change what was stored."""
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: self._policy.apply(t, True), output)


class HookBackwardModuleStorage(_HookStorage):
    """Full-backward-hook storage (reference backend). Same API as :class:`~fxstore.BackwardModuleStorage`.

    A forward hook opens a slot per call; the module's full backward hook fills the most
    recent open slot with ``grad_output[0]`` (backward runs calls in reverse order).

    Example:
        >>> import torch, fxstore
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> grads = fxstore.HookBackwardModuleStorage(net, [net[1]])
        >>> grads(torch.rand(2, 4)).sum().backward()
        >>> tuple(grads[net[1]][0].shape)
        (2, 3)
    """

    def __init__(self, model: nn.Module, layers: Any, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._target = (parse_device(device), parse_dtype(dtype))
        super().__init__(model, layers)

    def _register(self, module: nn.Module, group: str | None, label: str) -> RemovableHandle:
        open_slots: list[_Slot] = []

        def forward_hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            if self._active == group and self._active is not False:
                slot = _Slot()
                open_slots.append(slot)
                self._calls.setdefault(label, []).append(slot)

        def backward_hook(_module: nn.Module, _grad_input: Any, grad_output: Any) -> None:
            if open_slots:
                open_slots.pop().grad = grad_output[0]

        handles = [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
        return _Handles(handles)

    def _read(self, slot: Any) -> torch.Tensor:
        if slot.grad is None:
            raise GradientNotReadyError(
                "a stored call has no gradient yet.\nHint: call loss.backward() on the storage's output first."
            )
        device, dtype = self._target
        return slot.grad.to(device=device, dtype=dtype) if (device or dtype) else slot.grad


class _Slot:
    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class _Handles(RemovableHandle):
    """Several hook handles removed together."""

    def __init__(self, handles: list[RemovableHandle]) -> None:  # noqa: D107 - no RemovableHandle state needed
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _modules_for(spec: Any, modules: dict[str, nn.Module], model: nn.Module) -> list[nn.Module]:
    if isinstance(spec, ModuleRef):
        return [modules[spec.name]]
    if isinstance(spec, str):
        if spec in modules:
            return [modules[spec]]
        raise LayerNotFoundError(
            f"'{spec}' is not a module of {type(model).__name__}; hooks can only capture module outputs.\n"
            "Hint: use a module name from model.named_modules(), or fxstore.FeatureExtractor for functional ops."
        )
    if isinstance(spec, type):
        found = [m for m in modules.values() if isinstance(m, spec)]
        if not found:
            raise LayerNotFoundError(f"{type(model).__name__} has no {spec.__name__} module.\nHint: check the type.")
        return found
    raise InvalidLayerError(
        f"the hook backend cannot select layers with {spec_label(spec)}.\n"
        "Hint: pass module objects, module names or module types."
    )


