"""Case 11: GPT-2 over 8 batches of different (batch, sequence length): one export for all.

The export frontend exports with dynamic dimensions, so a new shape reuses the graph. The
first pass builds a fresh extractor and runs the 8 batches (the export included), the
cached pass reuses one extractor; both against the plain model over the same 8 batches.
Values are checked against the model's own ``output_hidden_states`` for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import fxstore

from ._config import Profile
from ._measure import Failed, attempt, compare
from ._report import Row
from ._timing import Contender, Features

__all__ = ["gpt2_shapes", "SHAPES"]

SHAPES = ((2, 16), (3, 24), (1, 40), (4, 12), (2, 33), (3, 7), (2, 50), (4, 29))
"""The (batch, sequence length) of the 8 batches."""

_VOCAB = 1000


def _gpt2(layers: int, width: int) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=_VOCAB, n_positions=64)
    return transformers.GPT2Model(config).eval()


def _names(model: nn.Module) -> list[str]:
    """What ``output_hidden_states`` returns: embeddings, every block but the last, the final norm."""
    return ["drop", *[f"h.{i}" for i in range(len(model.h) - 1)], "ln_f"]


def _reference(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = _names(model)
    found: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, ids in enumerate(batches):
            states = model(ids, use_cache=False, output_hidden_states=True).hidden_states
            found.update({f"{name}@{i}": state for name, state in zip(names, states, strict=True)})
    return found


def _run(ex: fxstore.FeatureExtractor, batches: Sequence[torch.Tensor]) -> Features:
    found: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, ids in enumerate(batches):
            _, features = ex(ids, use_cache=False)
            found.update({f"{name}@{i}": value for name, value in features.items()})
    return found


def _exports(ex: fxstore.FeatureExtractor) -> int:
    return ex.exports


def gpt2_shapes(profile: Profile, device: torch.device) -> list[Row]:
    """Case 11: exports made and total time over 8 shapes, vs the plain model."""
    case = f"11 export over 8 shapes · GPT-2 {profile.shapes_layers} layers, width {profile.shapes_width}"
    try:
        model = _gpt2(profile.shapes_layers, profile.shapes_width).to(device)
    except ImportError as e:
        return compare(case, [Failed("plain model", f"transformers not installed: {e}")], {}, profile, device)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, _VOCAB, shape, generator=generator).to(device) for shape in SHAPES]
    names = _names(model)

    def plain() -> None:
        with torch.no_grad():
            for ids in batches:
                model(ids, use_cache=False)

    def first_pass() -> Features:
        return _run(fxstore.FeatureExtractor(model, names, keep_output=False), batches)

    def first_pass_contender() -> Contender:
        ex = fxstore.FeatureExtractor(model, names, keep_output=False)
        _run(ex, batches)
        every = max(1, profile.reps // 3)
        return Contender("fxstore, first pass (build + export)", first_pass, every=every,
                         note=f"{_exports(ex)} export(s) for {len(SHAPES)} shapes; 1 in {every} repetitions")

    def cached_contender() -> Contender:
        ex = fxstore.FeatureExtractor(model, names, keep_output=False)
        _run(ex, batches)
        return Contender("fxstore, cached graph", lambda: _run(ex, batches),
                         note=f"{_exports(ex)} export(s) for {len(SHAPES)} shapes")

    entries = [
        Contender("plain model", plain),
        attempt("fxstore, first pass (build + export)", first_pass_contender),
        attempt("fxstore, cached graph", cached_contender),
    ]
    return compare(case, entries, _reference(model, batches), profile, device)
