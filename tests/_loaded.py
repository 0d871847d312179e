"""Models as users load them, for the loaded-model tests, and their forward-hook references.

Each builder makes a tiny random model the way the ecosystem loads it (accelerate offload, nnsight,
PEFT LoRA, torchao, bitsandbytes). Nothing here uses fxstore: the references are forward hooks on
the same model object, and ``model.generate`` with those hooks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

VOCAB, HIDDEN = 64, 32
OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
GREEDY = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


def llama(hidden: int = HIDDEN) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def offloaded_llama() -> transformers.LlamaForCausalLM:
    """A Llama saved and loaded back with layer 0 offloaded to "cpu" and layer 1 to "disk"."""
    folder, offload = tempfile.mkdtemp(), tempfile.mkdtemp()
    llama().save_pretrained(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, device_map=OFFLOAD_MAP, offload_folder=offload)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    return model.eval()


def nnsight_traced(model: nn.Module, first_block: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``model`` after ``nnsight.NNsight(model)`` ran a trace (nnsight leaves its forward on every module)."""
    nnsight = pytest.importorskip("nnsight")
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(torch.randint(0, VOCAB, (1, 5))):
        first_block(wrapped).output.save()
    return model


def lora(kind: str) -> nn.Module:
    """``peft.get_peft_model`` with LoRA (non-zero adapter weights) on a GPT-2 or a Llama."""
    peft = pytest.importorskip("peft")
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    base = gpt2() if kind == "gpt2" else llama()
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


def lora_prefix(kind: str) -> str:
    """Where a PEFT model's blocks are, as ``named_modules()`` names them."""
    return "base_model.model.transformer.h" if kind == "gpt2" else "base_model.model.model.layers"


def quantization(kind: str) -> object:
    if kind.startswith("torchao"):
        torchao = pytest.importorskip("torchao")
        config = (torchao.quantization.Int8WeightOnlyConfig() if kind == "torchao-int8-weight"
                  else torchao.quantization.Int8DynamicActivationInt8WeightConfig())
        return transformers.TorchAoConfig(config)
    pytest.importorskip("bitsandbytes")
    if kind == "bnb-8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def quantized(kind: str, folder: str) -> transformers.LlamaForCausalLM:
    """The Llama saved in ``folder``, loaded quantized on the CPU."""
    return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization(kind),
                                                         device_map="cpu").eval()


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _edited(output: object, edit: Callable[[torch.Tensor], torch.Tensor]) -> object:
    if isinstance(output, tuple):
        return (edit(output[0]), *output[1:])
    return edit(output)


def _hooks(model: nn.Module, record: list[str], edits: dict, seen: dict, keep: Callable) -> list:
    """Forward hooks that apply ``edits`` ({path: fn of the first tensor}) and ``keep`` each module's output."""
    handles = []
    for path in sorted(set(record) | set(edits)):
        def hook(module, args, output, path=path):
            if path in edits:
                output = _edited(output, edits[path])
            keep(seen, path, _first(output))
            return output
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return handles


def hooked(model: nn.Module, ids: torch.Tensor, record: list[str], edits: dict,
           grad: bool = False) -> tuple[torch.Tensor, dict]:
    """The model's logits and module outputs with ``edits`` ({path: fn}) applied by forward hooks.

    ``grad=True`` keeps the autograd graph (the outputs are the live tensors, for ``torch.autograd.grad``).
    """
    seen: dict = {}
    handles = _hooks(model, record, edits, seen,
                     lambda s, p, o: s.__setitem__(p, o if grad else o.detach().clone()))
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def hooked_generate(model: nn.Module, ids: torch.Tensor, record: list[str], edits: dict,
                    **kwargs: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``model.generate``'s tokens with ``edits`` applied by forward hooks, and each recorded module's
    outputs over every forward (prompt, then each step) concatenated along the token dimension."""
    seen: dict = {}
    handles = _hooks(model, record, edits, seen,
                     lambda s, p, o: s.setdefault(p, []).append(o.detach().clone()))
    try:
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), **{**GREEDY, **kwargs})
    finally:
        for handle in handles:
            handle.remove()
    return tokens, {path: torch.cat(outputs, 1) for path, outputs in seen.items()}


def assert_sweep_equals_hooks(model: nn.Module, layers: list[str], positions: list[int]) -> None:
    """``fxstore.patch_sweep`` of a clean into a corrupted prompt equals patching each (layer, position)
    with forward hooks on the same model (the metric: a logit difference at the last position)."""
    import fxstore

    clean, corrupted = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 5))

    def metric(out):
        return out.logits[:, -1, 3] - out.logits[:, -1, 7]

    grid = fxstore.patch_sweep(model, ((clean,), {"use_cache": False}), ((corrupted,), {"use_cache": False}),
                               layers, metric, positions=positions)
    _, seen = hooked(model, clean, layers, {})
    for i, layer in enumerate(layers):
        for j, p in enumerate(positions):
            def patch(output, p=p, layer=layer):
                output = output.clone()
                output[:, p] = seen[layer][:, p]
                return output
            logits, _ = hooked(model, corrupted, [], {layer: patch})
            torch.testing.assert_close(grid[i, j], (logits[:, -1, 3] - logits[:, -1, 7])[0], rtol=1e-5, atol=1e-6)
