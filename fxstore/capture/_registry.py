"""Third-party registries: modules and functions torch.fx must not trace through, and wrappers.

timm keeps its own lists (``timm.layers.get_notrace_modules()`` /
``get_notrace_functions()``), each entry registered next to the layer that needs it with
the reason in a comment. fxstore merges them into every trace when timm has already been
imported, which is always the case for a timm model; importing timm just to find out would
cost every torchvision user a second of start-up.

Other libraries set ``forward`` on module *instances* (:func:`instance_wrapper` knows the
ones fxstore can see through): accelerate's ``add_hook_to_module`` (every module of a model
loaded with ``device_map=...``: inputs moved to the module's device, offloaded weights loaded
for the call) and nnsight's ``Controller`` (left on every module once a model was wrapped;
inert outside an nnsight trace). A wrapper bound to the user's module always runs *that*
module, so fxstore, which runs shadows of the modules it rewrites, rebinds a known wrapper to
the shadow (:func:`rebind`) and keeps any other wrapped module a leaf that runs its wrapper.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["notrace_modules", "notrace_functions", "stateful_quantized", "instance_wrapper", "rebind", "adapter_layers", "adapter_state"]


def _timm_layers() -> Any | None:
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers as layers
    except ImportError:  # a broken or partial timm install: trace without its registries
        return None
    return layers if hasattr(layers, "get_notrace_modules") else None


def stateful_quantized() -> tuple[type[nn.Module], ...]:
    """bitsandbytes' quantized linears, once bitsandbytes is imported (a model quantized by it always is).

    Their ``forward`` writes shared state: ``Linear8bitLt`` moves ``weight.CB`` into ``self.state``
    (an object outside the module's attributes, so a shadow shares it) and assigns ``weight.data``;
    traced symbolically, those writes would store fx proxies in the user's model. As leaves they
    run on real values (and the partial frontend never traces one alone).
    """
    module = sys.modules.get("bitsandbytes.nn")
    if module is None:
        return ()
    return tuple(cls for name in ("Linear8bitLt", "Linear4bit")
                 if isinstance(cls := getattr(module, name, None), type) and issubclass(cls, nn.Module))


def notrace_modules() -> tuple[type[nn.Module], ...]:
    """Module types not to trace through: registered by installed, imported libraries (timm), and
    bitsandbytes' quantized linears (:func:`stateful_quantized`).

    Example:
        >>> import timm, fxstore.capture._registry as r
        >>> set(timm.layers.get_notrace_modules()) <= set(r.notrace_modules())
        True
    """
    layers = _timm_layers()
    return (tuple(layers.get_notrace_modules()) if layers is not None else ()) + stateful_quantized()


def notrace_functions() -> tuple[Callable[..., Any], ...]:
    """Functions registered to be recorded as single calls (timm's ``register_notrace_function``)."""
    layers = _timm_layers()
    return tuple(f for f in layers.get_notrace_functions() if callable(f)) if layers is not None else ()


def _hooked_by(module: nn.Module) -> str | None:
    """Other libraries' forward hooks or pre-hooks on ``module`` (they run on the values of every call)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return "forward hooks of another library"
    return None


def _class_forward(module: nn.Module, bound: Any) -> bool:
    """Whether ``bound`` is the module's class ``forward`` bound to the module itself."""
    return getattr(bound, "__func__", None) is type(module).forward and getattr(bound, "__self__", None) is module


def _inert_nnsight(module: nn.Module, forward: Any) -> bool:
    """nnsight's ``Controller`` outside any nnsight trace, running the module's class forward."""
    if type(forward).__name__ != "Controller" or not type(forward).__module__.startswith("nnsight"):
        return False
    state = getattr(forward, "state", None)
    try:
        inert = state is not None and state.active()[0] is None
    except (AttributeError, TypeError, IndexError):
        return False
    return inert and getattr(state, "body", None) is type(module).forward


def _accelerate(module: nn.Module, forward: Any) -> bool:
    """accelerate's ``add_hook_to_module`` wrapper around the module's class forward."""
    func = getattr(forward, "func", None)
    return (getattr(func, "__qualname__", "").endswith("add_hook_to_module.<locals>.new_forward")
            and getattr(forward, "args", None) == (module,) and _class_forward(module, vars(module).get("_old_forward")))


def instance_wrapper(module: nn.Module) -> tuple[str, str] | None:
    """What stands between a call of ``module`` and its class ``forward``, and whether fxstore sees through it.

    Returns:
        ``None`` (nothing), or ``(kind, what)``: kind ``"transparent"`` (nnsight's inert controller:
        torch.fx traces through it, a shadow drops it), ``"rebind"`` (accelerate's hook: a leaf for
        torch.fx, rebound to a shadow by :func:`rebind`) or ``"leaf"`` (an unknown instance
        ``forward`` or other libraries' hooks: the module runs as a leaf, wrapper and hooks included).

    Example:
        >>> import functools
        >>> m = nn.Linear(2, 2)
        >>> instance_wrapper(m) is None
        True
        >>> m.forward = functools.partial(nn.Linear.forward, m)
        >>> instance_wrapper(m)
        ('leaf', 'an instance-level forward (partial)')
    """
    forward = vars(module).get("forward")
    if forward is None:
        hooks = _hooked_by(module)
        return None if hooks is None else ("leaf", hooks)
    hooks = _hooked_by(module)
    if hooks is not None:
        return "leaf", hooks
    hook = vars(module).get("_hf_hook")
    if _inert_nnsight(module, forward):
        return ("rebind", "nnsight's Controller with accelerate's hook") if hook is not None else (
            "transparent", "nnsight's Controller (inert outside an nnsight trace)")
    if hook is not None and _accelerate(module, forward):
        return "rebind", f"accelerate's {type(hook).__name__}"
    return "leaf", f"an instance-level forward ({type(forward).__name__})"


def rebind(shadow: nn.Module, module: nn.Module) -> None:
    """Make ``shadow`` (a shallow copy of ``module``) run ``module``'s known wrapper around its own class forward.

    nnsight's inert ``Controller`` is dropped (the class forward runs); accelerate's hook runs
    its ``pre_forward`` / ``post_forward`` on the shadow (inputs to the module's device, offloaded
    weights loaded into the shadow's own parameter dict for the call). An unknown wrapper stays:
    the shadow runs the original module, as a leaf must.
    """
    found = instance_wrapper(module)
    if found is None or found[0] == "leaf" or "forward" not in vars(shadow):
        return
    del vars(shadow)["forward"]
    hook = vars(module).get("_hf_hook")
    if hook is None:
        return
    body = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = hook.pre_forward(shadow, *args, **kwargs)
        with torch.no_grad() if getattr(hook, "no_grad", False) else contextlib.nullcontext():
            output = body(shadow, *args, **kwargs)
        return hook.post_forward(shadow, output)

    vars(shadow)["forward"] = forward


def adapter_layers(model: nn.Module) -> tuple[nn.Module, ...]:
    """PEFT's adapter layers (``BaseTunerLayer``: LoRA and friends): their state is Python a graph bakes in.

    Example:
        >>> adapter_layers(nn.Sequential(nn.Linear(2, 2)))
        ()
    """
    return tuple(m for m in model.modules()
                 if all(hasattr(type(m), name) for name in ("active_adapters", "disable_adapters", "merged")))


def adapter_state(layers: tuple[nn.Module, ...]) -> tuple[Any, ...]:
    """What the adapter layers do now: which adapters are active, disabled, merged."""
    return tuple((tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged)) for m in layers)
