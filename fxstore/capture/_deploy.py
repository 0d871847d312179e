"""Deployable extractors: an extractor exported to ONNX, an AOTInductor package or a ``torch.export`` archive.

fxstore's features are real graph outputs, so the extractor exports like any model and its
features become named outputs of the artifact. The extractor module is exported as a whole
with ``torch.export.export`` (truncation, in-place protection, dtype casts and the
``transform`` are all part of its graph); the three formats are made from that program:

- ``"exported"``: ``torch.export.save`` of the program; ``torch.export.load(path).module()`` runs it.
- ``"aoti"``: ``torch._inductor.aoti_compile_and_package``; ``torch._inductor.aoti_load_package(path)``
  runs it in a process that imports neither fxstore nor the model's code.
- ``"onnx"``: ``torch.onnx.export(..., dynamo=True)``; outputs are named after the feature keys
  (plus ``output`` when the model output is kept).

A call returns the features dict, or ``(output, features)`` when the output is kept. The
batch axis is dynamic by default, and so are the sequence axis of integer inputs (token ids)
and the spatial axes of images where the model allows it: each artifact records the ranges
in its metadata (key ``fxstore``, a JSON string), read back by :func:`read_metadata`.

An extractor with edits exports each edit's tensors (its own, a tensor ``index``, and the
``enabled`` switch) as inputs of the artifact, after the model's inputs, named
``edit_<layer>_<field>`` (``edit_layer1_vector``): a deployed steered model changes its vector,
or turns the edit off, at run time without re-exporting. The metadata's ``edits`` lists them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree

from ..errors import ConfigError, FxStoreError, TraceError
from ._artifact import (
    EXTRA_FILE,
    EditInput,
    axes_of,
    first_line,
    input_names,
    metadata_of,
    quiet,
    read_metadata,
    verify_artifact,
    write_aoti,
    write_onnx,
)
from ._keys import GRAD_SUFFIX

__all__ = ["FORMATS", "DeployReport", "export_extractor", "read_metadata"]

FORMATS = ("onnx", "aoti", "exported")
"""Artifact formats of :func:`export_extractor`."""

_MAX_BATCH = 1024
_MAX_SEQUENCE = 4096


@dataclasses.dataclass(frozen=True)
class DeployReport:
    """What :func:`export_extractor` wrote.

    Attributes:
        path: The artifact.
        format: ``"onnx"``, ``"aoti"`` or ``"exported"``.
        metadata: The metadata stored in the artifact.
        max_diff: Largest absolute difference between the artifact and the eager extractor on
            the example inputs (``None`` when not verified).
    """

    path: Path
    format: str
    metadata: dict[str, Any]
    max_diff: float | None


class _Deployable(nn.Module):
    """The extractor with the output structure of the artifact: ``features`` or ``(output, features)``."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output, features = self.extractor(*args, **kwargs)
        return features if output is None else (output, features)




def _edit_inputs(module: nn.Module, extractor: nn.Module, taken: list[str]) -> list[EditInput]:
    """Every tensor of every edit of ``extractor``, with its buffer path in ``module`` (which holds it)."""
    edits = getattr(extractor, "edits", None)
    if not edits:
        return []
    paths = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
    used = set(taken)
    inputs = []
    for key, edit in edits.items():
        for field, tensor in edit.values().items():
            name = base = "edit_" + re.sub(r"\W", "_", f"{key}_{field}")
            for i in itertools.count(1):
                if name not in used:
                    break
                name = f"{base}_{i}"
            used.add(name)
            inputs.append(EditInput(name, key, field, f"{paths[id(edit)]}.{field}", tensor.detach()))
    return inputs


class _WithEdits(nn.Module):
    """Takes each edit tensor as an input after the model's: the exported program reads the inputs,
    not the buffers (``torch.func.functional_call`` swaps them in for the call)."""

    def __init__(self, inner: nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.inner, self.paths = inner, paths

    def forward(self, *args: Any) -> Any:
        count = len(args) - len(self.paths)
        values = dict(zip(self.paths, args[count:]))
        return torch.func.functional_call(self.inner, values, args[:count], tie_weights=False)


class _Positional(nn.Module):
    """Takes keyword inputs positionally, in the order of the example: ``(ids, mask)`` for
    ``input_ids=ids, attention_mask=mask``. torch 2.14's exported module cannot check the
    guards of dynamic keyword-only inputs (``NameError: name 'L' is not defined`` on every
    call), so an artifact exported from keywords takes its inputs in the metadata's order."""

    def __init__(self, inner: nn.Module, positional: int, names: list[str]) -> None:
        super().__init__()
        self.inner, self.positional, self.names = inner, positional, names

    def forward(self, *args: Any) -> Any:  # named ``args``: the dynamic-shapes spec is keyed by it
        return self.inner(*args[:self.positional], **dict(zip(self.names, args[self.positional:])))


def export_extractor(
    extractor: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    format: str = "exported",
    *,
    dynamic: bool = True,
    verify: bool = True,
    model_name: str | None = None,
) -> DeployReport:
    """Export ``extractor`` to a deployable artifact (the body of :meth:`fxstore.FeatureExtractor.export`).

    Args:
        extractor: The extractor, in eval mode, without gradient taps.
        path: The file to write (an AOTInductor package must end in ``.pt2``).
        example_inputs: A tensor, a tuple of inputs, or ``(args, kwargs)``.
        format: One of :data:`FORMATS`.
        dynamic: Try dynamic batch, sequence and image axes (the widest ranges first).
        verify: Run the artifact on the example and compare it with the eager extractor.
        model_name: Recorded in the metadata (default: the model's class name).

    Raises:
        ConfigError: an unknown format, gradient taps, train mode, or inputs the model rejects.
        TraceError: ``torch.export`` or the ONNX exporter cannot capture the extractor, or the
            artifact disagrees with the eager extractor.

    Example:
        An edit's tensors are inputs of the artifact, after the model's:

        >>> import tempfile, torch, fxstore
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
        >>> ex = fxstore.FeatureExtractor(model, ["0"], edits={"0": fxstore.Add(torch.zeros(3))}, keep_output=False)
        >>> report = export_extractor(ex, tempfile.mkdtemp() + "/steer.pt2", torch.rand(2, 4))
        >>> [i["name"] for i in report.metadata["inputs"]]
        ['input', 'edit_0_vector', 'edit_0_scale', 'edit_0_enabled']
        >>> program, x = torch.export.load(report.path).module(), torch.rand(5, 4)
        >>> got = program(x, torch.ones(3), torch.tensor(2.0), torch.tensor(True))["0"]
        >>> torch.equal(got, model[0](x) + 2.0)
        True
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not an export format.\nHint: use one of {', '.join(map(repr, FORMATS))}.")
    if extractor.training:
        raise ConfigError("the extractor is in train mode; an artifact is exported for inference.\n"
                          "Hint: call extractor.eval() before exporting.")
    args, kwargs = _split(example_inputs)
    try:
        with torch.no_grad():
            expected = _Deployable(extractor)(*args, **kwargs)
    except FxStoreError:
        raise
    except Exception as e:  # the model's own code failed on the example
        raise ConfigError(f"the extractor fails on the example inputs: {type(e).__name__}: {first_line(e)}\n"
                          "Hint: pass example inputs the model accepts.") from e
    features = expected if isinstance(expected, dict) else expected[1]
    tapped = [k for k in features if k.endswith(GRAD_SUFFIX)]
    if tapped:
        raise ConfigError(
            f"gradient taps {tapped} cannot be exported: an exported artifact runs inference only.\n"
            "Hint: build the extractor for export without grads=."
        )
    module: nn.Module = _Deployable(extractor).eval()
    named = (args, kwargs)
    if kwargs:  # keyword inputs become positional ones, in the order given (see _Positional)
        module, args, kwargs = _Positional(module, len(args), list(kwargs)).eval(), (*args, *kwargs.values()), {}
    edits = _edit_inputs(module, extractor, input_names(extractor, *named))
    if edits:  # edit tensors are inputs after the model's (see _WithEdits)
        module = _WithEdits(module, [e.path for e in edits]).eval()
        args, kwargs = (*args, *kwargs.values(), *(e.tensor for e in edits)), {}
    program, dims = _export_program(module, args, kwargs, extractor, dynamic, edits)
    metadata = metadata_of(extractor, program, dims, expected, format, model_name, *named, edits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "exported":
        torch.export.save(program, path, extra_files={EXTRA_FILE: json.dumps(metadata)})
    elif format == "aoti":
        write_aoti(program, path, metadata)
    else:
        write_onnx(module, args, kwargs, program, path, metadata)
    max_diff = verify_artifact(path, format, args, kwargs, expected, metadata) if verify else None
    return DeployReport(path, format, metadata, max_diff)


def _split(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple) \
            and isinstance(example_inputs[1], dict):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise ConfigError(f"example_inputs of type {type(example_inputs).__name__} cannot be exported with.\n"
                      "Hint: pass a tensor, a tuple of inputs, or (args, kwargs).")


# -- dynamic shapes ---------------------------------------------------------------------




def _plans(leaves: list[Any], extractor: nn.Module) -> list[dict[str, tuple[int, int]]]:
    """Ranges to try, most dynamic first: ``{axis name: (min, max)}``."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        return [{}]
    batch = tensors[0].shape[0]
    sizes: dict[str, int] = {}
    for x in tensors:
        for axis, name in axes_of(x, batch).items():
            sizes.setdefault(name, x.shape[axis])
    config = getattr(getattr(extractor, "wrapped_model", extractor), "config", None)
    max_seq = next((v for v in (getattr(config, a, None) for a in ("n_positions", "max_position_embeddings"))
                    if isinstance(v, int)), _MAX_SEQUENCE)
    first: dict[str, tuple[int, int]] = {"batch": (1, max(_MAX_BATCH, batch))}
    second = dict(first)
    for name, size in sizes.items():
        if name == "sequence":
            first[name], second[name] = (1, max(max_seq, size)), (2, max(max_seq, size))
        elif name in ("height", "width"):
            first[name], second[name] = (size // 2 + 1, 4 * size), (size, 4 * size)
    plans = [first, second, {"batch": first["batch"]}, {}]
    unique: list[dict[str, tuple[int, int]]] = []
    for plan in plans:
        if plan not in unique:
            unique.append(plan)
    return unique


def _shapes_spec(args: tuple[Any, ...], kwargs: dict[str, Any], plan: dict[str, tuple[int, int]],
                 edits: Sequence[EditInput] = ()) -> Any:
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in plan.items()}
    model_args = args[:len(args) - len(edits)]
    leaves = _pytree.tree_leaves((model_args, kwargs))
    batch = next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim()), None)

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return None
        return {axis: dims[name] for axis, name in axes_of(leaf, batch).items() if name in dims} or None

    def edit_spec(edit: EditInput, leaf: torch.Tensor) -> Any:
        """An edit's own tensors have fixed shapes; a tensor index (mask, positions) follows the batch."""
        if edit.field == "index" and leaf.dim() and leaf.shape[0] == batch and "batch" in dims:
            return {0: dims["batch"]}
        return None

    shapes: dict[str, Any] = {}
    if args:  # torch.export wants exactly the names of the inputs given: no "args" for a keyword-only call
        shapes["args"] = tuple(_pytree.tree_map(spec, a) for a in model_args) + tuple(
            edit_spec(e, x) for e, x in zip(edits, args[len(model_args):]))
    if kwargs:
        shapes["kwargs"] = {k: _pytree.tree_map(spec, v) for k, v in kwargs.items()}
    return shapes


def _widen_batch(args: tuple[Any, ...], kwargs: dict[str, Any],
                 edits: Sequence[EditInput] = ()) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Batch-1 examples are repeated to 2 (and so is a tensor index of an edit): export specialises an axis of size 1."""
    count = len(args) - len(edits)
    leaves, spec = _pytree.tree_flatten((args[:count], kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim()]
    if not tensors or any(x.shape[0] != 1 for x in tensors):
        return args, kwargs
    widened = [torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in leaves]
    model_args, kwargs = _pytree.tree_unflatten(widened, spec)
    edit_args = tuple(torch.cat([x, x]) if e.field == "index" and x.dim() and x.shape[0] == 1 else x
                      for e, x in zip(edits, args[count:]))
    return (*model_args, *edit_args), kwargs


def _export_program(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], extractor: nn.Module,
                    dynamic: bool, edits: list[EditInput]
                    ) -> tuple[torch.export.ExportedProgram, dict[str, tuple[int, int]]]:
    """The exported program with the most dynamic axes the model allows, and their ranges."""
    plans = _plans(_pytree.tree_leaves((args[:len(args) - len(edits)], kwargs)), extractor) if dynamic else [{}]
    wide = _widen_batch(args, kwargs, edits)
    last: Exception | None = None
    for plan in plans:
        inputs = wide if plan else (args, kwargs)
        try:
            with quiet():
                program = torch.export.export(module, inputs[0], inputs[1],
                                              dynamic_shapes=_shapes_spec(*inputs, plan, edits) if plan else None,
                                              strict=False)
            return program, plan
        except Exception as e:  # export raises whatever the model's code raises, and its own errors
            last = e
    name = type(getattr(extractor, "wrapped_model", extractor)).__name__
    edited = f" with edits on {', '.join(dict.fromkeys(e.key for e in edits))}" if edits else ""
    raise TraceError(f"torch.export could not export the extractor of {name}{edited}: {type(last).__name__}: "
                     f"{first_line(last)}\n"
                     "Hint: check that the model runs on the example inputs" +
                     (" and that each fxstore.Apply's fn is traceable by torch.export" if edits else "") +
                     "; models torch.export cannot capture cannot be deployed this way.") from last






# -- metadata ---------------------------------------------------------------------------


