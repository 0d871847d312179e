"""The self-check: a captured program must reproduce the plain model, output, features and edits.

``torch.fx`` can trace a model *silently wrong* (a Python branch taken at trace time that
the real inputs would not take; torchvision's ``mvit_v2_s`` is one), and a capture can miss
what it was asked for (a module whose ``forward`` another library set on the instance runs
the original module, past the rewritten one). So once, on the first call (or at build time
when example inputs are given), the extractor runs the plain model with forward hooks on the
same model object (:class:`HookReference`: each stored module output recorded, each edit on a
module applied) and compares the output, every stored feature and each edit's effect. All
runs leave no trace: buffers (batch-norm statistics) and the random generators are restored,
so the real call that follows behaves as if it were the only one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ._keys import output_key, parse_key, repeat_key
from ._selection import ModuleRef, Selected
from ._tracing import Traced

__all__ = ["Snapshot", "compare", "Site", "module_sites", "HookReference", "edit_calls", "check_features"]


class Snapshot:
    """The model's buffers and the random generators' states, to put back after a trial run.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> state = Snapshot(bn, ())
        >>> _ = bn(torch.rand(4, 2))
        >>> state.restore()
        >>> bn.running_mean
        tensor([0., 0.])
    """

    def __init__(self, model: nn.Module, inputs: Any) -> None:
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._devices = sorted({t.device.index or 0 for t in _tensors((inputs, list(model.parameters())))
                                if t.device.type == "cuda"})
        self._cpu = torch.random.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in self._devices]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        torch.random.set_rng_state(self._cpu)
        for device, state in zip(self._devices, self._cuda):
            torch.cuda.set_rng_state(state, device)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in _pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def compare(expected: Any, actual: Any, what: str = "output", of: str = "the plain model") -> tuple[bool, str]:
    """Whether ``actual`` reproduces ``expected`` (same structure, values equal or very close).

    Args:
        expected: The reference value (a pytree of tensors and constants).
        actual: The captured program's value.
        what: What is compared, for the verdict (``"feature 'layer1'"``).
        of: What the reference is, for the verdict.

    Returns:
        ``(ok, verdict)``: ``"exact"``, ``"close (max |Δ| 3e-07)"``, or why it differs.

    Example:
        >>> compare(torch.ones(2), torch.ones(2))
        (True, 'exact')
        >>> compare(torch.ones(2), torch.zeros(2))
        (False, 'output differs from the plain model (max |Δ| 1)')
    """
    want, want_spec = _pytree.tree_flatten(expected)
    got, got_spec = _pytree.tree_flatten(actual)
    if len(want) != len(got):
        return False, f"{what} structure differs from {of} ({got_spec} vs {want_spec})"
    worst = 0.0
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False, f"{what} differs from {of} ({type(b).__name__} vs {type(a).__name__})"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False, f"{what} differs from {of} ({b!r} vs {a!r})"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, (f"{what} differs from {of} (shape {tuple(b.shape)} {b.dtype} vs "
                           f"{tuple(a.shape)} {a.dtype})")
        if torch.equal(a, b) or a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().to(a.device).double()
        same_nan = torch.isnan(a64) == torch.isnan(b64)
        if not bool(same_nan.all()):
            return False, f"{what} differs from {of} (NaN in different places)"
        finite = ~torch.isnan(a64)
        delta = float((a64 - b64)[finite].abs().max()) if bool(finite.any()) else 0.0
        scale = float(a64[finite].abs().max()) if bool(finite.any()) else 0.0
        if delta > _tolerance(a.dtype) * max(1.0, scale):
            return False, f"{what} differs from {of} (max |Δ| {delta:.3g})"
        worst = max(worst, delta)
    return True, "exact" if worst == 0.0 else f"close (max |Δ| {worst:.1g})"


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a stored feature comes from, as a forward hook on the model sees it.

    Attributes:
        module: The module's path (``model.named_modules()``).
        call: Which call of the module, in one run of the graph that calls it.
        calls: How many calls of the module one run of that graph makes.
        index: Which tensor of the module's output (``None``: its only one).
        outputs: How many tensors of the output the capture saw.
    """

    module: str
    call: int
    calls: int
    index: int | None
    outputs: int


def module_sites(traced: Traced, selected: Sequence[Selected]) -> dict[str, Site]:
    """The module output each selected node is (features of other nodes have no site).

    Example:
        >>> import torchvision
        >>> from fxstore.capture._tracing import TraceOptions, trace
        >>> from fxstore.capture._selection import resolve
        >>> traced = trace(torchvision.models.resnet18(), TraceOptions())
        >>> sites = module_sites(traced, resolve(traced, [("layer1", None), ("layer1.0.add", None)]))
        >>> sites["layer1"]
        Site(module='layer1', call=0, calls=1, index=None, outputs=1)
        >>> "layer1.0.add" in sites  # no module returns it: no hook can see it
        False

    """
    where: dict[fx.Node, list[Site]] = {}
    for path, calls in traced.module_calls.items():
        for call, nodes in enumerate(calls):
            for j, node in enumerate(nodes):
                where.setdefault(node, []).append(
                    Site(path, call, len(calls), j if len(nodes) > 1 else None, len(nodes)))
    sites = {}
    for s in selected:
        if s.node in where:  # the module the key names, else any module that returns the node
            named = [site for site in where[s.node] if repeat_key(site.module, site.call) == parse_key(s.key).name]
            sites[s.key] = (named or where[s.node])[0]
    return sites


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def hooked_modules(model: nn.Module, spec: Any, modules: Sequence[str]) -> list[str] | None:
    """The module paths a (canonical) layer spec names, or ``None`` when it names a node a hook cannot see."""
    if isinstance(spec, ModuleRef):
        return [spec.name]
    if isinstance(spec, str):
        return [spec] if spec in modules and _module(model, spec) is not None else None
    if isinstance(spec, type):
        return [name for name, module in model.named_modules() if isinstance(module, spec) and name in modules]
    return None


class HookReference:
    """Forward hooks on the model itself: each site's outputs recorded, edits on modules applied.

    Args:
        model: The user's model (the hooks are removed when the block ends).
        modules: Paths whose outputs to record.
        edits: ``{path: edit}``: the edit applied to that module's output (every call), before recording.

    Attributes:
        outputs: Path -> the tensors of each call's output, in call order.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> ref = HookReference(model, ["0"], {})
        >>> with ref.active():
        ...     _ = model(torch.ones(1, 2))
        >>> len(ref.outputs["0"]), len(model[0]._forward_hooks)
        (1, 0)
    """

    def __init__(self, model: nn.Module, modules: Sequence[str], edits: Mapping[str, nn.Module]) -> None:
        self.model = model
        self.modules = sorted(set(modules) | set(edits))
        self.edits = dict(edits)
        self.outputs: dict[str, list[list[torch.Tensor]]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.outputs = {path: [] for path in self.modules}
        handles = []
        try:
            for path in self.modules:
                module = _module(self.model, path)
                if module is not None:  # a path no module of the model has (an exported name): nothing to hook
                    handles.append(module.register_forward_hook(self._hook(path)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, path: str) -> Any:
        edit = self.edits.get(path)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if edit is not None:
                output = edit(output, f"'{path}'")
            leaves = [leaf for leaf in _pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
            self.outputs[path].append([leaf.detach().clone() for leaf in leaves])  # in-place ops follow
            return output if edit is not None else None

        return hook


@contextlib.contextmanager
def edit_calls(edits: Mapping[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Count how often each edit module runs in the block (the extractor's own modules, hooked for it)."""
    counts = dict.fromkeys(edits, 0)

    def counter(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counts[name] += 1
        return hook

    handles = [module.register_forward_hook(counter(name)) for name, module in edits.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def check_features(keys: Sequence[str], features: Mapping[str, Any], sites: Mapping[str, Site],
                   reference: HookReference | None, policy: Any) -> tuple[bool, str, int]:
    """Whether every key of the program was produced and equals the hooked module output.

    ``features`` may hold repeated runs of a partially traced part (``key@1``): each is compared
    with the hook's matching call. Returns ``(ok, verdict, how many values were compared)``.
    """
    produced = {str(dataclasses.replace(parse_key(k), run=0)) for k in features}
    missing = [k for k in keys if k not in produced and output_key(k, 0) not in produced]  # or its tensors k:0, ...
    if missing:
        return False, (f"feature '{missing[0]}' was not produced (the captured program never ran that layer; "
                       f"{len(features)} of {len(keys)} features came back)"), 0
    worst, compared = "exact", 0
    for key, value in features.items():
        parsed = parse_key(key)
        if parsed.grad or reference is None:
            continue
        site = sites.get(str(dataclasses.replace(parsed, run=0)))
        if site is None:
            continue
        calls = reference.outputs.get(site.module, [])
        call = parsed.run * site.calls + site.call
        if call >= len(calls) or len(calls[call]) != site.outputs:
            continue  # the hook saw this module called differently: nothing to compare with
        expected = policy.apply(calls[call][site.index or 0])
        ok, verdict = compare(expected, value, f"feature '{key}'",
                              f"the output of module '{site.module}' (a forward hook on the model)")
        if not ok:
            return False, verdict, compared
        compared += 1
        if verdict != "exact":
            worst = verdict
    return True, worst, compared
