"""The artifact files of a deployed extractor: their metadata, writing, reading back, and checking.

The exported program (:mod:`._deploy`) becomes a file here: ``torch.export.save``, an AOTInductor
package, or ONNX with named outputs and axes. Each carries fxstore's metadata (key ``fxstore``, a
JSON string: inputs, features, dynamic ranges, edits), read back by :func:`read_metadata`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from .._version import __version__
from ..errors import ConfigError, TraceError
from ._fingerprint import model_fingerprint

__all__ = ["META_KEY", "EXTRA_FILE", "EditInput", "axes_of", "first_line", "quiet", "input_names",
           "metadata_of", "read_metadata", "write_aoti", "write_onnx", "verify_artifact"]

META_KEY = "fxstore"


EXTRA_FILE = "fxstore.json"


@dataclasses.dataclass(frozen=True)
class EditInput:
    """One edit tensor as an input of the artifact."""

    name: str  # the input's name: edit_<layer>_<field>, sanitised
    key: str  # the edited layer, as in ``extractor.edits``
    field: str  # the tensor's name in ``edit.update(...)``
    path: str  # the buffer's path in the exported module
    tensor: torch.Tensor


def axes_of(leaf: torch.Tensor, batch: int) -> dict[int, str]:
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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def input_names(extractor: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """ONNX input names: the model's forward parameter names, one per tensor leaf."""
    model = getattr(extractor, "wrapped_model", extractor)
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


def metadata_of(extractor: nn.Module, program: torch.export.ExportedProgram, dims: dict[str, tuple[int, int]],
              expected: Any, format: str, model_name: str | None, args: tuple[Any, ...],
              kwargs: dict[str, Any], edits: list[EditInput]) -> dict[str, Any]:

    model = getattr(extractor, "wrapped_model", extractor)
    tensors = [*_pytree.tree_leaves((args, kwargs)), *(e.tensor for e in edits)]
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"][-len(tensors):]
    symbols: dict[str, str] = {}
    batch = next((x.shape[0] for x in tensors if isinstance(x, torch.Tensor) and x.dim()), None)
    for node, leaf in zip(user_inputs, tensors):
        val = node.meta.get("val")
        if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
            for axis, name in axes_of(leaf, batch).items():
                if name in dims and isinstance(val.shape[axis], torch.SymInt):
                    symbols[str(val.shape[axis].node.expr)] = name
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") if hasattr(a, "meta") else a for a in output_node.args[0]]
    names = _output_names(expected)
    inputs = []
    for name, node, leaf in zip(input_names(extractor, args, kwargs) + [e.name for e in edits], user_inputs, tensors):
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
                if name.endswith(f"/extra/{EXTRA_FILE}"):
                    return json.loads(archive.read(name))
                if name.endswith("wrapper_metadata.json"):
                    stored = json.loads(archive.read(name)).get(META_KEY)
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
            if prop.key == META_KEY:
                return json.loads(prop.value)
    raise ConfigError(f"'{path}' holds no fxstore metadata.\nHint: pass an artifact written by fxstore export.")


# -- writers and verification -----------------------------------------------------------


def write_aoti(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    from torch._inductor import aoti_compile_and_package

    if path.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package must end in .pt2, not '{path.name}'.\nHint: name the file so it ends in .pt2 (feats.pt2).")
    with quiet():
        aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": {META_KEY: json.dumps(metadata)}})


def write_onnx(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    names = [i["name"] for i in metadata["inputs"]]
    outputs = list(metadata["output"] or {}) + list(metadata["features"])
    try:
        with quiet():
            onnx_program = torch.onnx.export(program, (), None, dynamo=True, input_names=names,
                                             output_names=outputs, verbose=False)
    except Exception as e:  # the ONNX exporter raises its own errors for unsupported operators
        raise TraceError(f"torch.onnx could not convert the exported extractor: {type(e).__name__}: "
                         f"{first_line(e)}\n"
                         "Hint: use format='exported' or 'aoti', which run every ATen operator.") from e
    onnx_program.model.metadata_props[META_KEY] = json.dumps(metadata)
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


def verify_artifact(path: Path, format: str, args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any,
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
