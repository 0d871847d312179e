"""fxstore's exceptions: one base class, a few specific subclasses.

Each subclass also inherits the builtin exception users already catch (``KeyError``,
``TypeError``, ``ValueError``), so ``except KeyError`` keeps working. Messages name the
offending input and end with a hint.
"""

from __future__ import annotations

__all__ = [
    "FxStoreError",
    "LayerNotFoundError",
    "InvalidLayerError",
    "TraceError",
    "ConfigError",
    "GradientNotReadyError",
    "OutputError",
    "EditError",
]


class FxStoreError(RuntimeError):
    """Base class of every error fxstore raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(FxStoreError, KeyError):
    """A layer (name, module, pattern) does not match anything in the model."""


class InvalidLayerError(FxStoreError, TypeError):
    """A layer specification has a type fxstore cannot interpret."""


class TraceError(FxStoreError):
    """The model could not be traced with torch.fx."""


class ConfigError(FxStoreError, ValueError):
    """An option has an invalid value or options contradict each other."""


class GradientNotReadyError(FxStoreError, LookupError):
    """A gradient was read before ``backward()`` reached the layer."""


class OutputError(FxStoreError):
    """The output folder cannot hold the result: unwritable, full, or holding another run."""


class EditError(FxStoreError, ValueError):
    """An edit (``fxstore.Add``, ``Replace``, ...) does not fit its node, or is refused."""
