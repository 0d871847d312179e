"""Models as users load them, beyond one forward: ``ex.generate`` (the generate column of the matrix in
docs/loading.md), the storages, ``extract_dataset`` and ``patch_sweep``.

Every value is compared with ``model.generate`` or a forward on the same model object with forward
hooks doing the same edit and recording the same modules.
"""

import contextlib
import functools
import tempfile

import pytest
import torch
from _loaded import (
    GREEDY,
    VOCAB,
    assert_sweep_equals_hooks,
    gpt2,
    hooked,
    hooked_generate,
    llama,
    lora,
    lora_prefix,
    nnsight_traced,
    offloaded_llama,
    quantized,
)

import fxstore
from fxstore import ConfigError, FeatureExtractor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def loaded():
    """Each loaded model, built once for the module when a test first asks for it."""
    folder = tempfile.mkdtemp()
    llama(64).save_pretrained(folder)
    builders = {
        "offloaded": offloaded_llama,
        "nnsight-gpt2": lambda: nnsight_traced(gpt2(), lambda wrapped: wrapped.transformer.h[1]),
        "nnsight-offloaded": lambda: nnsight_traced(offloaded_llama(), lambda wrapped: wrapped.model.layers[1]),
        "lora-gpt2": functools.partial(lora, "gpt2"),
        "lora-llama": functools.partial(lora, "llama"),
        **{kind: functools.partial(quantized, kind, folder)
           for kind in ("torchao-int8-weight", "torchao-int8-dynamic", "bnb-8bit", "bnb-nf4")},
    }
    models = {}

    def get(name: str) -> torch.nn.Module:
        if name not in models:
            models[name] = builders[name]().eval()
        return models[name]

    return get


# (model, module stored, module edited): offload puts layer 0 on "cpu" and layer 1 on "disk"
CASES = {
    "offload-edit-on-disk": ("offloaded", "model.layers.0", "model.layers.1"),
    "offload-edit-on-cpu": ("offloaded", "model.layers.1", "model.layers.0"),
    "nnsight-gpt2": ("nnsight-gpt2", "transformer.h.1", "transformer.h.0"),
    "nnsight-offloaded": ("nnsight-offloaded", "model.layers.0", "model.layers.1"),
    "lora-gpt2": ("lora-gpt2", f"{lora_prefix('gpt2')}.1", f"{lora_prefix('gpt2')}.0"),
    "lora-llama": ("lora-llama", f"{lora_prefix('llama')}.1", f"{lora_prefix('llama')}.0"),
    **{kind: (kind, "model.layers.1", "model.layers.0")
       for kind in ("torchao-int8-weight", "torchao-int8-dynamic", "bnb-8bit", "bnb-nf4")},
}


def _hidden(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


@pytest.mark.parametrize("case", list(CASES))
def test_generate_on_a_loaded_model_equals_model_generate_with_forward_hooks(case, loaded):
    name, stored, edited = CASES[case]
    model = loaded(name)
    vector = torch.randn(_hidden(model)) * 4.0
    ex = FeatureExtractor(model, [stored, edited], edits={edited: fxstore.Add(vector)})
    ids = torch.randint(1, VOCAB, (2, 5))
    out = ex.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    tokens, seen = hooked_generate(model, ids, [stored, edited], {edited: lambda o: o + vector})
    assert torch.equal(out.sequences, tokens)
    for layer in (stored, edited):
        assert out.features[layer].shape == seen[layer].shape == (2, 5 + GREEDY["max_new_tokens"] - 1, _hidden(model))
        assert torch.equal(out.features[layer], seen[layer])
    _, plain = hooked_generate(model, ids, [edited], {})
    assert not torch.equal(out.features[edited], plain[edited])  # the edit did change the run


def test_generate_on_a_lora_model_follows_disable_adapter(loaded):
    model = loaded("lora-llama")
    layer = f"{lora_prefix('llama')}.1"
    ex = FeatureExtractor(model, [layer], edits={layer: fxstore.Scale(3.0)})
    ids = torch.randint(1, VOCAB, (1, 6))
    with model.disable_adapter():
        off = ex.generate(ids, **GREEDY)
        tokens, seen = hooked_generate(model, ids, [layer], {layer: lambda o: o * 3.0})
    assert torch.equal(off.sequences, tokens) and torch.equal(off.features[layer], seen[layer])
    on = ex.generate(ids, **GREEDY)
    tokens, seen = hooked_generate(model, ids, [layer], {layer: lambda o: o * 3.0})
    assert torch.equal(on.sequences, tokens) and torch.equal(on.features[layer], seen[layer])
    assert not torch.equal(on.features[layer], off.features[layer])


def test_generate_refuses_peft_prompt_learning_and_adapter_names():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids = torch.randint(1, VOCAB, (1, 4))
    ex = FeatureExtractor(model, [f"{lora_prefix('gpt2')}.1"])
    with pytest.raises(ConfigError, match=r"(?s)PrefixTuningConfig \(prompt learning\) on a PeftModel.*Hint:"):
        ex.generate(ids, **GREEDY)
    adapted = lora("gpt2").eval()
    ex = FeatureExtractor(adapted, [f"{lora_prefix('gpt2')}.1"])
    with pytest.raises(ConfigError, match=r"(?s)adapter_names= on a PeftModel.*Hint:"):
        ex.generate(ids, adapter_names=["default"], **GREEDY)


def _run_class_forward(module, *args, **kwargs):
    """Another library's instance-level wrapper: runs the module it is bound to."""
    return type(module).forward(module, *args, **kwargs)


def test_generate_refuses_a_layer_inside_another_librarys_instance_forward():
    model = gpt2()
    block = model.transformer.h[0]
    block.forward = functools.partial(_run_class_forward, block)
    ids = torch.randint(1, VOCAB, (1, 4))
    ex = FeatureExtractor(model, ["transformer.h.1"], edits={"transformer.h.0.mlp": fxstore.Scale(2.0)})
    with pytest.raises(ConfigError, match=r"(?s)'transformer.h.0.mlp' is inside 'transformer.h.0', whose "
                                          r"instance-level forward \(partial.*Hint: select 'transformer.h.0' itself"):
        ex.generate(ids, **GREEDY)
    ex = FeatureExtractor(model, ["transformer.h.1"], edits={"transformer.h.0": fxstore.Scale(2.0)})
    out = ex.generate(ids, **GREEDY)  # the wrapped module itself: read and edited through its wrapper
    tokens, seen = hooked_generate(model, ids, ["transformer.h.1"], {"transformer.h.0": lambda o: o * 2.0})
    assert torch.equal(out.sequences, tokens) and torch.equal(out.features["transformer.h.1"], seen["transformer.h.1"])


@pytest.mark.parametrize("name", ["offloaded", "torchao-int8-weight"])
def test_extract_dataset_from_a_loaded_model_equals_forward_hooks(name, loaded, tmp_path):
    """An offloaded model stays where accelerate put it; its offloaded and torchao's quantized
    weights are fingerprinted for the folder's identity."""
    np = pytest.importorskip("numpy")
    model = loaded(name)
    layers = ["model.layers.0", "model.layers.1"]
    ids = torch.randint(0, VOCAB, (3, 6))
    fxstore.extract_dataset(model, layers, torch.utils.data.TensorDataset(ids), tmp_path / "out", progress=False,
                            batch_size=2)
    stored = fxstore.load_features(tmp_path / "out")
    _, seen = hooked(model, ids, layers, {})
    for layer in layers:
        assert torch.equal(torch.from_numpy(np.asarray(stored[layer][:])), seen[layer])


@pytest.mark.parametrize("name", ["lora-llama", "offloaded", "bnb-8bit"])
def test_patch_sweep_on_a_loaded_model_equals_patching_with_forward_hooks(name, loaded):
    """LoRA (export), accelerate offload (partial: the root's hook is bound to the model, so it is
    built on the model itself) and bitsandbytes 8-bit (partial, its linears leaves)."""
    model = loaded(name)
    blocks = lora_prefix("llama") if name.startswith("lora") else "model.layers"
    layers, positions = [f"{blocks}.0", f"{blocks}.1"], [1, 4]
    assert_sweep_equals_hooks(model, layers, positions)


def test_forward_module_storage_on_a_4bit_model_equals_forward_hooks(loaded):
    model = loaded("bnb-nf4")
    layers = ["model.layers.0", "model.layers.1"]
    batches = [torch.randint(0, VOCAB, (1, 6)), torch.randint(0, VOCAB, (2, 3))]
    storage = fxstore.ForwardModuleStorage(model, layers, detach=True)
    storage(batches)
    for k, ids in enumerate(batches):
        _, seen = hooked(model, ids, layers, {})
        for layer in layers:
            assert torch.equal(storage[layer][k], seen[layer])


def test_compiled_generate_refuses_a_model_dispatched_by_accelerate(loaded):
    model = loaded("offloaded")
    ex = FeatureExtractor(model, ["model.layers.1"]).compile(backend="eager")
    with pytest.raises(ConfigError, match=r"(?s)compiled generation cannot run LlamaForCausalLM dispatched by "
                                          r"accelerate.*Hint: generate eagerly"):
        ex.generate(torch.randint(1, VOCAB, (1, 4)), **GREEDY)


@pytest.mark.compile
def test_compiled_generate_on_a_lora_model_follows_disable_adapter(loaded):
    """The compiled prompt and decode programs bake the adapter state in: a new state gets its own."""
    model = loaded("lora-llama")
    layer = f"{lora_prefix('llama')}.1"
    vector = torch.randn(_hidden(model)) * 4.0
    ex = FeatureExtractor(model, [layer], edits={layer: fxstore.Add(vector)}).compile(backend="eager")
    ids = torch.randint(1, VOCAB, (1, 5))
    results = []
    for disabled in (False, True):
        with model.disable_adapter() if disabled else contextlib.nullcontext():
            out = ex.generate(ids, **GREEDY)
            tokens, seen = hooked_generate(model, ids, [layer], {layer: lambda o: o + vector})
        assert out.compiled and torch.equal(out.sequences, tokens)
        torch.testing.assert_close(out.features[layer], seen[layer], rtol=1e-5, atol=1e-6)
        results.append(seen[layer])
    assert not torch.equal(results[0], results[1])
