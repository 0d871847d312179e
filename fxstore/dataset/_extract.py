"""Extract features of a whole dataset to disk: streamed, resumable, multi-process.

The flow of :func:`extract_dataset`:

1. build one extractor per reduction group (``_reduce``) and probe the model on a tiny
   first batch, which fixes every stored array's row shape and dtype;
2. rank 0 locks the output folder (``_lock``), refuses foreign files (``_ownership``), checks
   the run identity, writes the run record before any data file, verifies the shards an
   earlier run left (recomputing damaged ones) and the free space, and prepares the sink;
   every rank learns which shards are left;
3. each rank computes the batches of its shards (``_batches``, ``_compute``); a background
   thread writes them (``_writer``, ``_sinks``) while the next batch computes;
4. after all ranks finish, rank 0 names the files and writes ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture._policy import parse_device
from ..capture._selection import Layers
from ..capture._tracing import modes_restored
from ..capture.extractor import FeatureExtractor
from ..errors import ConfigError, FxStoreError
from ..errors import OutputError
from . import _distributed, formats
from ._batches import Plan, make_plan
from ._compute import TARGET, changed_inputs, compute, inputs_digest, probe
from ._reduce import build_extractors
from .folder import manifest
from .folder.checksums import identity_digest
from .folder.files import check_free_space, check_writable, os_errors, plain_stat
from .folder.lock import FolderLock
from .folder.names import MANIFEST, PROGRESS, RUN_FILE, TEMP_SUFFIX
from .folder.ownership import survey, write_run_record
from .formats import ArraySpec, Sink
from .reader import verify_folder

_log = logging.getLogger("fxstore.dataset")

__all__ = ["extract_dataset"]


def extract_dataset(
    model: nn.Module,
    layers: Layers | None,
    data: Iterable[Any],
    out: str | os.PathLike[str],
    *,
    format: str = "safetensors",
    reduce: str | Mapping[Any, str | None] | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    input_key: int | str | None = None,
    target_key: int | str | bool | None = None,
    shard_size: int | None = None,
    device: torch.device | str | None = None,
    overlap: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    data_name: str | None = None,
    command: str | None = None,
    tokenizer: Any = None,
    text_field: str | None = None,
    max_length: int | None = None,
    context_length: int | None = None,
    shuffle: int | None = None,
    skip_special: bool = False,
) -> dict[str, Any]:
    """Run ``model`` over ``data`` and write the selected layers' outputs to ``out``.

    Features are written batch by batch (at most one shard per rank is held in memory),
    in atomic, checksummed shards of ``shard_size`` samples. Run the same call again after
    an interruption and it resumes, keeping the shards that verify and producing
    byte-identical files (on a finished folder it verifies and repairs); under ``torchrun`` every rank computes its share of the shards and rank 0
    writes the manifest. The model runs in eval mode under ``torch.inference_mode``.

    Args:
        model: The model, or a ready :class:`~fxstore.FeatureExtractor` (then ``layers``,
            ``reduce`` and ``dtype`` must be ``None``).
        layers: What to store, as for :class:`~fxstore.FeatureExtractor`.
        data: A map-style ``Dataset`` (read in batches of ``batch_size`` by fxstore, each
            rank reading only its shards), or any iterable of batches (a ``DataLoader``).
            A batch is a tensor, a tuple ``(input, target, ...)`` or a dict.
        out: Output folder; created if missing.
        format: ``"safetensors"`` (shards) or ``"npy"`` (one memory-mapped file per layer).
        reduce: ``"avg"``/``"max"`` (global pooling of ``(N, C, ...)`` maps to ``(N, C)``),
            ``"flatten"`` or ``None``, for all layers or as ``{layer or alias: name}``.
            Runs inside the graph, before the copy to the host.
        dtype: Stored dtype of the features (cast inside the graph).
        batch_size: Batch size when ``data`` is a ``Dataset``.
        num_workers: Loader processes when ``data`` is a ``Dataset``.
        collate_fn: Collate function when ``data`` is a ``Dataset``.
        input_key: Field of the batch passed to the model; default: a tensor batch itself,
            element 0 of a tuple, or the first of ``input, inputs, image, images,
            pixel_values, x`` in a dict. A dict input is passed as keyword arguments.
        target_key: Field stored as ``"target"``; ``None`` stores a tuple's second element
            or a dict's ``target``/``targets``/``label``/``labels``/``y`` field if present;
            ``False`` stores nothing.
        shard_size: Samples per shard: the unit of writing, resuming and sharing work
            (default 1024; for text: rows, i.e. tokens, default 16384, a shard ending at the
            first document end at or past it).
        device: Device to run on (default: the model's); the model is moved there (and
            back, if the run fails).
        overlap: Copy to the host and write in a background thread while the next batch
            computes; default: on for CUDA, off on CPU (where the writer competes with the
            forward pass for cores).
        progress: Show a tqdm progress bar (rank 0 only).
        overwrite: Delete an earlier extraction in ``out`` instead of resuming it (refused,
            deleting nothing, if ``out`` holds any file fxstore did not write).
        model_name: Name of the model recorded in the manifest.
        data_name: Description of the data recorded in the manifest (part of the identity).
        command: Command recorded in the manifest (default: ``sys.argv``).
        tokenizer: A Hugging Face tokenizer: ``data`` is then text (a list of strings, a
            ``datasets.Dataset`` or list of dicts with a text or ``input_ids`` column, or
            token-id lists) and one row is stored per real token, with the columns
            ``token_id``, ``sequence`` and ``position`` (see the README's "Language models").
        text_field: The text column (default ``"text"``, else ``"input_ids"``).
        max_length: Tokens per document kept (default: the model's maximum).
        context_length: Concatenate the documents and run windows of this many tokens.
        shuffle: Seed: write the token rows in a seeded random order (a permutation).
        skip_special: Store no BOS/EOS/CLS/SEP/pad rows.

    Returns:
        The manifest (also in ``out/manifest.json``).

    Raises:
        ConfigError: an invalid option, or a model or batch that does not fit the data.
        OutputError: ``out`` is unwritable, too small, in use by another run, holds files
            fxstore did not write, or holds a different extraction.
        LayerNotFoundError: a layer matches nothing.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> data = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
        >>> m = extract_dataset(model, ["0", "1"], data, tempfile.mkdtemp(), reduce="avg",
        ...                     batch_size=4, shard_size=8, progress=False)
        >>> m["num_samples"], m["features"]["1"]["shape"], m["target"]["dtype"], len(m["shards"])
        (10, [4], 'int64', 2)
    """
    if shard_size is None:
        shard_size = 1024 if tokenizer is None else 16384
    check_layers(model, layers)
    _check_options(format, batch_size, shard_size, num_workers)
    options = _Options(format, reduce, dtype, batch_size, num_workers, collate_fn, input_key, target_key, shard_size,
                       device, overlap, progress, overwrite, model_name, data_name or type(data).__name__, command)
    if tokenizer is not None:  # token rows from a language model
        from ._text import TextOptions, extract_text

        text = TextOptions(text_field, max_length, context_length, shuffle, skip_special)
        return extract_text(model, layers, data, Path(out), tokenizer, text, options)
    ranks = _distributed.join()
    try:
        return _extract(model, layers, data, Path(out), ranks, options)
    finally:
        ranks.close()


@dataclasses.dataclass(frozen=True)
class _Options:
    """The keyword options of :func:`extract_dataset`."""

    format: str
    reduce: str | Mapping[Any, str | None] | None
    dtype: torch.dtype | str | None
    batch_size: int
    num_workers: int
    collate_fn: Callable[[list[Any]], Any] | None
    input_key: int | str | None
    target_key: int | str | bool | None
    shard_size: int
    device: torch.device | str | None
    overlap: bool | None
    progress: bool
    overwrite: bool
    model_name: str | None
    data_name: str
    command: str | None


def check_layers(model: nn.Module, layers: Any) -> None:
    """Refuse, before any work, a selection that names no layer (``None`` or empty) for a plain model.

    Raises:
        ConfigError: naming the value and how to list the model's layers.
    """
    if isinstance(model, FeatureExtractor):
        return
    empty = layers is None or (isinstance(layers, (list, tuple, set, frozenset, dict, str)) and len(layers) == 0)
    if empty:
        raise ConfigError(
            f"layers={layers!r} selects no layer: there would be nothing to store.\n"
            "Hint: pass layers=[...], e.g. layers=['layer4'] (fxstore.node_names(model) lists them)."
        )


def _check_options(format: str, batch_size: int, shard_size: int, num_workers: int) -> None:
    if format not in formats.FORMATS:
        raise ConfigError(f"format={format!r} is not an output format.\nHint: use one of {formats.NAMES}.")
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}.\nHint: e.g. {name}={max(low, 64)}.")


def _extract(model: nn.Module, layers: Any, data: Any, out: Path, ranks: _distributed.Ranks,
             o: _Options) -> dict[str, Any]:
    device = ranks.device(_device_of(model, o.device))
    lock = FolderLock(out)
    try:
        with model_kept(model):
            model.to(device).eval()
            extractors, reduction_of = _extractors(model, layers, o, device)
            plan, first = make_plan(data, o.shard_size, o.collate_fn)
            specs = probe(extractors, first, o, device)
            identity = _identity(model, specs, reduction_of, plan, o)
            sink = formats.get(o.format)(out, specs, plan.num_samples, identity_digest(identity))
            decision = ranks.from_main(_prepare(out, identity, sink, plan, o, lock) if ranks.main else None)
            if "error" in decision:
                raise decision["error"]
            if "complete" in decision:
                return decision["complete"]
            if not ranks.main:
                lock.join()
            mine = _assign(plan, set(decision["done"]), ranks)
            compute(extractors, plan, mine, sink, device, o, ranks, {int(k): v for k, v in decision["check"].items()})
            ranks.barrier()
            result = _finish(out, identity, plan, sink, o.command) if ranks.main else None
            return ranks.from_main(result)
    finally:
        lock.release()


@contextlib.contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """Run a block that moves the model and switches its modes: every module gets its own mode back,
    and a failure moves parameters and buffers back where they were (the user's model is never left damaged)."""
    placement = _placement(model)
    with modes_restored(model):
        try:
            yield
        except BaseException:
            _restore(model, placement)
            raise


def _placement(model: nn.Module) -> dict[str, torch.device]:
    return {name: t.device for name, t in (*model.named_parameters(), *model.named_buffers())}


def _restore(model: nn.Module, placement: dict[str, torch.device]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in placement and p.device != placement[name]:
                p.data = p.data.to(placement[name])
        for module_name, module in model.named_modules():
            for name, b in list(module._buffers.items()):
                where = placement.get(f"{module_name}.{name}" if module_name else name)
                if b is not None and where is not None and b.device != where:
                    module._buffers[name] = b.to(where)


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        chosen = parse_device(device)
        _check_device(chosen)
        return chosen
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _check_device(device: torch.device) -> None:
    """Refuse, before the model moves, a device that holds no data or is not available here."""
    if device.type == "meta":
        raise ConfigError(
            "device='meta' holds no data: the model's weights would be lost and no feature computed.\n"
            "Hint: use a real device, e.g. 'cpu' or 'cuda'."
        )
    try:
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001 - any backend's refusal (no driver, no such index, not built)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"device={str(device)!r} is not available on this machine: {reason}\n"
            "Hint: use device='cpu', or check the device index and driver (torch.cuda.is_available())."
        ) from e


def _extractors(model: nn.Module, layers: Any, o: _Options,
                device: torch.device) -> tuple[list[FeatureExtractor], dict[str, str]]:
    if isinstance(model, FeatureExtractor):
        if layers is not None or o.reduce is not None or o.dtype is not None:
            raise ConfigError(
                "layers, reduce and dtype must be None when a FeatureExtractor is passed.\n"
                "Hint: configure the extractor itself, or pass the plain model."
            )
        return [model], {key: "none" for key in model.feature_keys}
    if layers is None:
        raise ConfigError("no layers selected.\nHint: pass layers=[...]; list them with fxstore.node_names(model).")
    host = torch.device("cpu") if device.type != "cpu" else None
    return build_extractors(model, layers, o.reduce, dtype=o.dtype, host=host,
                            non_blocking=device.type == "cuda")








def _identity(model: nn.Module, specs: list[ArraySpec], reduction_of: dict[str, str], plan: Plan,
              o: _Options) -> dict[str, Any]:
    def entry(s: ArraySpec) -> dict[str, Any]:
        return {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}

    target = next((s for s in specs if s.key == TARGET), None)
    return {
        "format": o.format,
        "model": {"name": o.model_name or type(model).__name__, "fingerprint": manifest.model_fingerprint(model)},
        "features": {s.key: {**entry(s), "reduce": reduction_of.get(s.key, "none")} for s in specs if s is not target},
        "target": None if target is None else entry(target),
        "num_samples": plan.num_samples,
        "shard_size": o.shard_size,
        "batch_size": o.batch_size if plan.indexed else None,
        "data": o.data_name,
    }


def _prepare(out: Path, identity: dict[str, Any], sink: Sink, plan: Plan, o: _Options,
             lock: FolderLock) -> dict[str, Any]:
    """Rank 0: lock, check and prepare the folder; the decision every rank follows."""
    try:
        lock.acquire(o.command)
        check_writable(out)
        with os_errors(out):
            folder = survey(out, identity)
            if o.overwrite:
                folder.clean()
                folder = survey(out, identity)
            folder.refuse_foreign()
            recorded = folder.identity
            if recorded is not None:
                differences = manifest.describe_mismatch(recorded, identity)
                if differences:
                    raise OutputError(
                        f"refusing to resume into '{out}': it holds a different extraction ("
                        + "; ".join(differences) + ").\n"
                        "Hint: use a new output folder, or overwrite=True (CLI: --overwrite) to start over."
                    )
            shards = [plan.shards[k] for k in plan.all_shards() or []] if plan.num_samples is not None else None
            if folder.record is None and folder.manifest is not None:
                problems = verify_folder(out, folder.manifest)
                if not problems:
                    markers = dict(enumerate(folder.manifest["shards"]))
                    _check_inputs(out, plan, o, identity, markers, set(markers))
                    return {"complete": folder.manifest}
                _log.warning("fxstore: repairing '%s': %s", out, _listed(problems))
                write_run_record(out, identity, sink.files)
                sink.restore(folder.manifest["shards"])
            elif folder.record is None:
                if shards is not None:
                    check_free_space(out, sink.bytes_needed(set(), shards))
                write_run_record(out, identity, sink.files)
            (out / MANIFEST).unlink(missing_ok=True)  # from a finish or repair that was interrupted
            for path in folder.ours:
                if path.name.endswith(TEMP_SUFFIX):
                    path.unlink(missing_ok=True)
                elif path.name == PROGRESS:  # a marker's temporary file, left by a kill
                    for temp in path.glob(f".*{TEMP_SUFFIX}"):
                        if plain_stat(temp) is not None:
                            temp.unlink()
            sink.adopt()
            done, bad = sink.verified_shards()
            bad += _misplaced(sink, plan, done)
            if bad:
                _log.warning("fxstore: recomputing %d damaged shard(s) of '%s': %s", len(bad), out, _listed(bad))
            markers = sink.markers()
            _check_inputs(out, plan, o, identity, markers, done)
            if shards is not None:
                check_free_space(out, sink.bytes_needed(done, shards))
            sink.prepare()
        check = {} if getattr(plan, "indexed", True) or not done else {  # streamed data: checked as it passes by
            k: markers[k]["inputs"] for k in {min(done), max(done)} if "inputs" in markers[k]}
        return {"done": sorted(done), "check": check}
    except FxStoreError as e:
        return {"error": e}


def _listed(problems: list[str], limit: int = 8) -> str:
    """The first ``limit`` problems on one line, then how many more (a repair of thousands stays readable)."""
    more = len(problems) - limit
    return "; ".join(problems[:limit]) + (f"; ... and {more} more" if more > 0 else "")


def _misplaced(sink: Sink, plan: Any, done: set[int]) -> list[str]:
    """Forget done shards whose rows are not the ones the run's plan gives them (from a manifest that lied)."""
    if plan.all_shards() is None:
        return []
    markers, bad = sink.markers(), []
    for k in sorted(done):
        rows = (markers[k].get("start"), markers[k].get("count"))
        if plan.shards.get(k) != rows:
            bad.append(f"shard {k}: rows {rows}, the run gives {plan.shards.get(k)}")
            done.discard(k)
            sink.forget(k)
    return bad


def _check_inputs(out: Path, plan: Any, o: _Options, identity: dict[str, Any], markers: dict[int, Any],
                  done: set[int]) -> None:
    """Read the inputs of the first and last kept shard again and compare them with the digests recorded
    when they were written: a resume never mixes rows of other data in (map-style datasets only).

    Raises:
        OutputError: the data changed, naming the shard and its rows.
    """
    if not getattr(plan, "indexed", False) or not done:
        return
    for k in sorted({min(done), max(done)}):
        recorded = markers.get(k, {}).get("inputs")
        if recorded is None or k not in plan.shards:
            continue
        if inputs_digest(plan, k, o, identity.get("target") is not None) != recorded:
            raise changed_inputs(out, k, *plan.shards[k])


def _assign(plan: Plan, done: set[int], ranks: _distributed.Ranks) -> Callable[[int], bool]:
    """The shards this rank computes: an equal share of what is left."""
    shards = plan.all_shards()
    if shards is not None:
        left = [k for k in shards if k not in done]
        mine = set(left[ranks.rank::ranks.world])
        return mine.__contains__
    return lambda k: k not in done and k % ranks.world == ranks.rank










def _finish(out: Path, identity: dict[str, Any], plan: Plan, sink: Sink, command: str | None) -> dict[str, Any]:
    """Rank 0, after every rank: check every shard is marked done, name files, write the manifest."""
    missing = sorted(set(plan.shards) - set(sink.markers()))
    if missing:
        raise OutputError(
            f"shards {missing[:5]} of '{out}' were not written by any rank.\n"
            "Hint: run the same command again to compute them."
        )
    if identity["num_samples"] is not None and plan.num_samples != identity["num_samples"]:
        raise ConfigError(
            f"the data yielded {plan.num_samples} samples but announced {identity['num_samples']}.\n"
            "Hint: check len(data) (a DataLoader with drop_last?), or use format='safetensors'."
        )
    with os_errors(out):
        files, shards = sink.finalize(plan.shards)
        result = manifest.write(out, identity, files, shards, command)
        sink.remove_progress()
        (out / RUN_FILE).unlink()
        return result
