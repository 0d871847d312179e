"""The two documents fxstore starts from, as tests (shapes and calling conventions)."""

import pytest
import torch
import torchvision
from _reference import hook_outputs, node_grads, scalar_loss

import fxstore


@pytest.fixture(scope="module")
def vgg():
    return torchvision.models.vgg19(weights=None).eval()


def test_single_input_is_stored_under_the_layer(vgg):
    storage = fxstore.ForwardModuleStorage(vgg, [vgg.features[3]])
    x = torch.rand(1, 3, 224, 224)
    storage(x)
    stored = storage[vgg.features[3]][0]
    assert stored.shape == (1, 64, 224, 224)
    assert torch.equal(stored, hook_outputs(vgg, x, {"f3": vgg.features[3]})["f3"][0])


def test_list_of_layers_gives_seed_shapes(vgg):
    storage = fxstore.ForwardModuleStorage(vgg, [vgg.features[3], vgg.features[5]])
    storage(torch.rand(1, 3, 224, 224))
    assert storage[vgg.features[3]][0].shape == (1, 64, 224, 224)
    assert storage[vgg.features[5]][0].shape == (1, 128, 112, 112)


def test_list_of_inputs_is_stored_in_call_order(vgg):
    storage = fxstore.ForwardModuleStorage(vgg, [vgg.features[3]])
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    storage([x, y])
    assert len(storage[vgg.features[3]]) == 2
    for stored, image in zip(storage[vgg.features[3]], [x, y]):
        assert torch.equal(stored, hook_outputs(vgg, image, {"f3": vgg.features[3]})["f3"][0])


def test_groups_run_their_own_input_and_only_what_they_need(vgg):
    storage = fxstore.ForwardModuleStorage(
        vgg, {"style": [vgg.features[5]], "content": [vgg.features[5], vgg.features[10]]}
    )
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    storage(x, "style")
    storage(y, "content")
    assert torch.equal(storage["style"][vgg.features[5]], hook_outputs(vgg, x, {"k": vgg.features[5]})["k"][0])
    ref_y = hook_outputs(vgg, y, {"a": vgg.features[5], "b": vgg.features[10]})
    assert torch.equal(storage["content"][vgg.features[5]], ref_y["a"][0])
    assert torch.equal(storage["content"][vgg.features[10]], ref_y["b"][0])
    assert set(storage.state) == {"style", "content"}
    # "style" needs features[0..5] only: its graph calls no module past features.5
    style_code = storage.extractors["style"].code
    assert "features, \"5\")" in style_code and "features, \"6\")" not in style_code and "classifier" not in style_code


def test_clear_forgets_everything(vgg):
    storage = fxstore.ForwardModuleStorage(vgg, {"style": [vgg.features[5]]})
    storage(torch.rand(1, 3, 32, 32), "style")
    storage.clear()
    assert len(storage) == 0
    with pytest.raises(fxstore.LayerNotFoundError, match="nothing stored"):
        storage["style"][vgg.features[5]]


def test_backward_storage_fills_during_a_training_step(vgg):
    grads = fxstore.BackwardModuleStorage(vgg, [vgg.features[3]])
    x = torch.rand(1, 3, 64, 64)
    out = grads(x)
    torch.nn.functional.cross_entropy(out, torch.tensor([1])).backward()
    got = grads[vgg.features[3]]
    # reference: autograd.grad w.r.t. features[3]'s output in a plain run
    act = {}

    def keep(_m, _i, o):
        act["v"] = o

    h = vgg.features[3].register_forward_hook(keep)
    try:
        loss = torch.nn.functional.cross_entropy(vgg(x), torch.tensor([1]))
    finally:
        h.remove()
    (ref,) = torch.autograd.grad(loss, act["v"])
    assert len(got) == 1 and got[0].shape == (1, 64, 64, 64)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-8)


def test_classic_recipe_by_names_accumulates_detached_cpu_tensors(two_conv):
    storage = fxstore.ForwardModuleStorage(two_conv, ["conv1", "conv2"], detach=True, device="cpu")
    images = [torch.randn(10, 3, 256, 256) for _ in range(2)]
    for image in images:
        storage(image)
    assert len(storage["conv1"]) == 2 and len(storage["conv2"]) == 2
    for i, image in enumerate(images):
        ref = hook_outputs(two_conv, image, {"conv1": two_conv.conv1, "conv2": two_conv.conv2})
        for name in ("conv1", "conv2"):
            t = storage[name][i]
            assert t.device.type == "cpu" and t.grad_fn is None and not t.requires_grad
            assert torch.equal(t, ref[name][0])


def test_hook_backend_has_the_same_api(two_conv):
    fx_storage = fxstore.ForwardModuleStorage(two_conv, ["conv1", two_conv.conv2], detach=True)
    hook_storage = fxstore.HookForwardModuleStorage(two_conv, ["conv1", two_conv.conv2], detach=True)
    x = torch.randn(2, 3, 32, 32)
    fx_storage([x, x + 1])
    hook_storage([x, x + 1])
    for layer in ("conv1", two_conv.conv2):
        assert all(torch.equal(a, b) for a, b in zip(fx_storage[layer], hook_storage[layer], strict=True))
    hook_storage.remove()
    assert not two_conv.conv1._forward_hooks


def test_full_backward_hooks_fail_where_the_fx_storage_works(vgg):
    """Hook failure mode: a full backward hook on a conv followed by ReLU(inplace=True) raises."""
    x = torch.rand(1, 3, 32, 32)
    hooks = fxstore.HookBackwardModuleStorage(vgg, [vgg.features[2]])
    try:
        with pytest.raises(RuntimeError, match="modified inplace"):
            hooks(x).sum().backward()
    finally:
        hooks.remove()
    grads = fxstore.BackwardModuleStorage(vgg, [vgg.features[2]])
    scalar_loss(grads(x)).backward()
    ref = node_grads(vgg, x, ["features.2"], scalar_loss)["features.2"]  # torch.autograd.grad, no hooks
    (got,) = grads[vgg.features[2]]
    assert got.shape == (1, 64, 32, 32) and (ref == 0).any() and (ref != 0).any()  # the ReLU's mask matters
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
    vgg.zero_grad(set_to_none=True)
