"""A model's identity: one digest over its class and every parameter and buffer value."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["model_fingerprint"]


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
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "sha256:" + digest.hexdigest()
