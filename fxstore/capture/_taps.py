"""Gradient taps as two custom operators: the tap in the forward, the deposit in the backward.

A tapped value ``v`` becomes ``v', ticket = tap(v, anchor)``, which is ``fxstore::grad_tap`` whenever
anything traces the graph and an ``autograd.Function`` doing the same in eager calls: ``v'`` is a copy
of ``v`` that every consumer reads instead, and ``ticket`` is a 0-dim int64 tensor (its value
names one slot of a registry) that is returned among the features under ``key + ":grad"``.
The tap's backward hands the incoming gradient, ``d loss / d v``, to ``fxstore::deposit``,
which stores a copy in the ticket's slot; :func:`gradient_of` reads it back.

Why operators and not zero probes: ``torch.compile`` cannot create a gradient-requiring leaf
inside a graph for dynamic shapes, but it compiles an opaque operator, with its autograd
formula, into the forward and backward graphs like any other op. So one graph serves
eager calls, ``ex.compile(...)`` and ``torch.compile(ex, fullgraph=True)``, for any input
shape, and nothing is made outside the graph (an eager call only skips the operators' Python
dispatch, which costs more than the copy on small feature maps). ``anchor`` is a 0-dim leaf that requires grad:
it makes ``v'`` require grad even when nothing upstream does (a frozen model, an input
without ``requires_grad``), so the gradient of an activation is always defined. Its own
gradient is never computed.

The values passed through the graph are values (a copy and an integer), never object
identities, so the mechanism is the same in every backend. A slot lives as long as its
ticket tensor: when the features dict that holds it is dropped, the gradient goes with it.

Under CUDA graphs (``mode="reduce-overhead"``), a graph with a tap holds a CPU-side operator
(the ticket is made on the CPU, and the deposit runs Python): inductor does not record such a
graph as a CUDA graph and runs it as a normal compiled graph, so results stay exact.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, GradientNotReadyError
from ._keys import grad_source

__all__ = ["anchor", "tap", "gradient_of", "is_ticket", "grad_tap", "deposit", "gradients", "attributions"]

_slots: dict[int, torch.Tensor | None] = {}
_numbers = itertools.count(1)
_lock = threading.Lock()
_ANCHOR = torch.zeros((), requires_grad=True)


def anchor() -> torch.Tensor:
    """The 0-dim leaf every tap takes as its second input (see the module docstring)."""
    return _ANCHOR


def _open_slot() -> torch.Tensor:
    with _lock:
        number = next(_numbers)
        _slots[number] = None
    ticket = torch.tensor(number, dtype=torch.int64)
    weakref.finalize(ticket, _slots.pop, number, None)
    return ticket


def _store(number: int, grad: torch.Tensor) -> None:
    if number not in _slots:  # a dropped ticket's gradient is not kept
        return
    held = _slots[number]
    _slots[number] = grad.detach().clone() if held is None else held + grad.detach()  # accumulates like .grad


@torch.library.custom_op("fxstore::grad_tap", mutates_args=())
def grad_tap(value: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(copy of value, ticket)``; the backward deposits ``d loss / d value`` under the ticket."""
    return value.clone(), _open_slot()


@grad_tap.register_fake
def _(value: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(value), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("fxstore::deposit", mutates_args=())
def deposit(grad: torch.Tensor, ticket: torch.Tensor) -> None:
    """Store ``grad`` in the slot named by ``ticket`` (a side effect: never removed as dead code)."""
    _store(int(ticket), grad)


@deposit.register_fake
def _(grad: torch.Tensor, ticket: torch.Tensor) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.fxstore.deposit.default)


def _setup(ctx: object, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(output[1])  # type: ignore[attr-defined]


def _backward(ctx: object, grad: torch.Tensor, _ticket_grad: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    (ticket,) = ctx.saved_tensors  # type: ignore[attr-defined]
    torch.ops.fxstore.deposit(grad, ticket)
    return grad, None


grad_tap.register_autograd(_backward, setup_context=_setup)


class _EagerTap(torch.autograd.Function):
    """The same tap for eager calls: what the operators do, without their dispatch (~0.2 ms a tap)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ticket = _open_slot()
        ctx.number = int(ticket)
        ctx.mark_non_differentiable(ticket)
        return value.clone(), ticket

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _ticket_grad: Any) -> tuple[torch.Tensor, None]:
        _store(ctx.number, grad)
        return grad, None


def tap(value: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(copy of value, ticket)``: :func:`grad_tap`, the call every rewritten graph makes.

    Traced (``torch.compile``, ``torch.export``) or given anything but a plain tensor, it is the
    operator; in an eager call it is an ``autograd.Function`` doing the same (the operator's
    Python dispatch costs more than the copy on small feature maps). Both store the gradient
    in the same slot, so :func:`gradient_of` reads either.
    """
    if torch.compiler.is_compiling() or type(value) is not torch.Tensor:
        return torch.ops.fxstore.grad_tap(value, anchor)
    return _EagerTap.apply(value, anchor)


def is_ticket(value: object) -> bool:
    """Whether ``value`` is a tap's ticket (a 0-dim int64 tensor)."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.dim() == 0


def gradient_of(ticket: object) -> torch.Tensor | None:
    """The gradient a tap deposited under ``ticket`` (a ``key + ":grad"`` feature), or ``None``.

    ``None`` also when backward has not reached the tap yet, or ``ticket`` is not a ticket.

    Example:
        >>> import torch, torchvision
        >>> from fxstore.capture import FeatureExtractor, gradient_of
        >>> ex = FeatureExtractor(torchvision.models.resnet18().eval(), grads=["layer4"])
        >>> out, feats = ex(torch.rand(1, 3, 32, 32))
        >>> gradient_of(feats["layer4:grad"]) is None
        True
        >>> out.sum().backward()
        >>> tuple(gradient_of(feats["layer4:grad"]).shape)
        (1, 512, 1, 1)
    """
    return _slots.get(int(ticket)) if is_ticket(ticket) else None  # type: ignore[call-overload]


def gradients(features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{key: gradient}`` for every ticket among ``features`` (the body of ``FeatureExtractor.gradients``).

    Raises:
        GradientNotReadyError: backward has not reached a tapped layer yet.
    """
    grads: dict[str, torch.Tensor] = {}
    for key, ticket in features.items():
        name = grad_source(key)
        if name is None:
            continue
        grad = gradient_of(ticket)
        if grad is None:
            raise GradientNotReadyError(
                f"no gradient for '{name}' yet.\n"
                "Hint: call backward() on a loss computed from this call's output or features first."
            )
        grads[name] = grad
    return grads


def attributions(features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{key: activation * gradient}`` for every tapped layer whose activation is stored too.

    Raises:
        GradientNotReadyError: backward has not reached a tapped layer yet.
        ConfigError: a tapped layer is not stored.
    """
    result: dict[str, torch.Tensor] = {}
    for name, grad in gradients(features).items():
        if name not in features:
            raise ConfigError(
                f"attributions need the activation of the tapped layer '{name}', which is not stored.\n"
                "Hint: select it in layers= as well as in grads=."
            )
        with torch.no_grad():
            result[name] = features[name].detach().to(grad.device, grad.dtype) * grad
    return result
