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

import contextlib
import dataclasses
import inspect
import io
import itertools
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree

from ..errors import ConfigError, FxStoreError, TraceError

__all__ = ["FORMATS", "DeployReport", "export_extractor", "read_metadata"]

FORMATS = ("onnx", "aoti", "exported")
"""Artifact formats of :func:`export_extractor`."""

_META_KEY = "fxstore"
_EXTRA_FILE = "fxstore.json"
_MAX_BATCH = 1024
_MAX_SEQUENCE = 4096
_GRAD_SUFFIX = ":grad"


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


@dataclasses.dataclass(frozen=True)
class _EditInput:
    """One edit tensor as an input of the artifact."""

    name: str  # the input's name: edit_<layer>_<field>, sanitised
    key: str  # the edited layer, as in ``extractor.edits``
    field: str  # the tensor's name in ``edit.update(...)``
    path: str  # the buffer's path in the exported module
    tensor: torch.Tensor


def _edit_inputs(module: nn.Module, extractor: nn.Module, taken: list[str]) -> list[_EditInput]:
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
            inputs.append(_EditInput(name, key, field, f"{paths[id(edit)]}.{field}", tensor.detach()))
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
        raise ConfigError(f"the extractor fails on the example inputs: {type(e).__name__}: {_first_line(e)}\n"
                          "Hint: pass example inputs the model accepts.") from e
    features = expected if isinstance(expected, dict) else expected[1]
    tapped = [k for k in features if k.endswith(_GRAD_SUFFIX)]
    if tapped:
        raise ConfigError(
            f"gradient taps {tapped} cannot be exported: an exported artifact runs inference only.\n"
            "Hint: build the extractor for export without grads=."
        )
    module: nn.Module = _Deployable(extractor).eval()
    named = (args, kwargs)
    if kwargs:  # keyword inputs become positional ones, in the order given (see _Positional)
        module, args, kwargs = _Positional(module, len(args), list(kwargs)).eval(), (*args, *kwargs.values()), {}
    edits = _edit_inputs(module, extractor, _input_names(extractor, *named))
    if edits:  # edit tensors are inputs after the model's (see _WithEdits)
        module = _WithEdits(module, [e.path for e in edits]).eval()
        args, kwargs = (*args, *kwargs.values(), *(e.tensor for e in edits)), {}
    program, dims = _export_program(module, args, kwargs, extractor, dynamic, edits)
    metadata = _metadata(extractor, program, dims, expected, format, model_name, *named, edits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "exported":
        torch.export.save(program, path, extra_files={_EXTRA_FILE: json.dumps(metadata)})
    elif format == "aoti":
        _write_aoti(program, path, metadata)
    else:
        _write_onnx(module, args, kwargs, program, path, metadata)
    max_diff = _verify(path, format, args, kwargs, expected, metadata) if verify else None
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


def _axes(leaf: torch.Tensor, batch: int) -> dict[int, str]:
    """Which axes of an input are dynamic, by name: batch, sequence (token ids), height/width (images)."""
    axes: dict[int, str] = {}
    if leaf.dim() >= 1 and leaf.shape[0] == batch:
        axes[0] = "batch"
    if leaf.dim() >= 2 and not leaf.is_floating_point():
        axes[1] = "sequence"
    elif leaf.dim() == 3:
        axes[1] = "sequence"
    elif leaf.dim() >= 4:
        axes[leaf.dim() - 2], axes[leaf.dim() - 1] = "height", "width"
    return axes


def _plans(leaves: list[Any], extractor: nn.Module) -> list[dict[str, tuple[int, int]]]:
    """Ranges to try, most dynamic first: ``{axis name: (min, max)}``."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        return [{}]
    batch = tensors[0].shape[0]
    sizes: dict[str, int] = {}
    for x in tensors:
        for axis, name in _axes(x, batch).items():
            sizes.setdefault(name, x.shape[axis])
    config = getattr(getattr(extractor, "_fx_model", extractor), "config", None)
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
                 edits: Sequence[_EditInput] = ()) -> Any:
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in plan.items()}
    model_args = args[:len(args) - len(edits)]
    leaves = _pytree.tree_leaves((model_args, kwargs))
    batch = next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim()), None)

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return None
        return {axis: dims[name] for axis, name in _axes(leaf, batch).items() if name in dims} or None

    def edit_spec(edit: _EditInput, leaf: torch.Tensor) -> Any:
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
                 edits: Sequence[_EditInput] = ()) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
                    dynamic: bool, edits: list[_EditInput]
                    ) -> tuple[torch.export.ExportedProgram, dict[str, tuple[int, int]]]:
    """The exported program with the most dynamic axes the model allows, and their ranges."""
    plans = _plans(_pytree.tree_leaves((args[:len(args) - len(edits)], kwargs)), extractor) if dynamic else [{}]
    wide = _widen_batch(args, kwargs, edits)
    last: Exception | None = None
    for plan in plans:
        inputs = wide if plan else (args, kwargs)
        try:
            with _quiet():
                program = torch.export.export(module, inputs[0], inputs[1],
                                              dynamic_shapes=_shapes_spec(*inputs, plan, edits) if plan else None,
                                              strict=False)
            return program, plan
        except Exception as e:  # export raises whatever the model's code raises, and its own errors
            last = e
    name = type(getattr(extractor, "_fx_model", extractor)).__name__
    edited = f" with edits on {', '.join(dict.fromkeys(e.key for e in edits))}" if edits else ""
    raise TraceError(f"torch.export could not export the extractor of {name}{edited}: {type(last).__name__}: "
                     f"{_first_line(last)}\n"
                     "Hint: check that the model runs on the example inputs" +
                     (" and that each fxstore.Apply's fn is traceable by torch.export" if edits else "") +
                     "; models torch.export cannot capture cannot be deployed this way.") from last


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's logs and warnings while trying export plans: failures are reported by fxstore."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                                              "torch._dynamo", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- metadata ---------------------------------------------------------------------------


def _input_names(extractor: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """ONNX input names: the model's forward parameter names, one per tensor leaf."""
    model = getattr(extractor, "_fx_model", extractor)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for i, arg in enumerate(args):
        base = params[i] if i < len(params) else f"input_{i}"
        count = len(_pytree.tree_leaves(arg))
        names += [base] if count == 1 else [f"{base}.{j}" for j in range(count)]
    for key, value in kwargs.items():
        count = len(_pytree.tree_leaves(value))
        names += [key] if count == 1 else [f"{key}.{j}" for j in range(count)]
    return names


def _output_names(expected: Any) -> list[str]:
    if isinstance(expected, dict):
        return list(expected)
    output, features = expected
    count = len(_pytree.tree_leaves(output))
    return (["output"] if count == 1 else [f"output.{i}" for i in range(count)]) + list(features)


def _shape(value: Any, names: dict[str, str]) -> list[int | str]:
    """A shape with each dynamic axis written as its expression over the input axes (``"batch"``)."""
    out: list[int | str] = []
    for d in value.shape:
        if isinstance(d, torch.SymInt):
            text = str(d.node.expr)
            for symbol, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(symbol, name)
            out.append(text)
        else:
            out.append(int(d))
    return out


def _metadata(extractor: nn.Module, program: torch.export.ExportedProgram, dims: dict[str, tuple[int, int]],
              expected: Any, format: str, model_name: str | None, args: tuple[Any, ...],
              kwargs: dict[str, Any], edits: list[_EditInput]) -> dict[str, Any]:
    from .. import __version__
    from ..dataset.manifest import model_fingerprint

    model = getattr(extractor, "_fx_model", extractor)
    tensors = [*_pytree.tree_leaves((args, kwargs)), *(e.tensor for e in edits)]
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"][-len(tensors):]
    symbols: dict[str, str] = {}
    batch = next((x.shape[0] for x in tensors if isinstance(x, torch.Tensor) and x.dim()), None)
    for node, leaf in zip(user_inputs, tensors):
        val = node.meta.get("val")
        if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
            for axis, name in _axes(leaf, batch).items():
                if name in dims and isinstance(val.shape[axis], torch.SymInt):
                    symbols[str(val.shape[axis].node.expr)] = name
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") if hasattr(a, "meta") else a for a in output_node.args[0]]
    names = _output_names(expected)
    inputs = []
    for name, node, leaf in zip(_input_names(extractor, args, kwargs) + [e.name for e in edits], user_inputs, tensors):
        if isinstance(leaf, torch.Tensor):
            inputs.append({"name": name, "shape": _shape(node.meta["val"], symbols), "dtype": str(leaf.dtype)[6:]})
    by_name = {i["name"]: i for i in inputs}
    edited: dict[str, dict[str, Any]] = {}
    for e in edits:
        entry = edited.setdefault(e.key, {"key": e.key, "kind": type(extractor.edits[e.key]).__name__, "inputs": []})
        entry["inputs"].append({"field": e.field, **by_name[e.name]})
    outputs = {name: {"shape": _shape(v, symbols), "dtype": str(v.dtype)[6:]}
               for name, v in zip(names, values) if isinstance(v, torch.Tensor)}
    features = expected if isinstance(expected, dict) else expected[1]
    return {
        "format": format,
        "features": {k: outputs[k] for k in features},
        "output": {k: v for k, v in outputs.items() if k not in features} or None,
        "inputs": inputs,
        "dynamic": {name: list(dims[name]) for name in dims if name in symbols.values()},
        "returns": "features" if isinstance(expected, dict) else "(output, features)",
        "edits": list(edited.values()),
        "model": {"name": model_name or type(model).__name__, "fingerprint": model_fingerprint(model)},
        "fxstore": __version__,
        "torch": torch.__version__,
    }


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fxstore metadata stored in an artifact written by :func:`export_extractor`.

    Raises:
        ConfigError: the file is not such an artifact.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"'{path}' is not a file.\nHint: pass an artifact written by fxstore export.")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(f"/extra/{_EXTRA_FILE}"):
                    return json.loads(archive.read(name))
                if name.endswith("wrapper_metadata.json"):
                    stored = json.loads(archive.read(name)).get(_META_KEY)
                    if stored is not None:
                        return json.loads(stored)
    else:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # not protobuf: onnx raises DecodeError and others
            raise ConfigError(f"'{path}' is neither an ONNX file nor a .pt2 archive ({type(e).__name__}).\n"
                              "Hint: pass an artifact written by fxstore export.") from e
        for prop in model.metadata_props:
            if prop.key == _META_KEY:
                return json.loads(prop.value)
    raise ConfigError(f"'{path}' holds no fxstore metadata.\nHint: pass an artifact written by fxstore export.")


# -- writers and verification -----------------------------------------------------------


def _write_aoti(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    from torch._inductor import aoti_compile_and_package

    if path.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package must end in .pt2, not '{path.name}'.\nHint: e.g. --out feats.pt2.")
    with _quiet():
        aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": {_META_KEY: json.dumps(metadata)}})


def _write_onnx(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    names = [i["name"] for i in metadata["inputs"]]
    outputs = list(metadata["output"] or {}) + list(metadata["features"])
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, (), None, dynamo=True, input_names=names,
                                             output_names=outputs, verbose=False)
    except Exception as e:  # the ONNX exporter raises its own errors for unsupported operators
        raise TraceError(f"torch.onnx could not convert the exported extractor: {type(e).__name__}: "
                         f"{_first_line(e)}\n"
                         "Hint: use format='exported' or 'aoti', which run every ATen operator.") from e
    onnx_program.model.metadata_props[_META_KEY] = json.dumps(metadata)
    onnx_program.save(str(path))
    _name_onnx_axes(path, metadata)


def _name_onnx_axes(path: Path, metadata: dict[str, Any]) -> None:
    """Rename the exporter's symbols (``s33``) to the axis names of the metadata (``batch``).

    The symbols of each input axis are read off the ONNX inputs beside the metadata's input
    shapes; every dimension of the graph that uses a symbol is rewritten (``s33 - 2`` becomes
    ``height - 2``).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # large weights stay where the exporter put them
    names: dict[str, str] = {}
    for value, described in zip(model.graph.input, metadata["inputs"]):
        for dim, axis in zip(value.type.tensor_type.shape.dim, described["shape"]):
            if dim.dim_param and isinstance(axis, str) and re.fullmatch(r"[A-Za-z_]\w*", axis):
                names.setdefault(dim.dim_param, axis)
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        return _pytree.tree_leaves(value[0]) + list(value[1].values())
    return _pytree.tree_leaves(value)


def _run_artifact(path: Path, format: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    if format == "exported":
        with torch.no_grad():
            return _flat(torch.export.load(str(path)).module()(*args, **kwargs))
    if format == "aoti":
        from torch._inductor import aoti_load_package

        return _flat(aoti_load_package(str(path))(*args, **kwargs))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leaves = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), leaves)}
    return [torch.from_numpy(v) for v in session.run(None, feeds)]


def _verify(path: Path, format: str, args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any,
            metadata: dict[str, Any]) -> float:
    got = _run_artifact(path, format, args, kwargs)
    want = _flat(expected)
    names = list(metadata["output"] or {}) + list(metadata["features"])
    if len(got) != len(want):
        raise TraceError(f"the {format} artifact '{path}' returned {len(got)} tensors, the extractor {len(want)}.\n"
                         "Hint: report this as an fxstore bug.")
    worst = 0.0
    for name, a, b in zip(names, got, want):
        a = a.to(b.device)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise TraceError(f"the {format} artifact's '{name}' is {a.dtype} {tuple(a.shape)}, the extractor's "
                             f"{b.dtype} {tuple(b.shape)}.\nHint: report this as an fxstore bug.")
        if not b.is_floating_point():
            diff = float((a != b).any())
            bound = 0.0
        else:
            diff = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
            scale = float(b.double().abs().max()) if b.numel() else 0.0
            bound = (1e-2 if b.element_size() <= 2 else 1e-4) * max(1.0, scale)
        if diff > bound:
            raise TraceError(f"the {format} artifact's '{name}' differs from the eager extractor by {diff:.3g} "
                             f"(allowed {bound:.3g}).\nHint: export with format='exported' to compare, and report "
                             "the model to fxstore.")
        worst = max(worst, diff)
    return worst
