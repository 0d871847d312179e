"""The edit pass: call an edit module right after each edited node; every later user reads its result.

For ``edits={"layer1": fxstore.Add(v)}`` on a resnet the generated code reads (abridged)::

    def forward(self, x):
        ...
        layer1_1_relu_1 = getattr(self.layer1, "1").relu(add_1)
        _fx_edit_0 = self._fx_edit_0(layer1_1_relu_1, 'layer1')
        layer2_0_conv1 = getattr(self.layer2, "0").conv1(_fx_edit_0)
        ...

The edit's tensors are buffers of the module ``self._fx_edit_0`` (a child of the extractor),
so they are inputs of a compiled program, not constants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import fx, nn

from ..errors import EditError
from ._edits import Edit
from ._selection import canonical_specs, resolve, spec_label
from ._tracing import Traced

__all__ = ["EditSpec", "checked_edits", "edit_sites", "insert_edits", "check_kept"]

EditSpec = tuple[Any, str]
"""``(canonical layer spec, name of the edit module on the program's owner)``."""


def checked_edits(edits: Mapping[Any, Edit] | None, model: nn.Module) -> list[tuple[str, Any, Edit]]:
    """``[(label, canonical spec, edit)]`` of an extractor's ``edits=``, in order.

    Raises:
        EditError: not a mapping, a value that is not an edit, or two edits for one layer.
    """
    if edits is None:
        return []
    if not isinstance(edits, Mapping):
        raise EditError(
            f"edits={edits!r} is not a mapping.\nHint: pass edits={{layer: fxstore.Add(vector), ...}}."
        )
    out: list[tuple[str, Any, Edit]] = []
    for spec, edit in edits.items():
        if not isinstance(edit, Edit):
            raise EditError(
                f"the edit for layer {spec!r} is a {type(edit).__name__}, not an fxstore edit.\n"
                "Hint: use fxstore.Add, Replace, Ablate, Scale or Apply."
            )
        canonical = canonical_specs([spec], model)[0][0]
        label = spec_label(canonical)
        if any(label == other for other, _, _ in out):
            raise EditError(f"two edits for the layer '{label}'.\nHint: combine them into one fxstore.Apply.")
        out.append((label, canonical, edit))
    return out


def edit_sites(traced: Traced, edits: Sequence[EditSpec]) -> dict[fx.Node, tuple[str, str]]:
    """The node each edit applies to: ``{node: (module name, where it is, for messages)}``.

    A module spec edits every call of the module; a module with several outputs (a tuple)
    is edited on its first element, as fxstore stores it.

    Raises:
        LayerNotFoundError: a spec matches nothing.
        EditError: two edits on one node.
    """
    sites: dict[fx.Node, tuple[str, str]] = {}
    labels: dict[fx.Node, str] = {}
    for spec, target in edits:
        label = spec_label(spec)
        for s in resolve(traced, [(spec, None)], strict=True):
            if ":" in s.key and not s.key.endswith(":0"):
                continue  # later elements of a tuple output
            name = traced.names.get(s.node, s.node.name)
            if s.node in sites and sites[s.node][0] != target:
                raise EditError(
                    f"two edits on the node '{name}': '{labels[s.node]}' and "
                    f"'{label}'.\nHint: combine them into one edit (fxstore.Apply), or edit different layers."
                )
            labels[s.node] = label
            sites[s.node] = (target, f"'{label}'" + ("" if name == label else f" (node '{name}')"))
    return sites


def insert_edits(graph: fx.Graph, sites: dict[fx.Node, tuple[str, str]]) -> dict[fx.Node, fx.Node]:
    """Insert ``owner.<module>(node, site)`` after each node and redirect the node's other users to it.

    Returns:
        The edited value's node for each edited node (stored features and taps read it).
    """
    edited: dict[fx.Node, fx.Node] = {}
    owning = graph.owning_module
    for node, (target, label) in sites.items():
        if owning is not None and not hasattr(owning, target):  # an exported graph's own module: for lint
            owning.add_module(target, nn.Module())  # a placeholder; the program runs with the owner as self
        with graph.inserting_after(node):
            new = graph.call_module(target, (node, label))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        edited[node] = new
    return edited


def check_kept(graph: fx.Graph, edited: dict[fx.Node, fx.Node], sites: dict[fx.Node, tuple[str, str]]) -> None:
    """Refuse an edit the pruning removed (past every stored layer, with ``keep_output=False``).

    Raises:
        EditError: naming the edit and the node.
    """
    alive = set(graph.nodes)
    for node, new in edited.items():
        if new not in alive:
            raise EditError(
                f"the edit on {sites[node][1]} has no effect: nothing that is returned "
                "depends on it (keep_output=False cuts the graph after the last stored layer).\n"
                "Hint: keep the output (keep_output=True), or store a layer after the edited one."
            )

