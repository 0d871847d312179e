"""Which positions each edit applies to during generation: absolute positions, a buffer per edit.

Positions count the whole sequence, prompt then generated tokens, in prefill and decode steps
alike: with a 9-token prompt, position 13 is the fifth generated token. In a left-padded batch
they count each row's own tokens (its first real token is position 0), so every row is edited
where it would be alone. The choice is a ``[batch, capacity]`` boolean mask, written before each
call into a buffer the (compiled) program reads: changing it never recompiles.

A choice is ``"all"`` (the default), ``"prompt"``, ``"generated"``, or absolute positions (an int,
a list of ints, a slice). An edit's own index says it too: ``Add(v, index=(slice(None), [4, 13]))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..capture import Edit
from ..errors import EditError

__all__ = ["Choice", "edit_choice", "choice_for", "mask_of"]

Choice = str | int | list[int] | slice
_WORDS = ("all", "prompt", "generated")


def edit_choice(edit: Edit, label: str) -> tuple[bool, Choice]:
    """``(whole, choice)`` of an edit's own index: ``whole`` when the index does not select positions.

    Raises:
        EditError: a tensor index (its shape is one forward's), or an index that selects positions
            together with rows or features.
    """
    index = edit.static_index
    if index is None:
        if "index" in edit.values():
            raise EditError(
                f"edit {type(edit).__name__} on '{label}': a tensor index (a mask or per-row positions) has the "
                "shape of one forward, and generation runs many.\nHint: give absolute positions "
                "(index=(slice(None), [4, 13])) or generate(..., edit_positions=...)."
            )
        return True, "all"
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) < 2 or parts[1] == slice(None) or Ellipsis in parts:
        return True, "all"
    if parts[0] != slice(None) or any(p != slice(None) for p in parts[2:]):
        raise EditError(
            f"edit {type(edit).__name__} on '{label}': index {index!r} selects positions together with rows or "
            "features, which generation does not apply.\nHint: index positions only ((slice(None), [4, 13])), or "
            "use fxstore.Apply for a finer edit."
        )
    return False, parts[1]


def choice_for(label: str, own: Choice, override: Any) -> Choice:
    """The choice for one edit: ``override`` (one for all edits, or a mapping by edit label) or its own.

    Raises:
        EditError: a mapping naming an edit that does not exist is checked by the caller.
    """
    if override is None:
        return own
    if isinstance(override, Mapping):
        return override.get(label, own)
    return override


def mask_of(choice: Any, label: str, pad: torch.Tensor, prompt: int, capacity: int, limit: int) -> torch.Tensor:
    """The ``[batch, capacity]`` mask of a choice (columns of the padded batch).

    Args:
        choice: ``"all"``, ``"prompt"``, ``"generated"``, an int, a list of ints or a slice.
        label: The edited layer, for messages.
        pad: ``[batch]`` padding columns of each row.
        prompt: Columns of the padded prompt.
        capacity: Columns of the mask.
        limit: Columns the model runs on (``prompt + max_new_tokens - 1``).

    Raises:
        EditError: an unknown choice, or an absolute position the model never runs on.

    Example:
        >>> mask_of([1, 3], "h.0", torch.tensor([0, 1]), prompt=3, capacity=6, limit=5).int()
        tensor([[0, 1, 0, 1, 0, 0],
                [0, 0, 1, 0, 1, 0]], dtype=torch.int32)
    """
    columns = torch.arange(capacity, device=pad.device)
    if isinstance(choice, str):
        if choice not in _WORDS:
            raise EditError(
                f"edit positions for '{label}': {choice!r} is not a position choice.\nHint: use one of {_WORDS}, "
                "absolute positions (a list of ints) or a slice."
            )
        rows = columns.expand(pad.shape[0], capacity)
        if choice == "all":
            return torch.ones_like(rows, dtype=torch.bool)
        return rows < prompt if choice == "prompt" else rows >= prompt
    if isinstance(choice, slice):
        if any(v is not None and (not isinstance(v, int) or v < 0) for v in (choice.start, choice.stop, choice.step)):
            raise EditError(
                f"edit positions for '{label}': {choice!r} is not a slice of absolute positions.\n"
                "Hint: use non-negative int bounds (absolute positions count the prompt, then generated tokens)."
            )
        choice = list(range(limit))[choice]
    positions = [choice] if isinstance(choice, int) and not isinstance(choice, bool) else choice
    if not isinstance(positions, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise EditError(
            f"edit positions for '{label}': {choice!r} is not a position choice.\nHint: use one of {_WORDS}, "
            "absolute positions (a list of ints) or a slice."
        )
    bad = [p for p in positions if p < 0 or p >= limit]
    if bad:
        raise EditError(
            f"edit positions for '{label}': position(s) {bad} are beyond what the model runs on (positions 0 to "
            f"{limit - 1}: the prompt's {prompt} and max_new_tokens - 1 generated tokens; the last generated token is "
            "never fed back).\nHint: absolute positions count the prompt, then generated tokens; raise max_new_tokens "
            "or choose smaller positions."
        )
    relative = columns[None, :] - pad[:, None]
    wanted = torch.tensor(positions, dtype=torch.long, device=pad.device)
    return torch.isin(relative, wanted) & (relative >= 0)
