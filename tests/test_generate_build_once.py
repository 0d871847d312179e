"""Build once, run many for ``ex.generate``: the shadow model, its sites, the static cache and the
compiled programs are built on the first call and reused while the model stays the same.

Builds are counted where they happen (the shadow with its sites, Hugging Face ``StaticCache`` objects,
``torch._dynamo`` graphs), never timed; every call's tokens and features are compared with
``model.generate`` steered and recorded by forward hooks on the model as it is at that call.
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from test_generate import GREEDY, D, _hooked_generate
from torch import nn

import fxstore
from fxstore.generation import _generate

BLOCKS = "transformer.h"


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=64, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Counts the calls of ``owner.name`` from now on (``[count]``, updated in place)."""
    calls = [0]
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.fixture
def shadows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the shadow models (with their sites) generation builds."""
    return _count_calls(monkeypatch, _generate, "shadow_with_sites")


def _count_caches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the static KV caches compiled generation allocates from now on.

    Patched on the module ``sys.modules`` holds now: transformers replaces its lazy module there when
    a model class is first imported, so this runs after the model is built."""
    return _count_calls(monkeypatch, sys.modules["transformers"], "StaticCache")


def _checked(ex: fxstore.FeatureExtractor, model: nn.Module, ids: torch.Tensor, vector: torch.Tensor,
             **kwargs) -> None:
    """One ``ex.generate`` call equals hooked ``model.generate`` (tokens and block 1 at every position)."""
    out = ex.generate(ids, **{**GREEDY, **kwargs})
    sequences, record = _hooked_generate(model, BLOCKS, ids, add=vector, **kwargs)
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(out.features[f"{BLOCKS}.1"], record, rtol=0, atol=1e-5)


def test_repeated_eager_generate_builds_its_shadow_once(shadows):
    model = _gpt2()
    edit = fxstore.Add(torch.randn(D), scale=2.0)
    ex = fxstore.FeatureExtractor(model, [f"{BLOCKS}.1"], edits={f"{BLOCKS}.0": edit})
    g = torch.Generator().manual_seed(3)
    for call, (length, scale) in enumerate(((5, 2.0), (9, 2.0), (5, -3.0), (12, 0.5))):
        vector = torch.randn(D, generator=g)
        edit.update(vector=vector, scale=scale)
        ids = torch.randint(1, 64, (2, length), generator=g)
        _checked(ex, model, ids, scale * vector, max_new_tokens=4 + call)
    assert shadows[0] == 1


def test_generate_rebuilds_when_the_model_changes_and_follows_it(shadows):
    model = _gpt2()
    vector = torch.randn(D)
    ex = fxstore.FeatureExtractor(model, [f"{BLOCKS}.1"], edits={f"{BLOCKS}.0": fxstore.Add(vector)})
    ids = torch.randint(1, 64, (2, 6))
    _checked(ex, model, ids, vector)
    with torch.no_grad():  # new values in place: the shadow shares the parameters, nothing to rebuild
        model.transformer.h[1].mlp.c_proj.weight.mul_(-2.0)
    _checked(ex, model, ids, vector)
    assert shadows[0] == 1
    model.transformer.h[0].mlp.c_fc.weight = nn.Parameter(torch.randn_like(model.transformer.h[0].mlp.c_fc.weight))
    _checked(ex, model, ids, vector)
    assert shadows[0] == 2
    model.double()  # same parameter objects, new dtype: the feature buffers must follow
    out = ex.generate(ids, **GREEDY)
    assert shadows[0] == 3 and out.features[f"{BLOCKS}.1"].dtype == torch.float64
    sequences, record = _hooked_generate(model, BLOCKS, ids, add=vector.double())
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(out.features[f"{BLOCKS}.1"], record, rtol=0, atol=1e-10)


@pytest.mark.compile
def test_repeated_compiled_generate_compiles_and_allocates_once(shadows, monkeypatch):
    torch._dynamo.reset()
    model = _gpt2()
    caches = _count_caches(monkeypatch)
    edit = fxstore.Add(torch.randn(D), scale=1.0)
    ex = fxstore.FeatureExtractor(model, [f"{BLOCKS}.1"], edits={f"{BLOCKS}.0": edit})
    ex.compile(backend="aot_eager")
    counters = torch._dynamo.utils.counters["stats"]
    g = torch.Generator().manual_seed(5)
    graphs = None
    for call, (length, scale) in enumerate(((6, 1.0), (11, 3.0), (6, -1.5), (20, 0.25))):
        vector = torch.randn(D, generator=g)
        edit.update(vector=vector, scale=scale)
        ids = torch.randint(1, 64, (2, length), generator=g)
        _checked(ex, model, ids, scale * vector, max_new_tokens=3 + 2 * call)  # every length fits one cache bucket
        graphs = counters["unique_graphs"] if graphs is None else graphs
    assert counters["unique_graphs"] == graphs  # the prompt and decode programs of the first call, no more
    assert shadows[0] == 1 and caches[0] == 1
