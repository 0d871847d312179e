"""Every torchvision classification and segmentation model, random weights, small inputs.

Sampled nodes are selected by exact node name (a predicate): a string that also names a
module means the module, and torchvision's naming can give a node the name of another
module (in ViT the node ``encoder_layer_0.ln_1`` is the output of module ``ln_2``).

Per model: node names equal torchvision's (train and eval); the extractor's output is
bit-equal to the plain model in eval and in train mode; a random sample of node features
equals an independent reference (torchvision's tracer run node by node in
``torch.fx.Interpreter``, values cloned when produced); gradients at sampled nodes equal
``torch.autograd.grad`` computed in that reference.
"""

import random

import pytest
import torch
import torchvision.models as M
from _reference import node_grads, node_values, scalar_loss
from torch.utils._pytree import tree_leaves
from torchvision.models.feature_extraction import get_graph_node_names

import fxstore
from fxstore.capture import gradient_of

CLASSIFICATION = M.list_models(module=M)
SEGMENTATION = M.list_models(module=M.segmentation)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs: dict = {"weights": None}
    size = 64
    if name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        kwargs["image_size"] = size
    elif name.startswith("maxvit"):
        size = 224
    elif name == "inception_v3":
        size = 299  # the train-mode auxiliary head needs 17x17 maps after Mixed_6e
    elif name in SEGMENTATION:
        kwargs.update(weights_backbone=None, num_classes=5)
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy-free, faster init
    model = M.get_model(name, **kwargs)
    return model, torch.rand(2, 3, size, size)


def same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def tensor_nodes(model, x, names, k, rng):
    """Up to ``k`` sampled node names whose value is a floating tensor, with their values."""
    candidates = [n for n in names[1:]]
    rng.shuffle(candidates)
    _, values = node_values(model, x, candidates[: 4 * k])
    picked = [n for n in candidates[: 4 * k] if n in values and values[n].is_floating_point()][:k]
    return picked, values


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_model(name):
    torch.manual_seed(0)
    rng = random.Random(name)
    model, x = build(name)
    model.eval()

    # names: identical to torchvision's, in both modes
    tv_train, tv_eval = get_graph_node_names(model, suppress_diff_warning=True)
    assert fxstore.node_names(model, train=True) == tv_train
    assert fxstore.node_names(model, train=False) == tv_eval

    # eval: output bit-equal, sampled features equal to the reference
    picked, ref = tensor_nodes(model, x, tv_eval, 4, rng)
    ex = fxstore.FeatureExtractor(model, lambda node_name, wanted=set(picked): node_name in wanted)
    with torch.no_grad():
        out, feats = ex(x)
        assert same(out, model(x))
    assert sorted(feats) == sorted(picked)
    for node in picked:
        assert torch.equal(feats[node], ref[node]), node

    # gradients at two sampled nodes equal autograd.grad in the reference
    tapped = picked[:2]
    ref_grads = node_grads(model, x, tapped, scalar_loss)
    gex = fxstore.FeatureExtractor(model, [], grads=lambda node_name, wanted=set(tapped): node_name in wanted)
    out, feats = gex(x)
    scalar_loss(out).backward()
    for node in tapped:
        expected = ref_grads[node]
        got = gradient_of(feats[node + ":grad"])
        got = torch.zeros_like(expected) if got is None else got  # a node off the loss path gets no gradient
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=node)
    model.zero_grad(set_to_none=True)

    # train: the train graph runs, output bit-equal to the plain model (same RNG stream,
    # same batch-norm statistics), and the sampled nodes the train graph has equal the
    # reference run in train mode
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def reset_buffers():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])

    in_train = [n for n in picked if n in tv_train]  # the train graph may lack a node the eval graph has
    assert in_train, f"none of {picked} is a node of the train graph"
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model(x)
        reset_buffers()
        torch.manual_seed(1)
        _, train_ref = node_values(model, x, in_train)
        reset_buffers()
        ex.train()
        torch.manual_seed(1)
        out, feats = ex(x)
    assert same(out, expected)
    assert sorted(feats) == sorted(in_train)
    for node in in_train:
        assert torch.equal(feats[node], train_ref[node]), node
