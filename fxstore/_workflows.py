"""Methods of the extractor whose machinery lives in a workflow above capture.

``FeatureExtractor.generate`` and ``FeatureExtractor.draw`` are public methods, but generation and
drawing are workflows built on the extractor (``fxstore/generation``, ``fxstore/draw``), and capture
may not import upward. The dependency points one way: this root module (below capture, like
``errors``) defines the thin methods as a mixin the extractor inherits, and each workflow registers
its implementation here when ``fxstore`` is imported (the package root imports every workflow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = ["WorkflowMethods", "register"]

_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}


def register(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(extractor, ...)`` as the implementation of ``FeatureExtractor.<method>``.

    Example:
        >>> from fxstore._workflows import register
        >>> @register("_doc_example")
        ... def _doc_example(extractor):
        ...     return "ran"
    """

    def add(func: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLEMENTATIONS[method] = func
        return func

    return add


def implementation(method: str) -> Callable[..., Any]:
    """The registered implementation of ``method`` (a ``ConfigError`` with a hint when none is)."""
    try:
        return _IMPLEMENTATIONS[method]
    except KeyError:
        raise ConfigError(
            f"FeatureExtractor.{method} has no implementation registered. "
            "Hint: import fxstore (the package root registers every workflow) before calling it."
        ) from None


class WorkflowMethods:
    """The extractor's methods that run a workflow above capture (registered by that workflow)."""

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """The ``torch.compile`` options of the last :meth:`compile` call (``None``: not compiled).

        Workflows that compile programs of their own (generation's prompt and decode steps) use them.

        Example:
            >>> import torch, fxstore
            >>> ex = fxstore.FeatureExtractor(torch.nn.Sequential(torch.nn.ReLU()), ["0"])
            >>> ex.compile_options is None, ex.compile(backend="eager").compile_options
            (True, {'backend': 'eager', 'fullgraph': True})
        """
        options = self.__dict__.get("_fx_compile_options")
        return None if options is None else dict(options)

    @property
    def capture_request(self) -> Any:
        """What this extractor captures: its canonical layer specs (``specs``, ``grad_specs``), its edits
        (``edits``: ``(spec, module name)``; ``edit_modules``), its storage ``policy`` and the ``model``.

        Example:
            >>> import torch, fxstore
            >>> ex = fxstore.FeatureExtractor(torch.nn.Sequential(torch.nn.ReLU()), {"0": "relu"})
            >>> ex.capture_request.specs
            [('0', 'relu')]
        """
        return self._fx_capture.request  # type: ignore[attr-defined]

    def generate(self, input_ids: Any, attention_mask: Any = None, **generate_kwargs: Any) -> Any:
        """Generate with a Hugging Face causal LM, edits applied and features captured at every position.

        See :func:`fxstore.generation.generate` for the arguments and the result.
        """
        return implementation("generate")(self, input_ids, attention_mask, **generate_kwargs)

    def draw(self, path: Any = None, *, depth: int | None = None, **options: Any) -> Any:
        """Draw the captured graph (a ``graphviz.Digraph``; written to ``path`` when given).

        See :func:`fxstore.draw.draw` for the options.
        """
        return implementation("draw")(self, path, depth=depth, **options)
