"""Where generation reads and edits: one :class:`Site` after each selected module's call.

A Hugging Face causal LM cannot be captured as one graph that takes its KV cache (the cache is a
Python object the model updates in place), so generation selects **module outputs** and runs the
model on a *shadow* tree (:func:`fxstore.capture.shadow_of`: shallow copies along the path to each
selected module, the user's model untouched) whose selected modules end in a :class:`Site`. For
``"model.layers.6"`` the shadow layer's ``forward`` reads::

    def forward(*args, **kwargs):
        return self.fxstore_site(LlamaDecoderLayer.forward(self, *args, **kwargs))

A site is an ``nn.Module`` whose state is buffers (the edit's tensors, a ``[batch, capacity]``
position mask, the ``[batch, capacity, ...]`` feature buffer, the step's first column), so the
model stays one program under ``torch.compile(fullgraph=True)`` and a new vector, scale, switch or
set of positions is new buffer contents, never a new graph.

What generates is the Hugging Face model itself, or a PEFT ``PeftModel``'s base model
(:func:`language_model`; layer names stay those of the ``PeftModel``). A module around a site
whose instance-level ``forward`` fxstore cannot rebind to its shadow is refused (the site would
never run), and so is compiled generation of a model dispatched by accelerate.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..capture import Edit, ModuleRef, shadow_of
from ..errors import ConfigError, EditError, LayerNotFoundError

__all__ = ["Clock", "Site", "language_model", "module_paths", "refuse_dispatched", "shadow_with_sites", "sites_under"]


class Clock(nn.Module):
    """The column (absolute position of the padded batch) of the first token of the running step."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("start", torch.zeros((), dtype=torch.long), persistent=False)


class Site(nn.Module):
    """Edit (where the position mask allows) and record one module's output.

    Args:
        label: Where it is, for messages (``"'model.layers.6'"``).
        clock: The shared :class:`Clock`.
        edit: The user's edit, or ``None``.
        whole: Call the edit as it is (its index does not touch positions); ``False``: call its
            ``edit`` on the whole value, gated by its ``enabled`` switch and the position mask.
        store: Record the (edited) value.
    """

    def __init__(self, label: str, clock: Clock, edit: Edit | None, whole: bool, store: bool) -> None:
        super().__init__()
        self.label, self.clock, self.edit, self.whole, self.stores = label, clock, edit, whole, store
        self.register_buffer("mask", None, persistent=False)  # [batch, capacity] bool
        self.register_buffer("record", None, persistent=False)  # [batch, capacity, ...]
        self.probe: list[tuple[tuple[int, ...], torch.dtype, torch.device]] | None = None

    def forward(self, output: Any) -> Any:
        if isinstance(output, (tuple, list)):  # edited and stored on its first element, as fxstore does
            return type(output)((self.forward(output[0]), *output[1:]))
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"generation: the output of {self.label} is a {type(output).__name__}, not a tensor.\n"
                "Hint: select a module that returns a tensor (or a tuple whose first element is one)."
            )
        if self.probe is not None:
            self.probe.append((tuple(output.shape), output.dtype, output.device))
            return output
        columns = self.clock.start + torch.arange(output.shape[1], device=output.device)
        value = output
        if self.edit is not None:
            new = self.edit(value, self.label) if self.whole else torch.where(self.edit.enabled, self.edit.edit(value),
                                                                                value)
            if not torch.compiler.is_compiling() and new.shape != value.shape:
                raise EditError(
                    f"edit {type(self.edit).__name__} on {self.label}: the edited value has shape {tuple(new.shape)}, "
                    f"the module's output {tuple(value.shape)}.\nHint: an edit must keep the value's shape "
                    "(a per-row vector is [batch, 1, d])."
                )
            where = self.mask.index_select(1, columns)
            value = torch.where(where.reshape(tuple(where.shape) + (1,) * (value.dim() - 2)), new, value)
        if self.stores:
            record = self.record  # where the user asked (device=): a model dispatched across devices differs
            record.index_copy_(1, columns.to(record.device), value.detach().to(record.device, record.dtype))
        return value

    def extra_repr(self) -> str:
        return f"{self.label}, edit={type(self.edit).__name__ if self.edit is not None else None}, store={self.stores}"


def language_model(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[str, nn.Module]:
    """The causal LM that generates, and its path in ``model``: PEFT's ``PeftModel`` generates with its base model.

    LoRA and the other adapters that live in the base model's layers generate as the base model
    does (``PeftModel.generate`` calls the base model's); prompt learning (prefix / prompt tuning)
    adds past key values of its own, which generation refuses.
    """
    base = getattr(model, "get_base_model", None)
    if not callable(base) or not hasattr(model, "peft_config"):
        return "", model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False) or "adapter_names" in kwargs:
        what = "adapter_names=" if "adapter_names" in kwargs else f"{type(config).__name__} (prompt learning)"
        raise ConfigError(
            f"generation: {what} on a PeftModel is not supported (it changes the model's inputs or cache, not its "
            "layers).\nHint: generate with adapters in the layers (LoRA and friends), one adapter state per call "
            "(model.set_adapter / with model.disable_adapter())."
        )
    inner = base()
    path = next(name for name, module in model.named_modules() if module is inner)
    return path, inner


def sites_under(prefix: str, sites: dict[str, Site]) -> dict[str, Site]:
    """``sites`` keyed by their path in the language model at ``prefix`` (PEFT's base model)."""
    if not prefix:
        return sites
    outside = [path for path in sites if not path.startswith(prefix + ".")]
    if outside:
        raise ConfigError(
            f"generation: {outside[0]!r} is not inside the PeftModel's base model '{prefix}', which generates.\n"
            f"Hint: select modules under '{prefix}.' (e.g. '{prefix}.model.layers.6')."
        )
    return {path[len(prefix) + 1:]: site for path, site in sites.items()}


def refuse_dispatched(model: nn.Module) -> None:
    """Compiled generation runs one program per step: accelerate's hooks (``device_map=...``) cannot be in it.

    Raises:
        ConfigError: a module of ``model`` carries accelerate's hook.
    """
    hooked = next((name for name, module in model.named_modules() if "_hf_hook" in vars(module)), None)
    if hooked is not None:
        raise ConfigError(
            f"generation: compiled generation cannot run {type(model).__name__} dispatched by accelerate "
            f"(device_map=...): the hook on '{hooked or '<model>'}' (inputs moved, offloaded weights loaded) is a "
            "torch.compiler.disable'd function, not part of one program.\nHint: generate eagerly (an extractor "
            "without .compile()), or load the model on one device without device_map."
        )


def module_paths(model: nn.Module, specs: Sequence[tuple[Any, str | None]], what: str) -> dict[str, str]:
    """``{module path: key}`` of canonical layer specs, resolved against the model's module paths.

    Raises:
        LayerNotFoundError: a spec that names no module (generation reads module outputs only).
    """
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for spec, alias in specs:
        if isinstance(spec, ModuleRef):
            paths = [spec.name]
        elif isinstance(spec, str):
            paths = [spec] if spec in modules and spec else fnmatch.filter(names, spec) if set(spec) & set("*?[") else []
        elif isinstance(spec, type):
            paths = [n for n in names if isinstance(modules[n], spec)]
        elif callable(spec):
            paths = [n for n in names if _matches(spec, n)]
        else:
            paths = []
        if not paths:
            close = ", ".join(repr(n) for n in _close(str(getattr(spec, "name", spec)), names))
            raise LayerNotFoundError(
                f"generation: the {what} {getattr(spec, 'name', spec)!r} names no module of {type(model).__name__}"
                " (generation reads and edits module outputs: a KV-cached model is not one graph).\n"
                f"Hint: select modules by path{' (close: ' + close + ')' if close else ''}, e.g. 'model.layers.6'."
            )
        for path in paths:
            found[path] = alias if alias and len(paths) == 1 else path
    return found


def _matches(predicate: Any, name: str) -> bool:
    try:
        return bool(predicate(name))
    except TypeError:
        return False


def _close(name: str, names: list[str]) -> list[str]:
    return difflib.get_close_matches(name, names, n=3)


def shadow_with_sites(model: nn.Module, sites: dict[str, Site]) -> nn.Module:
    """A shadow of ``model`` whose module at each path ends in its site (the model is not modified).

    Raises:
        ConfigError: a site on the model itself (its output is the logits: select a block).
    """
    if "" in sites:
        raise ConfigError(
            "generation: the model itself cannot be a generation site.\nHint: select a block such as 'model.layers.6'."
        )
    root = shadow_of(model, model.training)
    shadows, originals = {"": root}, {"": model}
    for path in sorted(sites, key=lambda p: p.count(".")):
        parent = ""
        for part in path.split("."):
            here = f"{parent}.{part}" if parent else part
            if here not in shadows:
                original = originals[here] = originals[parent].get_submodule(part)
                shadows[here] = shadow_of(original, original.training)
                shadows[parent].add_module(part, shadows[here])
            if here != path:
                _check_seen_through(here, path, shadows[here], originals[here])
            parent = here
    for path, site in sites.items():
        _end_in(shadows[path], site)
    return root


def _check_seen_through(here: str, path: str, shadow: nn.Module, original: nn.Module) -> None:
    """A module around a site must run its shadow: a wrapper still bound to the user's module would not."""
    wrapper = vars(shadow).get("forward")
    if wrapper is not None and wrapper is vars(original).get("forward"):
        raise ConfigError(
            f"generation: '{path}' is inside '{here}', whose instance-level forward ({type(wrapper).__name__}, "
            "another library's wrapper) runs the model's own module, not fxstore's copy: the site would never run.\n"
            f"Hint: select '{here}' itself (its output is read and edited through the wrapper)."
        )


def _end_in(shadow: nn.Module, site: Site) -> None:
    inner = vars(shadow).get("forward") or types.MethodType(type(shadow).forward, shadow)

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return site(inner(*args, **kwargs))

    shadow.add_module("fxstore_site", site)
    object.__setattr__(shadow, "forward", forward)
