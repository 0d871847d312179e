"""The export frontend exports once for all shapes: dynamic dimensions, shape guards, a bounded cache.

References are independent of fxstore: the models' own ``output_hidden_states``, the plain
model's output, and ``torch.autograd.grad`` through forward hooks.
"""

from collections.abc import Callable

import pytest
import torch
from _hooks import hooked_grads
from torch import nn

from fxstore.capture._export import ExportRunner
from fxstore.capture.extractor import FeatureExtractor

transformers = pytest.importorskip("transformers")

VOCAB = 100
EAGER_SHAPES = [(2, 8), (3, 5), (1, 9), (4, 12), (2, 3), (5, 7), (3, 16), (2, 6)]
COMPILED_SHAPES = [(3, 10), (2, 4), (4, 9), (2, 13), (5, 5), (2, 11), (3, 7), (4, 14)]  # none seen eagerly


def _runner(ex: FeatureExtractor) -> ExportRunner:
    """The export frontend's runner of the extractor's current mode (where its export count lives)."""
    runner = ex._program().run  # the counts: also ex.exports
    assert isinstance(runner, ExportRunner)
    return runner


def gpt2() -> tuple[nn.Module, list[str], dict]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)
    # hidden_states: the embedding (after dropout), each block but the last, then the final norm
    return transformers.GPT2Model(config).eval(), ["drop", "h.0", "ln_f"], {"use_cache": False}


def bert() -> tuple[nn.Module, list[str], dict]:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertModel(config).eval(), ["embeddings", "encoder.layer.0", "encoder.layer.1"], {}


def llama() -> tuple[nn.Module, list[str], dict]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=32)
    return transformers.LlamaModel(config).eval(), ["embed_tokens", "layers.0", "norm"], {"use_cache": False}


MODELS: dict[str, Callable[[], tuple[nn.Module, list[str], dict]]] = {"gpt2": gpt2, "bert": bert, "llama": llama}


def _ids(b: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(b * 100 + n))


def _check_hidden_states(model: nn.Module, layers: list[str], call: Callable, shape: tuple[int, int],
                         kwargs: dict) -> None:
    ids = _ids(*shape)
    out, feats = call(ids, **kwargs)
    ref = model(ids, output_hidden_states=True, **kwargs)
    assert len(ref.hidden_states) == len(layers)
    for layer, expected in zip(layers, ref.hidden_states):
        assert torch.equal(feats[layer], expected), (shape, layer)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state), shape


@pytest.mark.compile
@pytest.mark.parametrize("name", list(MODELS))
def test_one_export_serves_eight_shapes_eager_and_compiled(name):
    torch._dynamo.reset()
    model, layers, kwargs = MODELS[name]()
    ex = FeatureExtractor(model, layers)
    with torch.no_grad():
        for shape in EAGER_SHAPES:
            _check_hidden_states(model, layers, ex, shape, kwargs)
        assert _runner(ex).exports == 1
        compiled = torch.compile(ex, fullgraph=True, backend="eager")
        for shape in COMPILED_SHAPES:
            _check_hidden_states(model, layers, compiled, shape, kwargs)
    assert _runner(ex).exports == 1 and _runner(ex).programs == 1


@pytest.mark.compile
def test_compiled_first_call_with_example_inputs_needs_no_eager_call():
    torch._dynamo.reset()
    model, layers, kwargs = gpt2()
    ex = FeatureExtractor(model, layers, example_inputs=((_ids(2, 8),), kwargs))
    compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for shape in COMPILED_SHAPES[:3]:
            _check_hidden_states(model, layers, compiled, shape, kwargs)
    assert _runner(ex).exports == 1


def test_gradients_equal_autograd_at_every_shape_with_one_export():
    model, _, kwargs = gpt2()
    tapped = ["h.0", "h.1.attn", "ln_f"]
    ex = FeatureExtractor(model, grads=tapped)
    for shape in EAGER_SHAPES[:3]:
        ids = _ids(*shape)
        out, feats = ex(ids, **kwargs)
        out.last_hidden_state.pow(2).sum().backward()
        ref = hooked_grads(model, tapped, lambda o: o.last_hidden_state.pow(2).sum(), ids, **kwargs)
        grads = ex.gradients(feats)
        for layer in tapped:
            torch.testing.assert_close(grads[layer], ref[layer][0], rtol=0, atol=1e-6)
    assert _runner(ex).exports == 1


class Branchy(nn.Module):
    """Python control flow on the batch size: an exported graph holds for one side of it only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h.relu() if x.shape[0] > 4 else h.tanh()


def test_shape_outside_the_exported_range_exports_once_more():
    model = Branchy().eval()
    ex = FeatureExtractor(model, ["lin"], frontend="export", example_inputs=torch.rand(3, 4))
    runner = _runner(ex)
    for b in (3, 2, 4, 6, 9, 5, 2, 7):
        x = torch.rand(b, 4)
        out, feats = ex(x)
        assert torch.equal(out, model(x)) and torch.equal(feats["lin"], model.lin(x)), b
    assert runner.exports == 2  # batch <= 4, then batch > 4: the guard of the first graph failed once
    guard = runner.first[0].guard
    assert guard.admits([torch.rand(4, 4)]) and not guard.admits([torch.rand(5, 4)])


@pytest.mark.compile
def test_shape_outside_every_range_inside_compile_raises_with_a_hint():
    torch._dynamo.reset()
    model = Branchy().eval()
    ex = FeatureExtractor(model, ["lin"], frontend="export", example_inputs=torch.rand(3, 4))
    compiled = torch.compile(ex, fullgraph=True, backend="eager")
    compiled(torch.rand(2, 4))
    with pytest.raises(Exception, match=r"(?s)no exported graph serves.*Hint: call the extractor once eagerly"):
        compiled(torch.rand(6, 4))


class Unrolled(nn.Module):
    """A loop over the batch: every batch size is its own graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        total = h[0]
        for i in range(1, x.shape[0]):
            total = total + h[i]
        return total


def test_cache_keeps_the_most_recently_used_graphs_only():
    model = Unrolled().eval()
    ex = FeatureExtractor(model, ["lin"], frontend="export", example_inputs=torch.rand(2, 4))
    runner = _runner(ex)
    for b in (2, 3, 4, 5, 6, 7):
        x = torch.rand(b, 4)
        out, feats = ex(x)
        assert torch.equal(out, model(x)) and torch.equal(feats["lin"], model.lin(x))
    assert runner.exports == 6 and runner.programs == runner.max_programs == 4
    ex(torch.rand(4, 4))  # still cached (4..7)
    assert runner.exports == 6
    x = torch.rand(2, 4)  # evicted: exported again, and still right
    assert torch.equal(ex(x)[0], model(x)) and runner.exports == 7 and runner.programs == 4


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        h = self.lin(x)
        return h * 2 if double else h


def test_new_non_tensor_value_exports_again():
    model = Scaled().eval()
    ex = FeatureExtractor(model, ["lin"], frontend="export", example_inputs=((torch.rand(3, 4),), {"double": False}))
    for b, double in ((3, False), (5, False), (5, True), (2, True), (7, False)):
        x = torch.rand(b, 4)
        assert torch.equal(ex(x, double=double)[0], model(x, double=double))
    assert _runner(ex).exports == 2 and _runner(ex).programs == 2


def test_max_programs_must_be_positive():
    from fxstore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"(?s)max_programs=0 must be a positive int.*Hint"):
        ExportRunner(lambda args, kwargs: None, keep_output=True, max_programs=0)


@pytest.mark.slow
def test_compiled_gradient_taps_of_an_exported_model_serve_new_shapes():
    model, _, kwargs = gpt2()
    tapped = ["h.0", "ln_f"]
    ex = FeatureExtractor(model, grads=tapped)
    ex.compile(backend="aot_eager")  # fullgraph; the probes are made outside the graph
    for shape in [(2, 8), (3, 5), (2, 11), (4, 6)]:
        ids = _ids(*shape)
        out, feats = ex(ids, **kwargs)
        out.last_hidden_state.pow(2).sum().backward()
        ref = hooked_grads(model, tapped, lambda o: o.last_hidden_state.pow(2).sum(), ids, **kwargs)
        grads = ex.gradients(feats)
        for layer in tapped:
            torch.testing.assert_close(grads[layer], ref[layer][0], rtol=1e-5, atol=1e-6)
    assert ex.exports == 1
