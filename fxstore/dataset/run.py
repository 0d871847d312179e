"""The one run skeleton of :func:`~fxstore.extract_dataset`, for images and text alike.

A run places the model (:func:`placed`), then hands the output folder through the same four
steps whatever the data (:func:`run_folder`):

1. rank 0 locks the folder, refuses foreign files, checks the run identity, writes the run
   record before any data file, verifies what an earlier run left and the free space, and
   prepares the sink (:func:`prepare`); every rank learns which shards are left;
2. every rank computes its shards (the caller's ``work``);
3. all ranks meet;
4. rank 0 names the files and writes ``manifest.json`` (:func:`finish`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..capture import modes_restored, parse_device
from ..errors import ConfigError, FxStoreError, OutputError
from . import _distributed
from ._compute import changed_inputs, inputs_digest
from .folder import manifest
from .folder.files import check_free_space, check_writable, cut_list, os_errors, plain_stat, remove_probe
from .folder.lock import FolderLock
from .folder.names import CLAIM, MANIFEST, PROGRESS, RUN_FILE, TEMP_SUFFIX
from .folder.ownership import survey
from .folder.record import write_run_record
from .formats import Sink
from .reader import verify_folder

_log = logging.getLogger("fxstore.dataset")

__all__ = ["Rows", "placed", "model_kept", "run_folder", "prepare", "finish"]


class Rows(Protocol):
    """What the folder protocol reads of a run's plan: its shards' rows and how many samples there are."""

    shards: dict[int, tuple[int, int]]
    num_samples: int | None

    def all_shards(self) -> list[int] | None: ...


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device | str | None, ranks: _distributed.Ranks) -> Iterator[torch.device]:
    """Move ``model`` to this rank's device in eval mode for the block; give the device.

    Every module gets its mode back afterwards, and a failure moves the model back (:func:`model_kept`).
    A model dispatched by accelerate (``device_map=...``) stays where it is: its hooks move inputs and
    load offloaded weights, and moving it would load them all (accelerate refuses).
    """
    chosen = ranks.device(device_of(model, device))
    with model_kept(model):
        if getattr(model, "hf_device_map", None) is None:
            model.to(chosen)
        model.eval()
        yield chosen


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
            for name, b in module.named_buffers(recurse=False):
                where = placement.get(f"{module_name}.{name}" if module_name else name)
                if b is not None and where is not None and b.device != where:
                    setattr(module, name, b.to(where))


def device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device a run uses: ``device`` (checked to exist here), else the model's."""
    if device is not None:
        chosen = parse_device(device)
        _check_device(chosen)
        return chosen
    first = next((p for p in model.parameters() if p.device.type != "meta"), None)  # meta: offloaded by accelerate
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


def run_folder(out: Path, identity: dict[str, Any], sink: Sink, rows: Rows, o: Any, ranks: _distributed.Ranks,
               work: Callable[[dict[str, Any]], None],
               before_finish: Callable[[], None] | None = None) -> dict[str, Any]:
    """Take ``out`` through one run: prepare (rank 0), ``work(decision)`` on every rank, finish (rank 0).

    Args:
        out: The output folder.
        identity: The run identity (what fixes its rows).
        sink: The format object that writes the rows.
        rows: The plan's shards.
        o: The options of :func:`~fxstore.extract_dataset`.
        ranks: The processes of the run.
        work: Computes this rank's shards, given rank 0's decision (``{"done": [...], "check": {...}}``).
        before_finish: Run by rank 0 after every rank's work, before the manifest is written.

    Returns:
        The manifest (every rank).
    """
    lock, done = FolderLock(out), False
    try:
        decision = ranks.from_main(prepare(out, identity, sink, rows, o, lock) if ranks.main else None)
        if "error" in decision:
            raise decision["error"]
        if "complete" in decision:
            done = True
            return decision["complete"]
        if not ranks.main:
            lock.join()
        work(decision)
        ranks.barrier()
        result = None
        if ranks.main:
            if before_finish is not None:
                before_finish()
            result = finish(out, identity, rows, sink, o.command)
            done = True
        return ranks.from_main(result)
    finally:
        lock.release(finished=done)  # a finished run also removes a lock file a killed run left


def prepare(out: Path, identity: dict[str, Any], sink: Sink, plan: Rows, o: Any, lock: FolderLock) -> dict[str, Any]:
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
                        "Hint: use a new output folder, or overwrite=True to start over."
                    )
            shards = [plan.shards[k] for k in plan.all_shards() or []] if plan.num_samples is not None else None
            finished = folder.manifest or folder.kept  # the kept copy: an npy folder whose manifest was lost
            if folder.record is None and finished is not None:
                problems = (verify_folder(out, finished) if folder.manifest is not None  # else: rows checked below
                            else [f"it lost its {MANIFEST}; rebuilding it from {CLAIM} after checking every row"])
                markers = dict(enumerate(finished["shards"]))
                _check_inputs(out, plan, o, identity, markers, set(markers))  # other data: refused, nothing changed
                strangers = sink.strangers(out, finished) if problems else []
                if strangers:
                    raise OutputError(
                        f"'{out}' holds {cut_list(strangers)} at fxstore's name(s), but every row fails the checksums "
                        "recorded for it: it is not the file this run wrote, and fxstore does not overwrite it.\n"
                        "Hint: move it away (the same command then recomputes it), or use overwrite=True to start over."
                    )
                if not problems:
                    remove_probe(out)
                    return {"complete": finished}
                _log.warning("fxstore: repairing '%s': %s", out, _listed(problems))
                write_run_record(out, identity, sink.files)
                sink.restore(finished["shards"])
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
            remove_probe(out)
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
        if done and o.progress:
            print(_resuming(out, plan, done), file=sys.stderr)
        check = {} if getattr(plan, "indexed", True) or not done else {  # streamed data: checked as it passes by
            k: markers[k]["inputs"] for k in {min(done), max(done)} if "inputs" in markers[k]}
        return {"done": sorted(done), "check": check}
    except FxStoreError as e:
        return {"error": e}


def _resuming(out: Path, plan: Rows, done: set[int]) -> str:
    """The line a resumed run prints before its progress bar (which counts only what is left)."""
    known = [plan.shards[k][1] for k in done if k in plan.shards]
    rows = f" ({sum(known)} rows)" if len(known) == len(done) else ""
    every = plan.all_shards()
    left = f" of {len(every)}" if every is not None else ""
    return f"fxstore: resuming '{out}': {len(done)}{left} shard(s) already written{rows}; computing the rest"


def _listed(problems: list[str], limit: int = 8) -> str:
    """The first ``limit`` problems on one line, then how many more (a repair of thousands stays readable)."""
    more = len(problems) - limit
    return "; ".join(problems[:limit]) + (f"; ... and {more} more" if more > 0 else "")


def _misplaced(sink: Sink, plan: Rows, done: set[int]) -> list[str]:
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


def _check_inputs(out: Path, plan: Any, o: Any, identity: dict[str, Any], markers: dict[int, Any],
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


def finish(out: Path, identity: dict[str, Any], plan: Rows, sink: Sink, command: str | None) -> dict[str, Any]:
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
