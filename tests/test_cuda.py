"""CUDA: same results on the GPU, pinned non-blocking copies to the CPU, compiled taps."""

import pytest
import torch
import torch._dynamo
import torchvision
from _reference import node_grads, scalar_loss

import fxstore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def resnet():
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torchvision.models.resnet50(weights=None).eval().cuda()


def test_cuda_output_bit_equal_and_features_match_hooks(resnet):
    x = torch.rand(4, 3, 128, 128, device="cuda")
    ex = fxstore.FeatureExtractor(resnet, ["layer1", "layer3", "layer4.2.add"])
    with torch.no_grad():
        out, feats = ex(x)
        assert torch.equal(out, resnet(x))
    ref = fxstore.HookForwardModuleStorage(resnet, ["layer1", "layer3"], detach=True)
    with torch.no_grad():
        ref(x)
    ref.remove()
    assert torch.equal(feats["layer1"], ref["layer1"][0]) and torch.equal(feats["layer3"], ref["layer3"][0])


def test_storage_copies_to_pinned_cpu_without_blocking(resnet):
    x = torch.rand(2, 3, 128, 128, device="cuda")
    storage = fxstore.ForwardModuleStorage(resnet, ["layer2", "layer4"], detach=True, device="cpu")
    with torch.no_grad():
        storage([x, x * 2])
        _, feats = fxstore.FeatureExtractor(resnet, ["layer2", "layer4"])(x * 2)
    stored = storage["layer4"]
    assert len(stored) == 2 and stored[1].device.type == "cpu" and stored[1].is_pinned()
    assert torch.equal(stored[1], feats["layer4"].cpu())
    assert torch.equal(storage["layer2"][1], feats["layer2"].cpu())


def test_cuda_compiled_inductor_gradients(resnet):
    torch._dynamo.reset()
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    grads = ["layer1.0.bn1", "layer3"]
    ex = fxstore.FeatureExtractor(model, ["layer2"], grads=grads, dtype=torch.bfloat16)
    assert torch._dynamo.explain(ex)(x).graph_break_count == 0
    out, feats = torch.compile(ex, fullgraph=True)(x)
    scalar_loss(out.float().cpu()).backward()
    got = ex.gradients(feats)
    ref = node_grads(model, x, ["layer1.0.bn1", "layer3.1.relu_1"], lambda o: scalar_loss(o.float().cpu()))
    torch.testing.assert_close(got["layer1.0.bn1"], ref["layer1.0.bn1"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got["layer3"], ref["layer3.1.relu_1"], rtol=1e-3, atol=1e-5)
    assert feats["layer2"].dtype == torch.bfloat16 and feats["layer2"].is_cuda


def test_reduce_overhead_compile_of_gradient_taps_gives_exact_gradients(resnet):
    """Under CUDA graphs a graph with taps (CPU-side operators) runs without being recorded as a
    CUDA graph; what must hold is that every call's gradients stay those of torch.autograd.grad."""
    layers = ["layer2", "layer4"]
    ex = fxstore.FeatureExtractor(resnet, grads=layers)
    compiled = torch.compile(ex, fullgraph=True, mode="reduce-overhead")
    for batch in (2, 2, 3):
        x = torch.rand(batch, 3, 64, 64, device="cuda")
        out, feats = compiled(x)
        scalar_loss(out.float().cpu()).backward()
        ref = node_grads(resnet, x, layers, lambda o: scalar_loss(o.float().cpu()))
        grads = ex.gradients(feats)
        for name in layers:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5)


def test_cuda_graphs_serve_new_steering_vectors_without_recompiling(resnet):
    """``mode="reduce-overhead"``: the edit's tensors are static buffers, updated in place between replays."""
    torch._dynamo.reset()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    add = fxstore.Add(torch.zeros(512, 1, 1, device="cuda"))
    ex = fxstore.FeatureExtractor(resnet, edits={"layer2": add})
    compiled = torch.compile(ex, mode="reduce-overhead", fullgraph=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        ex(x)  # the eager self-check
        for i in range(4):
            vector = torch.randn(512, 1, 1, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
            add.update(vector=vector)
            out = compiled(x)[0].clone()
            handle = resnet.layer2.register_forward_hook(lambda m, inp, o, v=vector: o + v)
            try:
                expected = resnet(x)
            finally:
                handle.remove()
            torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_generation_under_cuda_graphs_matches_hooks_and_serves_new_vectors_without_recompiling():
    """``ex.compile(mode="reduce-overhead")``: the prompt and decode programs run as CUDA graphs; the
    edit's tensors, the position masks and the feature buffers are static buffers updated in place."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(config).eval().cuda()
    torch._dynamo.reset()
    add = fxstore.Add(torch.zeros(64, device="cuda"), scale=4.0)
    ex = fxstore.FeatureExtractor(model, ["model.layers.1"], edits={"model.layers.0": add})
    ex.compile(mode="reduce-overhead")
    ids = torch.randint(1, 128, (2, 8), device="cuda")
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    graphs = None
    for i in range(3):
        vector = torch.randn(64, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        add.update(vector=vector)
        out = ex.generate(ids, **greedy)
        record = []
        handles = [model.model.layers[0].register_forward_hook(lambda m, a, o, v=vector: o + 4.0 * v),
                   model.model.layers[1].register_forward_hook(lambda m, a, o, r=record: r.append(o))]
        try:
            expected = model.generate(ids, **greedy)
        finally:
            for h in handles:
                h.remove()
        assert torch.equal(out.sequences, expected)
        torch.testing.assert_close(out.features["model.layers.1"], torch.cat(record, 1), rtol=1e-3, atol=1e-3)
        if graphs is None:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    """A Llama loaded with accelerate's device_map: layer 0 on cuda:0, layer 1 offloaded to the CPU."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("dispatched")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": 0, "lm_head": 0}
    return transformers.LlamaForCausalLM.from_pretrained(folder, device_map=device_map).eval()


def test_device_map_dispatch_across_cuda_and_cpu_reads_and_edits_like_forward_hooks(dispatched):
    model = dispatched
    layers, vector = ["model.layers.0", "model.layers.1"], torch.randn(32, device="cuda")
    ex = fxstore.FeatureExtractor(model, layers, edits={"model.layers.1": fxstore.Add(vector)}, device="cpu")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        out, feats = ex(ids)
    seen = {}

    def hook(name):
        def record(module, args, output):
            output = output + vector if name == "model.layers.1" else output
            seen[name] = output
            return output
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    for name in layers:
        assert feats[name].device.type == "cpu"
        torch.testing.assert_close(feats[name], seen[name].cpu(), rtol=1e-5, atol=1e-6)
    assert ex.trace_report.verified != "not yet" and "2 of 2 features" in ex.trace_report.checked


def test_device_map_dispatch_across_cuda_and_cpu_generates_like_model_generate_with_hooks(dispatched):
    """``ex.generate`` on the dispatched Llama: tokens of ``model.generate`` with a hook doing the same
    edit, every position's features on the CPU where ``device="cpu"`` asks."""
    model = dispatched
    layers, vector = ["model.layers.0", "model.layers.1"], torch.randn(32, device="cuda") * 4.0
    ex = fxstore.FeatureExtractor(model, layers, edits={"model.layers.1": fxstore.Add(vector)}, device="cpu")
    ids = torch.randint(1, 64, (2, 6), device="cuda")
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = ex.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    seen = {name: [] for name in layers}

    def hook(name):
        def record(module, args, output):
            output = output + vector if name == "model.layers.1" else output
            seen[name].append(output.detach())
            return output
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(out.sequences.to(expected.device), expected)
    for name in layers:
        got = out.features[name]
        assert got.device.type == "cpu" and got.shape == (2, 6 + 5 - 1, 32)
        torch.testing.assert_close(got, torch.cat(seen[name], 1).cpu(), rtol=1e-5, atol=1e-6)
