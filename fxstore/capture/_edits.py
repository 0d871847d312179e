"""Edits: modules that replace a node's value (steering, patching, ablation).

An edit is a small ``nn.Module`` whose tensors are its buffers. The rewrite
(:mod:`._edit_pass`) calls it right after the edited node, so the edited model is still one
graph, and its values are buffers of the extractor: :meth:`Edit.update` copies new values in
place, and a compiled extractor serves them without recompiling. The same modules run inside
forward hooks in the hook backend.

``index`` restricts an edit to part of the value:

- ``None``: the whole value;
- an int, slice or tuple of them, or of lists of ints (``(slice(None), 5)``: token 5 of every row;
  ``(slice(None), [4, 13])``: tokens 4 and 13): the edit is computed on ``value[index]`` and
  written there (part of the graph's structure); in generation the token positions are absolute;
- a boolean tensor (a buffer) over the leading dimensions of the value (``[batch, tokens]``):
  the edit applies where it is true; its tensors broadcast against the whole value;
- an integer tensor of shape ``[batch]`` (a buffer): a position on dimension 1 per row, so
  each row of a batch can patch another token.

Every edit has an on/off switch, ``enabled``, a 0-d boolean buffer like its other tensors:
``edit.update(enabled=False)`` turns it off without recompiling (the edited node's value is then
the model's own, bit for bit), ``edit.update(enabled=True)`` on again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import EditError

__all__ = ["Edit", "Add", "Replace", "Ablate", "Scale", "Apply"]

_STATIC = (int, slice, type(None), type(Ellipsis))


def _static_index(index: Any) -> bool:
    if isinstance(index, tuple):
        return all((isinstance(i, _STATIC) and not isinstance(i, bool)) or _int_list(i) for i in index)
    return isinstance(index, (int, slice)) and not isinstance(index, bool)


def _int_list(index: Any) -> bool:
    """A non-empty list of ints (positions on one dimension: ``(slice(None), [4, 13])``)."""
    return isinstance(index, list) and bool(index) and all(isinstance(i, int) and not isinstance(i, bool) for i in index)


def _as_tensor(name: str, kind: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    raise EditError(
        f"{kind}: {name}={value!r} is not a tensor or a number.\nHint: pass a torch.Tensor (or a float for a scale)."
    )


class Edit(nn.Module):
    """Base of the edit kinds: a module ``(value, site) -> edited value`` whose tensors are buffers.

    Args:
        tensors: The edit's tensors by name (registered as non-persistent buffers, so the
            extractor's ``state_dict`` keeps the model's keys). Tensors that require grad
            stay the same objects: ``torch.autograd.grad(metric, edit.vector)`` works.
        index: Where the edit applies (see the module docstring).

    Attributes:
        enabled: A 0-d boolean buffer: ``False`` leaves the value as it is (switch it with
            ``edit.update(enabled=...)``: in place, so a compiled or exported extractor keeps its program).

    Example:
        >>> import torch, fxstore
        >>> edit = fxstore.Replace(torch.ones(2))
        >>> edit.update(enabled=False)(torch.zeros(2)), bool(edit.enabled)
        (tensor([0., 0.]), False)
    """

    def __init__(self, tensors: dict[str, torch.Tensor], index: Any = None) -> None:
        super().__init__()
        kind = type(self).__name__
        self._names = tuple(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("enabled", torch.tensor(True), persistent=False)
        self._static: Any = None
        self._index_kind = "none"
        if index is None:
            pass
        elif _static_index(index):
            self._static, self._index_kind = index, "static"
        elif isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            self.register_buffer("index", index, persistent=False)
            self._index_kind = "mask"
        elif isinstance(index, torch.Tensor) and not index.is_floating_point() and index.dim() == 1:
            self.register_buffer("index", index, persistent=False)
            self._index_kind = "positions"
        else:
            raise EditError(
                f"{kind}: index={index!r} is not an edit index.\nHint: use None, an int, a slice or a tuple of them "
                "((slice(None), 5): token 5 of every row), a boolean mask tensor, or a 1-D integer tensor of one "
                "position per row."
            )

    @property
    def static_index(self) -> Any:
        """The index given as ints, slices and lists (``None`` for no index or a tensor index)."""
        return self._static

    # -- the computation ---------------------------------------------------------------

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        """The new value of ``value`` (or of ``value[index]`` for a static index), in new memory."""
        raise NotImplementedError

    def forward(self, value: Any, site: str = "") -> Any:
        """The edited value; a tuple or list is edited on its first element.

        Args:
            value: The node's value.
            site: Where the edit is, for error messages (``"'layer1' (node 'layer1.1.relu_1')"``).
        """
        if isinstance(value, (tuple, list)):
            return type(value)((self.forward(value[0], site), *value[1:]))
        if torch.compiler.is_compiling():
            return self._indexed(value)
        self._check(value, site)
        try:
            result = self._indexed(value)
        except (IndexError, RuntimeError) as e:
            raise EditError(
                f"{self._name(site)}: cannot apply to the value of shape {tuple(value.shape)} "
                f"({str(e).splitlines()[0]}).\nHint: check the edit's index and tensor shapes against the node's value."
            ) from e
        if isinstance(result, torch.Tensor) and result.shape != value.shape:
            raise EditError(
                f"{self._name(site)}: the edited value has shape {tuple(result.shape)}, the node's value "
                f"{tuple(value.shape)}.\nHint: an edit must keep the value's shape."
            )
        return result

    def _indexed(self, value: torch.Tensor) -> torch.Tensor:
        kind = self._index_kind
        enabled = self.enabled.to(value.device)
        if kind == "none":
            return torch.where(enabled, self.edit(value), value)
        if kind == "static":
            out = value.clone()
            part = value[self._static]
            out[self._static] = torch.where(enabled, self.edit(part), part)
            return out
        if kind == "mask":
            mask = self.index.to(value.device)
        else:
            positions = self.index.to(value.device)
            mask = torch.arange(value.shape[1], device=value.device) == positions[:, None]
        mask = (mask & enabled).reshape(tuple(mask.shape) + (1,) * (value.dim() - mask.dim()))
        return torch.where(mask, self.edit(value), value)

    # -- checks and updates -------------------------------------------------------------

    def _name(self, site: str) -> str:
        return f"edit {type(self).__name__}" + (f" on {site}" if site else "")

    def _target_shape(self, value: torch.Tensor) -> tuple[int, ...]:
        if self._index_kind == "static":
            return tuple(value[self._static].shape)
        return tuple(value.shape)

    def _broadcast_names(self) -> tuple[str, ...]:
        """The tensors that must broadcast to the (indexed) value."""
        return ()

    def _check(self, value: torch.Tensor, site: str) -> None:
        if self._index_kind == "static":
            try:
                value[self._static]
            except IndexError as e:
                raise EditError(
                    f"{self._name(site)}: index {self._static!r} is out of range for the value of shape "
                    f"{tuple(value.shape)} ({e}).\nHint: index within the node's value."
                ) from e
        elif self._index_kind == "mask":
            mask = tuple(self.index.shape)
            if value.dim() < len(mask) or tuple(value.shape[: len(mask)]) != mask:
                raise EditError(
                    f"{self._name(site)}: the mask of shape {mask} does not cover the leading dimensions of the "
                    f"value of shape {tuple(value.shape)}.\nHint: give a mask of shape value.shape[:k]."
                )
        elif self._index_kind == "positions":
            rows = self.index.shape[0]
            if value.dim() < 2 or value.shape[0] != rows or bool((self.index >= value.shape[1]).any()) \
                    or bool((self.index < -value.shape[1]).any()):
                raise EditError(
                    f"{self._name(site)}: positions {self.index.tolist()} do not index dimension 1 of the value of "
                    f"shape {tuple(value.shape)} row by row.\nHint: give one position per row, each below "
                    f"{value.shape[1] if value.dim() > 1 else 'the value length'}."
                )
        target = self._target_shape(value)
        for name in self._broadcast_names():
            shape = tuple(getattr(self, name).shape)
            try:
                ok = tuple(torch.broadcast_shapes(shape, target)) == target
            except RuntimeError:
                ok = False
            if not ok:
                raise EditError(
                    f"{self._name(site)}: {name} of shape {shape} does not broadcast to the value's shape {target}.\n"
                    f"Hint: give {name} a shape that broadcasts to {target} (e.g. {target[-1:]})."
                )

    def values(self) -> dict[str, torch.Tensor]:
        """The edit's tensors by the names :meth:`update` takes: its own, ``index`` (a tensor index), ``enabled``.

        An exported extractor takes each of them as an input (see :meth:`fxstore.FeatureExtractor.export`).

        Example:
            >>> import torch, fxstore
            >>> list(fxstore.Add(torch.zeros(3)).values())
            ['vector', 'scale', 'enabled']
        """
        names = self._names + (("index",) if "index" in self._buffers else ()) + ("enabled",)
        return {name: getattr(self, name) for name in names}

    def update(self, **values: Any) -> Edit:
        """Copy new values into the edit's buffers, in place (same shape and dtype).

        A compiled extractor serves the new values without recompiling.

        Args:
            **values: Buffer name -> new value (a tensor, or a number for a 0-d buffer such as
                ``scale``); ``index`` updates a tensor index; ``enabled=False`` turns the edit off
                (the value is left as it is), ``enabled=True`` on again.

        Returns:
            The edit itself.

        Raises:
            EditError: an unknown name, or another shape or dtype.

        Example:
            >>> import torch, fxstore
            >>> add = fxstore.Add(torch.zeros(3), scale=1.0)
            >>> add.update(vector=torch.ones(3), scale=0.5).vector
            tensor([1., 1., 1.])
        """
        kind = type(self).__name__
        tensors = self.values()
        for name, new in values.items():
            if name not in tensors:
                raise EditError(
                    f"{kind}.update: '{name}' is not a tensor of this edit (it has {list(tensors)}).\n"
                    f"Hint: update one of {', '.join(tensors)}."
                )
            current = tensors[name]
            if isinstance(new, bool) and current.dtype == torch.bool and current.dim() == 0:
                new = torch.tensor(new)
            elif isinstance(new, (int, float)) and not isinstance(new, bool) and current.dim() == 0:
                new = torch.tensor(new, dtype=current.dtype)
            if not isinstance(new, torch.Tensor) or new.shape != current.shape or new.dtype != current.dtype:
                got = (tuple(new.shape), new.dtype) if isinstance(new, torch.Tensor) else type(new).__name__
                raise EditError(
                    f"{kind}.update: {name} must keep shape {tuple(current.shape)} and dtype {current.dtype}, "
                    f"got {got}.\nHint: a changed shape or dtype is a new edit: build the extractor again."
                )
            with torch.no_grad():
                current.copy_(new)
        return self

    def extra_repr(self) -> str:
        parts = [f"{n}={tuple(getattr(self, n).shape)}" for n in self._names]
        if self._index_kind == "static":
            parts.append(f"index={self._static!r}")
        elif self._index_kind != "none":
            parts.append(f"index=<{self._index_kind} {tuple(self.index.shape)}>")
        if not bool(self.enabled):
            parts.append("enabled=False")
        return ", ".join(parts)


class Add(Edit):
    """``value + scale * vector`` (broadcast): a steering vector. ``scale=0`` turns it off.

    Example:
        >>> import torch, fxstore
        >>> fxstore.Add(torch.ones(3), scale=2.0)(torch.zeros(2, 3))
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """

    def __init__(self, vector: torch.Tensor, scale: float | torch.Tensor = 1.0, index: Any = None) -> None:
        vector = _as_tensor("vector", "Add", vector)
        scale = _as_tensor("scale", "Add", scale)
        if not scale.requires_grad and scale.dtype != vector.dtype and vector.is_floating_point():
            scale = scale.to(vector.dtype)
        super().__init__({"vector": vector, "scale": scale}, index)

    def _broadcast_names(self) -> tuple[str, ...]:
        return ("vector",)

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        return value + (self.scale * self.vector).to(value.dtype)


class Replace(Edit):
    """The given tensor instead of the node's value (activation patching).

    Example:
        >>> import torch, fxstore
        >>> fxstore.Replace(torch.ones(2), index=(slice(None), 0))(torch.zeros(2, 3))
        tensor([[1., 0., 0.],
                [1., 0., 0.]])
    """

    def __init__(self, value: torch.Tensor, index: Any = None) -> None:
        super().__init__({"value": _as_tensor("value", type(self).__name__, value)}, index)

    def _broadcast_names(self) -> tuple[str, ...]:
        return ("value",)

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        new = self.value.to(device=value.device, dtype=value.dtype)
        return new.expand(value.shape).clone(memory_format=torch.contiguous_format)


class Ablate(Edit):
    """Zero (``value=None``) or the given mean instead of the node's value.

    Example:
        >>> import torch, fxstore
        >>> fxstore.Ablate(index=(slice(None), 1))(torch.ones(1, 3))
        tensor([[1., 0., 1.]])
    """

    def __init__(self, value: torch.Tensor | None = None, index: Any = None) -> None:
        tensors = {} if value is None else {"value": _as_tensor("value", "Ablate", value)}
        super().__init__(tensors, index)

    def _broadcast_names(self) -> tuple[str, ...]:
        return self._names

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        if not self._names:
            return torch.zeros_like(value)
        new = self.value.to(device=value.device, dtype=value.dtype)
        return new.expand(value.shape).clone(memory_format=torch.contiguous_format)


class Scale(Edit):
    """``value * factor`` (broadcast; ``factor=1`` leaves the value as it is).

    Example:
        >>> import torch, fxstore
        >>> fxstore.Scale(0.5)(torch.ones(2))
        tensor([0.5000, 0.5000])
    """

    def __init__(self, factor: float | torch.Tensor, index: Any = None) -> None:
        super().__init__({"factor": _as_tensor("factor", "Scale", factor)}, index)

    def _broadcast_names(self) -> tuple[str, ...]:
        return ("factor",)

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.factor.to(value.dtype)


class Apply(Edit):
    """Any traceable ``fn(value, *tensors) -> value`` (its tensors are buffers ``t0``, ``t1``, ...).

    Example:
        >>> import torch, fxstore
        >>> fxstore.Apply(torch.maximum, torch.zeros(3))(torch.tensor([-1.0, 2.0, -3.0]))
        tensor([0., 2., 0.])
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, index: Any = None) -> None:
        if not callable(fn):
            raise EditError(f"Apply: fn={fn!r} is not callable.\nHint: pass a function fn(value, *tensors) -> value.")
        super().__init__({f"t{i}": _as_tensor(f"t{i}", "Apply", t) for i, t in enumerate(tensors)}, index)
        self.fn = fn

    def edit(self, value: torch.Tensor) -> torch.Tensor:
        return self.fn(value, *(getattr(self, n) for n in self._names))

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!r}" + (", " + super().extra_repr() if self._names else "")
