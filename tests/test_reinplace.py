"""The re-inplacing pass: same results with and without it, and a stored value is never overwritten.

With and without the pass (``fxstore.capture._reinplace.reinplace`` replaced by a no-op),
every torchvision model of the zoo gives bit-equal outputs, features, tapped gradients and
parameter gradients, in eval and in train mode; both are also compared with the plain model.
The protection tests compare stored features with forward hooks on the plain model that
clone what they see (the independent reference), for a stored value that is the left
operand of ``+=`` among others.
"""

from __future__ import annotations

import contextlib
import hashlib
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as M
from _hooks import hooked_outputs
from test_zoo import CLASSIFICATION, SEGMENTATION, build, same, tensor_nodes
from torch import nn

import fxstore
from fxstore.capture import _reinplace, gradient_of


@contextlib.contextmanager
def pass_off():
    """Build extractors without the pass (the graph as it was before it existed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_reinplace, "reinplace", lambda graph, root: 0)
        yield


def rewritten(ex: fxstore.FeatureExtractor) -> int:
    return ex.code.count("fxstore_capture__reinplace_")


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests mean bit-equal tensors (same dtype and shape)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{t.dtype}|{tuple(t.shape)}|" + hashlib.sha256(data).hexdigest()


def run_once(model, x, picked, tapped, training, off):
    """Output, features, tapped gradients and parameter gradients of one extractor call."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pass_off() if off else contextlib.nullcontext():
        ex = fxstore.FeatureExtractor(model, lambda n, w=set(picked): n in w, grads=lambda n, w=set(tapped): n in w)
    ex.train(training)
    torch.manual_seed(1)
    out, feats = ex(x)
    sum(t.float().sum() for t in torch.utils._pytree.tree_leaves(out) if t.is_floating_point()).backward()
    grads = {k: gradient_of(v) for k, v in feats.items() if k.endswith(":grad")}
    values = {k: v.detach() for k, v in feats.items() if not k.endswith(":grad")}
    params = [None if p.grad is None else _digest(p.grad) for p in model.parameters()]  # not copies: the zoo's
    model.zero_grad(set_to_none=True)  # largest models (regnet_y_128gf, vit_h_14) hold 2.5 GB of gradients
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    return out, values, grads, params, rewritten(ex)


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_zoo_same_with_and_without_the_pass(name, training):
    torch.manual_seed(0)
    model, x = build(name)
    model.train(training)
    names = fxstore.node_names(model, train=training)
    picked, _ = tensor_nodes(model.eval(), x, names, 4, random.Random(name))
    model.train(training)
    tapped = picked[:2]
    on = run_once(model, x, picked, tapped, training, off=False)
    off = run_once(model, x, picked, tapped, training, off=True)
    assert off[4] == 0
    assert same(on[0], off[0])
    assert sorted(on[1]) == sorted(off[1]) == sorted(picked)
    for key in picked:
        assert torch.equal(on[1][key], off[1][key]), key
    for key, grad in off[2].items():
        assert (grad is None and on[2][key] is None) or torch.equal(on[2][key], grad), key
    assert on[3] == off[3]  # parameter gradients, bit for bit (their digests)
    with torch.no_grad():  # and both are the plain model
        torch.manual_seed(1)
        assert same(on[0], model(x))


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_resnet50_residual_adds_are_in_place_again():
    model = M.resnet50().eval()
    convs = conv_names(model)
    assert len(convs) == 53
    ex = fxstore.FeatureExtractor(model, convs)
    assert rewritten(ex) == 16  # one ``out += identity`` per bottleneck
    x = torch.rand(2, 3, 64, 64)
    out, feats = ex(x)
    expected, seen = hooked_outputs(model, convs, x)
    assert torch.equal(out, expected)
    for name in convs:
        assert torch.equal(feats[name], seen[name][0]), name


@pytest.mark.parametrize("kwargs", [{}, {"detach": True}, {"dtype": torch.float32}], ids=["plain", "detach", "cast"])
def test_stored_left_operand_of_iadd_is_not_overwritten(kwargs):
    # BasicBlock: ``out = self.bn2(out); out += identity`` -- bn2's output is the left operand.
    model = M.resnet18().eval()
    stored = ["layer1.0.bn2", "layer2.1.bn2", "layer3.0.conv1"]
    ex = fxstore.FeatureExtractor(model, stored, **kwargs)
    assert rewritten(ex) == 8 - 2
    x = torch.rand(2, 3, 64, 64)
    out, feats = ex(x)
    expected, seen = hooked_outputs(model, stored, x)
    assert torch.equal(out, expected)
    for name in stored:
        assert torch.equal(feats[name], seen[name][0]), name


@pytest.mark.parametrize("transform", [lambda t: t[:, :4], lambda t: t.mean((2, 3))], ids=["view", "pool"])
def test_transformed_left_operand_is_not_overwritten(transform):
    # The transform may return a view of bn2's output (``t[:, :4]``): the block's add stays out of place.
    model = M.resnet18().eval()
    stored = ["layer1.0.bn2", "layer4.1.bn2"]
    ex = fxstore.FeatureExtractor(model, stored, transform=transform)
    assert rewritten(ex) == 8 - 2
    x = torch.rand(2, 3, 64, 64)
    _, feats = ex(x)
    _, seen = hooked_outputs(model, stored, x)
    for name in stored:
        assert torch.equal(feats[name], transform(seen[name][0])), name


def test_tapped_left_operand_keeps_its_value_and_gradient():
    model = M.resnet18().eval()
    x = torch.rand(2, 3, 64, 64)
    ex = fxstore.FeatureExtractor(model, ["layer1.0.bn2"], grads=["layer1.0.bn2", "layer2.0.bn2"])
    out, feats = ex(x)
    out.sum().backward()
    with pass_off():
        ex_off = fxstore.FeatureExtractor(model, ["layer1.0.bn2"], grads=["layer1.0.bn2", "layer2.0.bn2"])
    assert rewritten(ex) > 0 and rewritten(ex_off) == 0
    out_off, feats_off = ex_off(x)
    out_off.sum().backward()
    assert torch.equal(out, out_off)
    _, seen = hooked_outputs(model, ["layer1.0.bn2"], x)
    assert torch.equal(feats["layer1.0.bn2"], seen["layer1.0.bn2"][0])
    for key in ("layer1.0.bn2:grad", "layer2.0.bn2:grad"):
        assert torch.equal(gradient_of(feats[key]), gradient_of(feats_off[key])), key


class Residuals(nn.Module):
    """Adds whose left operand is an input, a parameter, read twice, broadcast or promoted."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 4)
        self.lin2 = nn.Linear(4, 4)
        self.lin3 = nn.Linear(4, 4)
        self.narrow = nn.Linear(4, 1)
        self.bias = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = x + 1  # input on the left
        b = self.bias + a  # parameter on the left
        c = self.lin1(b)
        d = c + torch.sigmoid(c)  # c is read twice
        e = self.narrow(d) + d  # (N, 1) + (N, 4): broadcasts past the left operand, out of place at run time
        f = self.lin2(e) + y  # float64 y: promotes, out of place at run time
        g = self.lin3(f.float())
        g += 2  # the one in-place form that fits
        return F.relu(g)


def test_unsafe_left_operands_are_left_alone():
    model = Residuals()
    x = torch.randn(3, 4)
    y = torch.randn(3, 4, dtype=torch.float64)
    x0 = x.clone()
    bias = model.bias.detach().clone()
    ex = fxstore.FeatureExtractor(model, ["lin1", "lin2"])
    code = ex.code
    assert "x + 1" in code and "bias + " in code and "lin1 + sigmoid" in code  # never written
    assert rewritten(ex) == 2  # narrow(d) + d and g += 2 (checked again when they run); lin2 is stored
    out, feats = ex(x, y)
    assert torch.equal(x, x0) and torch.equal(model.bias.detach(), bias)
    expected, seen = hooked_outputs(model, ["lin1", "lin2"], x, y)
    assert torch.equal(out, expected)
    for name in ("lin1", "lin2"):
        assert torch.equal(feats[name], seen[name][0]), name


def test_gradients_flow_through_a_rewritten_add():
    model = Residuals()
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64)
    ex = fxstore.FeatureExtractor(model, [], grads=["narrow"])
    out, feats = ex(x, y)
    gx, = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    gx_ref, = torch.autograd.grad(model(x2, y).sum(), x2)
    assert torch.equal(gx, gx_ref)


def test_import_fxstore_leaves_heavy_packages_unimported():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import fxstore\n"
        "new = set(sys.modules) - before\n"
        "heavy = [m for m in ('torchvision', 'transformers', 'safetensors', 'tqdm', 'fxstore.dataset') if m in new]\n"
        "assert not heavy, heavy\n"
        "assert set(fxstore.__all__) <= set(dir(fxstore)), set(fxstore.__all__) - set(dir(fxstore))\n"
        "from fxstore import extract_dataset, OutputError, load_features\n"
        "assert fxstore.extract_dataset is extract_dataset and 'safetensors' in sys.modules\n"
        "ns = {}\n"
        "exec('from fxstore import *', ns)\n"
        "assert set(fxstore.__all__) <= set(ns)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
