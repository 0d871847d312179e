"""``FeatureExtractor.generate``: Hugging Face's own generation loop on a model that edits and records.

The loop (sampling, logits processors, stopping criteria, ``GenerationConfig``) is Hugging Face's,
run on the shadow model of :mod:`._sites`, so seeded sampling gives ``model.generate``'s tokens.
Eagerly the model runs with Hugging Face's dynamic cache. After ``ex.compile(...)`` it runs two
compiled programs with a static KV cache: one for the prompt (dynamic length) and one for the
decode step, ``fullgraph=True`` by default; every value that changes between calls (edit tensors,
position masks, the step's column, the feature buffers, the cache) is a buffer or an input, so
new values never compile again. What was built (shadow, sites, feature buffers, programs, static
cache) is kept per extractor and reused while ``fxstore.capture.model_state`` of the model (its
module and parameter objects, dtypes, devices, modes) and the extractor's edits stay the same.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._workflows import register
from ..capture import adapter_layers, adapter_state, fresh, model_state
from ..errors import ConfigError, EditError, FxStoreError
from ._positions import choice_for, edit_choice, mask_of
from ._result import Generation
from ._sites import Clock, Site, language_model, module_paths, refuse_dispatched, shadow_with_sites, sites_under

__all__ = ["generate"]

_BUCKET = 64  # compiled runs round the cache length up to a multiple of this (one program for many lengths)
_REFUSED = {"num_beams": 1, "num_return_sequences": 1}


@dataclasses.dataclass
class _State:
    """What one extractor's generation built, and what it was built for."""

    identity: tuple[Any, ...]
    root: nn.Module
    clock: Clock
    sites: dict[str, Site]
    keys: dict[str, str]  # stored module path -> feature key
    labels: dict[str, str]  # edited module path -> edit label
    choices: dict[str, tuple[bool, Any]]  # edited module path -> (whole, own choice)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]] = dataclasses.field(default_factory=dict)
    programs: dict[bool, Any] = dataclasses.field(default_factory=dict)  # prefill? -> compiled program
    options: dict[str, Any] | None = None
    cache: Any = None
    cache_batch: int = 0
    cache_len: int = 0
    consumed: int = 0


_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


@register("generate")
def generate(extractor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             **generate_kwargs: Any) -> Generation:
    """Generate with a Hugging Face causal LM, the extractor's edits applied and its layers stored at every position.

    Called as ``ex.generate(input_ids, attention_mask=None, **generate_kwargs)``. Hugging Face's own
    loop runs (``model.generate``'s arguments: ``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``generation_config``, logits
    processors, ...), so greedy and seeded sampling give the tokens ``model.generate`` gives with a
    forward hook doing the same edit. Layers and edits name **modules** (``"model.layers.6"``): their
    outputs (a tuple's first element) are read and edited. Batches are left-padded; each row
    generates what it generates alone. An edit's tensor of shape ``[batch, 1, d]`` steers each row
    with its own vector. After ``ex.compile(...)`` the prompt and the decode step run compiled
    programs with a static KV cache (the extractor's ``torch.compile`` options; ``fullgraph=True``):
    new edit values, ``enabled`` switches and position choices never compile again.

    Args:
        extractor: The ``FeatureExtractor`` (a Hugging Face causal LM, no ``grads=``).
        input_ids: ``[batch, prompt_len]`` token ids, left-padded.
        attention_mask: ``[batch, prompt_len]`` (1: token, 0: padding); ``None``: all ones.
        **generate_kwargs: Hugging Face ``generate`` arguments, and ``edit_positions``: where edits
            apply, ``"all"`` (default), ``"prompt"``, ``"generated"``, absolute positions (an int, a list
            of ints, a slice), or ``{edit layer: choice}``. Absolute positions count the prompt, then
            generated tokens (each row's own, from its first real token). An edit's own index may give
            them too: ``Add(v, index=(slice(None), [4, 13]))``.

    Returns:
        A :class:`fxstore.Generation` (``sequences``, ``features``: ``[batch, prompt_len + new_tokens - 1, ...]``).

    Raises:
        ConfigError: not a Hugging Face causal LM, ``grads=``, a ``transform=``, beam search, right
            padding, a model without a static cache (compiled), or a bad input.
        EditError: a vector whose batch dimension is not the batch's, a position the model never
            runs on, or an edit index generation cannot apply.
        LayerNotFoundError: a layer or edit that names no module.

    Example:
        >>> import torch, transformers, fxstore
        >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> ex = fxstore.FeatureExtractor(model, ["model.layers.1"],
        ...                               edits={"model.layers.0": fxstore.Add(torch.ones(32), scale=4.0)})
        >>> run = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
        >>> out = ex.generate(torch.tensor([[1, 2, 3, 4]]), **run)
        >>> tuple(out.features["model.layers.1"].shape)
        (1, 8, 32)
        >>> _ = ex.edits["model.layers.0"].update(enabled=False)        # off: model.generate's tokens
        >>> plain = model.generate(torch.tensor([[1, 2, 3, 4]]), **run)
        >>> torch.equal(ex.generate(torch.tensor([[1, 2, 3, 4]]), **run).sequences, plain)
        True
    """
    request = extractor.capture_request
    model = request.model
    prefix, generating = language_model(model, generate_kwargs)
    _check_model(generating)
    edit_positions = generate_kwargs.pop("edit_positions", None)
    input_ids, attention_mask = _checked_inputs(input_ids, attention_mask)
    max_new = _max_new_tokens(generating, input_ids.shape[1], generate_kwargs)
    options = extractor.compile_options
    state = _state(extractor, request, model, prefix)
    batch, prompt = input_ids.shape
    limit = prompt + max_new - 1
    capacity = -(-(prompt + max_new) // _BUCKET) * _BUCKET if options is not None else limit
    if not state.shapes:
        state.shapes = _probe(state, input_ids, attention_mask)
    _check_edits(state, batch)
    pad = (attention_mask.cumsum(-1) == 0).sum(-1)
    _set_buffers(state, request.policy, batch, capacity, pad, prompt, limit, edit_positions, extractor.edits)
    kwargs = dict(generate_kwargs, disable_compile=True)
    if options is not None:
        _compile(state, options, model, batch, capacity, input_ids, attention_mask)
        state.cache.reset()
        kwargs["cache"] = state.cache
    state.consumed = 0
    output = state.root.generate(input_ids, attention_mask=attention_mask, **kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    columns = sequences.shape[1] - 1
    features = {state.keys[path]: state.sites[path].record[:, :columns].clone() for path in state.keys}
    return Generation(sequences, features, prompt, options is not None, output)


def _check_model(model: nn.Module) -> None:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is an extra
        raise ConfigError("generation needs transformers.\nHint: pip install 'fxstore[hf]'.") from e
    config = getattr(model, "config", None)
    if not isinstance(model, transformers.PreTrainedModel) or not model.can_generate() \
            or getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"generation: the model is a {type(model).__name__}, not a Hugging Face causal language model.\n"
            "Hint: generate with a transformers model that has .generate (AutoModelForCausalLM: GPT-2, Llama, "
            "Qwen2, Mistral, ...); read a plain forward with ex(x)."
        )


def _checked_inputs(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.shape[1] == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(
            f"generation: input_ids={got} is not a [batch, prompt_len] tensor of token ids.\n"
            "Hint: pass tokenizer(prompts, return_tensors='pt', padding=True)['input_ids'] (or **that dict)."
        )
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ConfigError(
            f"generation: attention_mask={got} does not match input_ids {tuple(input_ids.shape)}.\n"
            "Hint: pass the tokenizer's attention_mask with its input_ids."
        )
    real = attention_mask.to(torch.long)
    if bool((real[:, 1:] < real[:, :-1]).any()) or bool((real[:, -1] == 0).any()):
        raise ConfigError(
            "generation: attention_mask has padding after a row's tokens (right padding).\n"
            "Hint: pad on the left for generation (tokenizer.padding_side = 'left')."
        )
    return input_ids, real


def _max_new_tokens(model: nn.Module, prompt: int, kwargs: dict[str, Any]) -> int:
    config = kwargs.get("generation_config") or model.generation_config
    for name, allowed in _REFUSED.items():
        value = kwargs.get(name, getattr(config, name, allowed))
        if value not in (None, allowed):
            raise ConfigError(
                f"generation: {name}={value} is not supported (the features and edits follow each input row).\n"
                f"Hint: leave {name} at {allowed}; repeat the prompts in the batch to sample several answers."
            )
    max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if max_new is None:
        max_new = kwargs.get("max_length", getattr(config, "max_length", None) or 0) - prompt
    if not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(
            f"generation: max_new_tokens={max_new} (from max_new_tokens / max_length) leaves no token to generate.\n"
            "Hint: pass max_new_tokens=N with N >= 1."
        )
    return max_new


def _identity(extractor: Any, model: nn.Module) -> tuple[Any, ...]:
    """What the built state depends on: the model's objects, modes, dtypes and devices, the edit objects,
    and PEFT's adapter state (compiled programs bake it in)."""
    return model_state(model), tuple(id(e) for e in extractor.edits.values()), adapter_state(adapter_layers(model))


def _state(extractor: Any, request: Any, model: nn.Module, prefix: str) -> _State:
    identity = _identity(extractor, model)
    state = _STATES.get(extractor)
    if state is not None and state.identity == identity:
        return state
    if request.grad_specs:
        raise ConfigError(
            "generation: grads= taps are refused in generate (generation runs without autograd).\n"
            "Hint: build an extractor without grads= for generation; tap gradients with a plain ex(x) call."
        )
    if request.policy.transform is not None:
        raise ConfigError(
            "generation: transform= is not applied in generate (features are written position by position).\n"
            "Hint: build the extractor without transform= and apply it to Generation.features."
        )
    keys = module_paths(model, request.specs, "layer")
    labels_by_edit = {id(edit): label for label, edit in extractor.edits.items()}
    edits, labels, choices = {}, {}, {}
    for spec, name in request.edits:
        edit = request.edit_modules[name]
        label = labels_by_edit[id(edit)]
        for path in module_paths(model, [(spec, None)], "edit layer"):
            if path in edits:
                raise EditError(f"two edits on the module '{path}'.\nHint: combine them into one fxstore.Apply.")
            edits[path], labels[path], choices[path] = edit, label, edit_choice(edit, label)
    clock = Clock()
    sites = {path: Site(f"'{path}'", clock, edits.get(path), choices.get(path, (True, "all"))[0], path in keys)
             for path in {**keys, **edits}}
    generating = model.get_submodule(prefix)
    state = _State(identity, shadow_with_sites(generating, sites_under(prefix, sites)), clock, sites, keys, labels,
                   choices)
    plain = types.MethodType(type(generating).forward, state.root)

    @functools.wraps(plain)  # Hugging Face reads the signature to choose the inputs it passes
    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        clock.start.fill_(state.consumed)
        if state.programs:
            out = state.programs[ids.shape[1] > 1](plain, *args, **kwargs)
        else:
            out = plain(*args, **kwargs)
        state.consumed += ids.shape[1]
        return out

    object.__setattr__(state.root, "forward", forward)
    _STATES[extractor] = state
    return state


def _probe(state: _State, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Each site's output shape, dtype and device, from one eager one-token forward (nothing kept)."""
    for site in state.sites.values():
        site.probe = []
    try:
        with torch.no_grad():
            type(state.root).forward(state.root, input_ids=input_ids[:, :1], attention_mask=attention_mask[:, :1],
                                     use_cache=False)
        shapes = {}
        for path, site in state.sites.items():
            if len(site.probe or ()) != 1:
                raise ConfigError(
                    f"generation: the module '{path}' ran {len(site.probe or ())} times in one forward.\n"
                    "Hint: select a module that runs once per forward (a block such as 'model.layers.6')."
                )
            shape = site.probe[0][0]
            if len(shape) < 2 or shape[1] != 1:
                raise ConfigError(
                    f"generation: the output of '{path}' has shape {shape} for one token, not [batch, tokens, ...].\n"
                    "Hint: select a module whose output has a token dimension (a block, an attention or MLP)."
                )
            shapes[path] = site.probe[0]
        return shapes
    finally:
        for site in state.sites.values():
            site.probe = None


def _check_edits(state: _State, batch: int) -> None:
    """A per-row tensor must have the batch's rows and one token position."""
    for path, label in state.labels.items():
        edit, rank = state.sites[path].edit, len(state.shapes[path][0])
        for name, tensor in edit.values().items():
            if name in ("index", "enabled") or tensor.dim() < rank:
                continue
            if tensor.shape[-rank] not in (1, batch) or tensor.shape[1 - rank] != 1:
                raise EditError(
                    f"edit {type(edit).__name__} on '{label}': {name} of shape {tuple(tensor.shape)} does not steer a "
                    f"batch of {batch} rows over every position.\nHint: give a [{batch}, 1, ...] tensor (one per row) "
                    "or one without the batch and token dimensions."
                )


def _set_buffers(state: _State, policy: Any, batch: int, capacity: int, pad: torch.Tensor, prompt: int, limit: int,
                 override: Any, edits: Mapping[str, Any]) -> None:
    if isinstance(override, Mapping):
        unknown = [k for k in override if k not in edits]
        if unknown:
            raise EditError(
                f"edit_positions names {unknown}, which the extractor does not edit (its edits: {list(edits)}).\n"
                "Hint: key edit_positions by the edit's layer, as in ex.edits."
            )
    for path, site in state.sites.items():
        shape, dtype, device = state.shapes[path]
        if site.stores:
            want = (batch, capacity, *shape[2:])
            dtype, device = policy.dtype or dtype, policy.device or device
            if site.record is None or tuple(site.record.shape) != want or site.record.dtype != dtype \
                    or site.record.device != device:
                site.record = torch.zeros(want, dtype=dtype, device=device)
        if site.edit is not None:
            whole, own = state.choices[path]
            label = state.labels[path]
            mask = mask_of(choice_for(label, own, override), label, pad.to(device), prompt, capacity, limit)
            if site.mask is None or site.mask.shape != mask.shape:
                site.mask = mask
            else:
                site.mask.copy_(mask)
    state.clock.start = state.clock.start.to(pad.device)
    for site in state.sites.values():  # fixed addresses: CUDA graphs (mode="reduce-overhead") read them in place
        for tensor in (site.mask, site.record):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
    torch._dynamo.mark_static_address(state.clock.start)


def _compile(state: _State, options: dict[str, Any], model: nn.Module, batch: int, capacity: int,
             input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """The compiled prompt and decode programs and a static cache of ``capacity`` for ``batch`` rows."""
    import transformers

    refuse_dispatched(model)
    if state.options != options:
        call = fresh(_call)
        prefill = dict(options, dynamic=options.get("dynamic", True))
        state.programs = {True: torch.compile(fresh(_call), **prefill), False: torch.compile(call, **options)}
        state.options = dict(options)
    cache = state.cache
    if cache is None or state.cache_len != capacity or state.cache_batch != batch:
        state.clock.start.zero_()  # the warm-up step writes column 0, whatever the last call left
        try:
            cache = transformers.StaticCache(config=state.root.config, max_cache_len=capacity)
            with torch.no_grad():  # the cache's tensors are made eagerly, outside the programs
                type(state.root).forward(state.root, input_ids=input_ids[:, :1], attention_mask=attention_mask[:, :1],
                                         cache=cache, use_cache=True)
        except FxStoreError:  # a bad edit (e.g. a vector of another width) says so itself
            raise
        except Exception as e:  # the model's own code raises anything for a cache it does not support
            raise ConfigError(
                f"generation: {type(model).__name__} does not run with a static KV cache, which compiled generation "
                f"needs ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\nHint: generate eagerly "
                "(an extractor without .compile())."
            ) from e
        state.cache, state.cache_batch, state.cache_len = cache, batch, capacity


def _call(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return forward(*args, **kwargs)
