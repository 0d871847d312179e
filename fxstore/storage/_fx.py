"""The friendly stateful API: storages that remember features across calls.

``ForwardModuleStorage`` and ``BackwardModuleStorage`` keep the calling conventions of
hook-based storages (one input, a list of inputs, a named group of layers with its own
input; ``storage[layer]``) on top of the pure :class:`~fxstore.FeatureExtractor`. The
state handling is shared with the hook reference backend (:mod:`fxstore.storage.hooks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, gradient_of, parse_device, parse_dtype
from ..errors import GradientNotReadyError
from ._base import StorageBase

__all__ = ["ForwardModuleStorage", "BackwardModuleStorage"]

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

