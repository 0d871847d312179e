"""The storage policy: what happens to a selected value before it is stored.

One typed object, used by the fx rewrite (as graph nodes), by the partial frontend and by
the hook backend (eagerly), so the three agree by construction. The order is always
``detach -> clone (only where an in-place op overwrites the value later) -> transform ->
dtype -> device``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["StoragePolicy", "parse_dtype", "parse_device"]


def parse_dtype(value: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """``value`` as a ``torch.dtype`` (``"bfloat16"`` and ``torch.bfloat16`` both work).

    Example:
        >>> parse_dtype("float16")
        torch.float16
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value), None)
    if not isinstance(value, str) or not isinstance(resolved, torch.dtype):
        raise ConfigError(f"{what}={value!r} is not a torch dtype.\nHint: use e.g. torch.bfloat16 or 'bfloat16'.")
    return resolved


def parse_device(value: torch.device | str | None, what: str = "device") -> torch.device | None:
    """``value`` as a ``torch.device`` that exists on this machine.

    A CUDA device that is not there (``"cuda:7"`` on a one-GPU machine, any CUDA device on a
    machine without one) is refused here, not at the first call with a driver error.

    Example:
        >>> parse_device("cpu")
        device(type='cpu')
    """
    if value is None:
        return None
    try:
        device = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{what}={value!r} is not a device: {e}.\nHint: use e.g. 'cpu' or 'cuda:0'.") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{what}={str(value)!r} is not available on this machine: it has no CUDA device.\n"
                              "Hint: use 'cpu'.")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{what}={str(value)!r} is not available on this machine: it has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1}).\nHint: pick an index that exists."
            )
    return device


@dataclasses.dataclass(frozen=True)
class StoragePolicy:
    """How every stored feature is derived from the selected value.

    Attributes:
        keep_output: Return the model's output (``False``: return ``None`` and cut the graph
            to what the features need).
        detach: Store features without autograd history.
        transform: A traceable function applied to each stored feature (e.g. pooling).
        dtype: Cast stored features to this dtype.
        device: Copy stored features to this device.
        non_blocking: Copy to ``device`` without waiting.

    Example:
        >>> policy = StoragePolicy.build(detach=True, dtype="float16")
        >>> policy.apply(torch.ones(2, requires_grad=True))
        tensor([1., 1.], dtype=torch.float16)
    """

    keep_output: bool = True
    detach: bool = False
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    non_blocking: bool = False

    @classmethod
    def build(
        cls,
        *,
        keep_output: bool = True,
        detach: bool = False,
        transform: Any = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        non_blocking: bool = False,
    ) -> StoragePolicy:
        """Validate user options (one ``ConfigError`` naming the option) and build the policy."""
        if transform is not None and not callable(transform):
            raise ConfigError(
                f"transform={transform!r} is not callable.\n"
                "Hint: pass a function of one tensor, e.g. lambda t: t.mean((2, 3))."
            )
        return cls(bool(keep_output), bool(detach), transform, parse_dtype(dtype), parse_device(device),
                   bool(non_blocking))

    def steps(self, overwritten_later: bool = False) -> list[tuple[Any, tuple[Any, ...], dict[str, Any], bool]]:
        """The policy as ``(target, extra_args, kwargs, is_method)`` steps, in order.

        ``overwritten_later`` inserts the clone that protects a value an in-place op writes
        into later (only the graph rewrite can know that).
        """
        steps: list[tuple[Any, tuple[Any, ...], dict[str, Any], bool]] = []
        if self.detach:
            steps.append(("detach", (), {}, True))
        if overwritten_later:
            steps.append(("clone", (), {}, True))
        if self.transform is not None:
            steps.append((self.transform, (), {}, False))
        if self.dtype is not None:
            steps.append(("to", (), {"dtype": self.dtype}, True))
        if self.device is not None:
            steps.append(("to", (), {"device": self.device, "non_blocking": self.non_blocking}, True))
        return steps

    def apply(self, value: torch.Tensor, overwritten_later: bool = False) -> torch.Tensor:
        """The policy applied eagerly (partial frontend, hook backend)."""
        for target, extra, kwargs, is_method in self.steps(overwritten_later):
            value = getattr(value, target)(*extra, **kwargs) if is_method else target(value, *extra, **kwargs)
        return value
