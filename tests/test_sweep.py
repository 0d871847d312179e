"""``fxstore.patch_sweep`` against a hand-written forward-hook loop (one forward per cell) and nnsight 0.8.1."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
import transformers
from torch import nn

import fxstore

VOCAB, T = 50, 6


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, T), generator=g), torch.randint(0, VOCAB, (1, T), generator=g)


LAYERS = ["transformer.h.0", "transformer.h.1", "transformer.h.2"]


def logit_diff(out: Any) -> torch.Tensor:
    return out.logits[:, -1, 3] - out.logits[:, -1, 7]


def _first(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


def hook_loop(model: nn.Module, clean: Any, corrupted: Any, layers: list[str], metric: Callable,
              positions: list[int] | None) -> torch.Tensor:
    """One forward per cell: a forward hook copies the clean value into the corrupted run."""
    saved: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: saved.__setitem__(n, _first(o).detach().clone())) for n in layers]
    with torch.no_grad():
        model(clean)
    for h in handles:
        h.remove()
    grid = torch.empty(len(layers), len(positions) if positions is not None else 1)
    for i, name in enumerate(layers):
        for j, p in enumerate(positions if positions is not None else [None]):
            def patch(m: nn.Module, inputs: Any, o: Any, name: str = name, p: Any = p) -> Any:
                value = _first(o).clone()
                if p is None:
                    value = saved[name].clone()
                else:
                    value[:, p] = saved[name][:, p]
                return (value, *o[1:]) if isinstance(o, tuple) else value
            handle = model.get_submodule(name).register_forward_hook(patch)
            with torch.no_grad():
                grid[i, j] = metric(model(corrupted))[0]
            handle.remove()
    return grid if positions is not None else grid[:, 0]


@pytest.mark.parametrize("batch_size", [5, 32])
def test_grid_equals_a_hook_loop_cell_by_cell(gpt2, pair, batch_size):
    clean, corrupted = pair
    positions = list(range(T))
    grid = fxstore.patch_sweep(gpt2, clean, corrupted, LAYERS, logit_diff, positions=positions, batch_size=batch_size)
    expected = hook_loop(gpt2, clean, corrupted, LAYERS, logit_diff, positions)
    assert grid.shape == (3, T)
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # sanity of the reference: the last block at the last token is the clean run
        torch.testing.assert_close(grid[2, -1], logit_diff(gpt2(clean))[0], rtol=1e-5, atol=1e-5)


def test_grid_equals_nnsight_patching(gpt2, pair):
    nnsight = pytest.importorskip("nnsight")
    clean, corrupted = pair
    traced = nnsight.NNsight(copy.deepcopy(gpt2))  # nnsight rewires the modules it wraps: give it its own copy
    with torch.no_grad():
        with traced.trace(clean):
            h0 = traced.transformer.h[0].output.save()
            h1 = traced.transformer.h[1].output.save()
            h2 = traced.transformer.h[2].output.save()
        saved = [h0, h1, h2]
        expected = torch.empty(3, T)
        for i in range(3):
            for p in range(T):
                value = saved[i][:, p]
                with traced.trace(corrupted):
                    traced.transformer.h[i].output[:, p] = value
                    logits = traced.lm_head.output.save()
                expected[i, p] = logits[0, -1, 3] - logits[0, -1, 7]
    grid = fxstore.patch_sweep(gpt2, clean, corrupted, LAYERS, logit_diff, positions=range(T), batch_size=8)
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
def test_compiled_sweep_equals_the_eager_one(gpt2, pair):
    torch._dynamo.reset()
    clean, corrupted = pair
    eager = fxstore.patch_sweep(gpt2, clean, corrupted, LAYERS, logit_diff, positions=[0, 2, 5], batch_size=4)
    compiled = fxstore.patch_sweep(gpt2, clean, corrupted, LAYERS, logit_diff, positions=[0, 2, 5], batch_size=4,
                                   compile={"backend": "eager"})
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_whole_value_patching_of_a_cnn_equals_the_hook_loop():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    g = torch.Generator().manual_seed(2)
    clean, corrupted = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    layers = ["layer1", "layer2", "layer3", "layer4"]

    def metric(out: torch.Tensor) -> torch.Tensor:
        return out[:, 1] - out[:, 2]

    grid = fxstore.patch_sweep(model, clean, corrupted, layers, metric, batch_size=3)
    expected = hook_loop(model, clean, corrupted, layers, metric, None)
    assert grid.shape == (4,)
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)


def test_model_is_left_as_it_was(gpt2, pair):
    clean, corrupted = pair
    with torch.no_grad():
        before = gpt2(corrupted).logits
    fxstore.patch_sweep(gpt2, clean, corrupted, LAYERS[:1], logit_diff, positions=[1], batch_size=2)
    with torch.no_grad():
        assert torch.equal(gpt2(corrupted).logits, before)
    assert not gpt2._forward_hooks and not any(m._forward_hooks for m in gpt2.modules())


def test_position_out_of_range_is_an_error(gpt2, pair):
    with pytest.raises(fxstore.EditError, match=r"positions \[9\] are out of range for layer 'transformer.h.0'"):
        fxstore.patch_sweep(gpt2, *pair, LAYERS[:1], logit_diff, positions=[0, 9])


def test_a_metric_without_one_value_per_row_is_an_error(gpt2, pair):
    with pytest.raises(fxstore.EditError, match=r"metric returned \(\) for a batch of 4 rows"):
        fxstore.patch_sweep(gpt2, *pair, LAYERS[:1], lambda out: out.logits.sum(), positions=[0], batch_size=4)


def test_inputs_with_more_than_one_example_are_an_error(gpt2, pair):
    clean, corrupted = pair
    with pytest.raises(fxstore.EditError, match=r"corrupted has a tensor of shape \(2, 6\)"):
        fxstore.patch_sweep(gpt2, clean, corrupted.repeat(2, 1), LAYERS[:1], logit_diff, positions=[0])
