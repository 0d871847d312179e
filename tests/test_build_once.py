"""Build once, run many: ``fxstore.capture.build_cache`` under ``patch_sweep`` and ``steering_vectors``.

Every result is compared with the plain model (a forward-hook loop, ``output_hidden_states``) after the
model changed: a cached extractor is reused only while it computes what the model computes now."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers
from test_sweep import hook_loop
from torch import nn

import fxstore
from fxstore.capture import BuildCache, build_cache

VOCAB, T = 50, 4
LAYERS = ["transformer.h.0", "transformer.h.1"]


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def logit_diff(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1, 3] - logits[:, -1, 7]


def _pair(length: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, length), generator=g), torch.randint(0, VOCAB, (1, length), generator=g)


def _sweep_checked(model: nn.Module, layers: list[str], length: int = T, seed: int = 1) -> None:
    """One sweep, compared cell by cell with a forward-hook loop on the model as it is now."""
    clean, corrupted = _pair(length, seed)
    grid = fxstore.patch_sweep(model, clean, corrupted, layers, logit_diff, positions=list(range(length)), batch_size=4)
    _assert_hooked_grid(grid, model, clean, corrupted, layers)


def _assert_hooked_grid(grid: torch.Tensor, model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor,
                        layers: list[str]) -> None:
    """``grid`` equals the forward-hook loop's patching grid over every position of ``clean``."""
    expected = hook_loop(model, clean, corrupted, layers, logit_diff, list(range(clean.shape[1])))
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5, check_dtype=False)


class ModeScale(nn.Module):
    """Doubles its input in train mode: fx bakes ``self.training`` into the graph, so a stale program shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if self.training else 1.0)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.mode = ModeScale()
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(ids))
        return self.head(self.mode(h).cumsum(1))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


TINY_LAYERS = ["block", "mode"]


def test_a_repeated_sweep_builds_nothing_new_whatever_the_length():
    model = _gpt2()
    _sweep_checked(model, LAYERS)
    builds = build_cache.builds
    for length, seed in ((T, 2), (T + 3, 3), (T, 5)):  # new pairs, other lengths: same extractors
        _sweep_checked(model, LAYERS, length, seed)
    assert build_cache.builds == builds


def test_replacing_a_parameter_rebuilds_and_gives_the_new_models_grid():
    model = _gpt2()
    _sweep_checked(model, LAYERS)
    builds = build_cache.builds
    model.transformer.h[1].mlp.c_fc.weight = nn.Parameter(torch.randn_like(model.transformer.h[1].mlp.c_fc.weight))
    _sweep_checked(model, LAYERS)
    assert build_cache.builds == builds + 2  # the reader and the patcher


def test_replacing_a_top_level_module_rebuilds():
    model = _tiny()
    _sweep_checked(model, TINY_LAYERS)
    builds = build_cache.builds
    model.head = nn.Linear(16, VOCAB)  # the extractor mirrors top-level children: a stale one would differ
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == builds + 2


def test_in_place_changes_and_load_state_dict_need_no_rebuild_and_read_the_new_values():
    model = _tiny()
    _sweep_checked(model, TINY_LAYERS)
    builds = build_cache.builds
    with torch.no_grad():
        model.block[0].weight.mul_(3.0)
        model.head.bias.add_(1.0)
    _sweep_checked(model, TINY_LAYERS)
    other = _tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    model.load_state_dict(other.state_dict())
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == builds
    model.load_state_dict(_tiny().state_dict(), assign=True)  # new parameter objects: rebuilt
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == builds + 2


def test_a_mode_change_rebuilds_and_each_mode_gives_its_own_grid():
    model = _tiny()
    eval_builds = build_cache.builds
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == eval_builds + 2
    model.train()
    _sweep_checked(model, TINY_LAYERS)  # a stale eval program would halve every patched value
    model.mode.eval()  # one submodule's mode counts too
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == eval_builds + 6


def test_a_dtype_change_rebuilds():
    model = _tiny()
    _sweep_checked(model, TINY_LAYERS)
    builds = build_cache.builds
    model.double()  # same parameter objects, new dtype
    _sweep_checked(model, TINY_LAYERS)
    assert build_cache.builds == builds + 2


def test_the_cache_keeps_no_model_alive():
    model = _gpt2()
    _sweep_checked(model, LAYERS)
    entries = len(build_cache)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(build_cache) == entries - 2


def test_a_model_that_refers_to_itself_is_served_but_not_kept():
    class Loop(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.me = [self]  # a stand-in shares this list: caching would keep the model alive

    torch.manual_seed(0)
    model = Loop().eval()
    cache = BuildCache()
    made = cache.get(model, "k", lambda m: fxstore.FeatureExtractor(m, ["block"]))
    assert len(cache) == 0 and cache.builds == 1
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(made(ids)[0], model(ids))
    ref = weakref.ref(model)
    del model, made
    gc.collect()
    assert ref() is None


def test_the_cache_is_bounded_and_evicts_the_least_recently_used():
    cache = BuildCache(max_entries=2)
    model = nn.Linear(2, 2)
    for key in ("a", "b", "a", "c"):
        cache.get(model, key, lambda m: object())
    assert len(cache) == 2 and cache.builds == 3 and cache.hits == 1
    cache.get(model, "a", lambda m: object())
    cache.get(model, "b", lambda m: object())  # evicted by "c": built again
    assert cache.builds == 4 and cache.hits == 2


def test_steering_vectors_reuse_the_sweeps_reader_and_follow_the_model():
    model = _gpt2()
    g = torch.Generator().manual_seed(9)
    pos = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 5, 4)]
    neg = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 2, 6)]

    def by_hand() -> torch.Tensor:
        with torch.no_grad():
            last = [model(ids[None], output_hidden_states=True).hidden_states[1][0, -1] for ids in pos + neg]
        return (torch.stack(last[:3]) - torch.stack(last[3:])).mean(0)

    _sweep_checked(model, ["transformer.h.0"])
    builds = build_cache.builds
    vec = fxstore.steering_vectors(model, pos, neg, ["transformer.h.0"])["transformer.h.0"]
    torch.testing.assert_close(vec, by_hand(), rtol=1e-5, atol=1e-5)
    assert build_cache.builds == builds  # the same layers: the sweep's reader
    model.transformer.h[0].ln_1.weight = nn.Parameter(torch.rand(32) + 0.5)
    vec = fxstore.steering_vectors(model, pos, neg, ["transformer.h.0"])["transformer.h.0"]
    torch.testing.assert_close(vec, by_hand(), rtol=1e-5, atol=1e-5)
    assert build_cache.builds == builds + 1


@pytest.mark.compile
def test_a_repeated_compiled_sweep_compiles_nothing_new():
    torch._dynamo.reset()
    model = _gpt2()
    clean, corrupted = _pair()
    options = {"backend": "eager"}
    first = fxstore.patch_sweep(model, clean, corrupted, LAYERS, logit_diff, positions=range(T), batch_size=4,
                                compile=options)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    clean2, corrupted2 = _pair(seed=7)
    second = fxstore.patch_sweep(model, clean2, corrupted2, LAYERS, logit_diff, positions=range(T), batch_size=4,
                                 compile=options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    _assert_hooked_grid(first, model, clean, corrupted, LAYERS)
    _assert_hooked_grid(second, model, clean2, corrupted2, LAYERS)
