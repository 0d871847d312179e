"""Truncation through assertions: asserts that guard only values past the cut go with them.

References: the plain model's own block outputs recorded by a forward hook, and the plain
model raising on a bad input.
"""

import re

import pytest
import torch
from torch import fx, nn
from torchvision.models.vision_transformer import VisionTransformer

from fxstore.capture.extractor import FeatureExtractor


def _graph(ex: FeatureExtractor) -> fx.Graph:
    """The generated graph of the extractor's current mode."""
    return ex.graph


def _asserts(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is torch._assert]


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def _block_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_vit_cut_after_block_2_runs_no_later_block_and_matches_the_hooked_block():
    model = _vit()
    layer = "encoder.layers.encoder_layer_2"
    ex = FeatureExtractor(model, [layer], keep_output=False)
    graph = _graph(ex)
    modules = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    later = [m for m in modules if re.match(r"encoder\.layers\.encoder_layer_([3-9]|1[01])\.|encoder\.ln|heads", m)]
    assert not later and f"{layer}.mlp" in modules
    # kept: the image size checks, the encoder's input check and the input checks of blocks 0..3,
    # all on values the cut graph computes anyway; dropped: the input checks of blocks 4..11
    assert len(_asserts(graph)) == 2 + 1 + 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # as the reference: MultiheadAttention's fused path depends on the grad mode
        out, feats = ex(x)
    assert out is None and torch.equal(feats[layer], _block_output(model, layer, x))


def test_full_vit_keeps_every_assert():
    model = _vit()
    ex = FeatureExtractor(model, ["encoder.layers.encoder_layer_2"])
    assert len(_asserts(_graph(ex))) == 2 + 1 + 12


class Checked(nn.Module):
    """An input check before the kept part, a check of a kept value, and a check past the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert((x >= 0).all(), "x must be non-negative")
        h = self.a(x)
        torch._assert(h.dim() == 2, "h must be 2-D")
        y = self.b(h)
        torch._assert(torch.isfinite(y).all(), "y must be finite")
        return y


def test_assert_on_the_input_of_the_kept_part_still_raises():
    model = Checked()
    ex = FeatureExtractor(model, ["a"], keep_output=False)
    graph = _graph(ex)
    assert [n.args[1] for n in _asserts(graph)] == ["x must be non-negative", "h must be 2-D"]
    assert not [n for n in graph.nodes if n.op == "call_module" and n.target == "b"]
    x = torch.rand(3, 4)
    assert torch.equal(ex(x)[1]["a"], model.a(x))
    with pytest.raises(AssertionError, match="x must be non-negative"):
        model(-x)  # the reference: the plain model raises
    with pytest.raises(AssertionError, match="x must be non-negative"):
        ex(-x)


def test_with_the_output_kept_every_assert_stays():
    model = Checked()
    ex = FeatureExtractor(model, ["a"])
    assert len(_asserts(_graph(ex))) == 3
    with pytest.raises(AssertionError, match="y must be finite"):
        ex(torch.full((1, 4), float("inf")))
