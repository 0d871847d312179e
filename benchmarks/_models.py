"""The models the cases run: torchvision architectures and GPT-2s with random (seeded) weights.

Also the reference every patching grid of the language-model benchmarks is checked against: a
forward-hook loop over the cells (:func:`hook_patch_grid`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

__all__ = ["build", "gpt2", "hook_patch_grid", "vit_blocks", "STAGES"]

STAGES = ("layer1", "layer2", "layer3", "layer4")
"""The four stage outputs of a torchvision ResNet."""

# Small ViTs for CPU and smoke runs; ``vit_b_16`` is the real one. (layers, heads, hidden, mlp, patch)
_VITS = {
    "vit_small": (6, 6, 384, 1536, 16),
    "vit_tiny": (2, 2, 32, 64, 8),
}


def build(name: str, image_size: int = 224, seed: int = 0) -> nn.Module:
    """A model in eval mode with weights drawn from ``seed``.

    Args:
        name: A torchvision model name, ``"resnet_tiny"`` (a ResNet with one BasicBlock
            per stage), or ``"vit_small"`` / ``"vit_tiny"``.
        image_size: Input resolution (ViTs are built for it).
        seed: Seed of the random weights.
    """
    torch.manual_seed(seed)
    if name == "resnet_tiny":
        model: nn.Module = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    elif name in _VITS:
        layers, heads, hidden, mlp, patch = _VITS[name]
        model = VisionTransformer(image_size, patch, layers, heads, hidden, mlp, num_classes=10)
    elif name.startswith("vit_"):
        model = torchvision.models.get_model(name, image_size=image_size)
    else:
        model = torchvision.models.get_model(name)
    return model.eval()


def vit_blocks(model: nn.Module) -> list[str]:
    """Module names of a torchvision ViT's encoder blocks."""
    return [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]


def gpt2(layers: int, width: int, heads: int, positions: int = 128, seed: int = 0) -> nn.Module:
    """A random ``GPT2LMHeadModel`` (``layers`` blocks of ``width``, GPT-2's vocabulary) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=positions)
    return transformers.GPT2LMHeadModel(config).eval()


def hook_patch_grid(model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, sites: Sequence[str],
                    positions: Sequence[int], metric: Callable[[Any], torch.Tensor], **forward_kwargs: Any) -> torch.Tensor:
    """The activation-patching grid by forward hooks: one forward of ``corrupted`` per (site, position) cell.

    Each cell copies the clean run's output of one site at one position into the corrupted run
    (a tuple output's first element) and reads ``metric(output)[0]``.
    """
    saved: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: saved.__setitem__(n, (o[0] if isinstance(o, tuple) else o).clone())) for n in sites]
    try:
        with torch.no_grad():
            model(clean, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    grid = torch.empty(len(sites), len(positions))
    for i, name in enumerate(sites):
        for j, p in enumerate(positions):
            def patch(m: Any, inp: Any, o: Any, name: str = name, p: int = p) -> Any:
                value = (o[0] if isinstance(o, tuple) else o).clone()
                value[:, p] = saved[name][:, p]
                return (value, *o[1:]) if isinstance(o, tuple) else value
            handle = model.get_submodule(name).register_forward_hook(patch)
            try:
                with torch.no_grad():
                    grid[i, j] = metric(model(corrupted, **forward_kwargs))[0]
            finally:
                handle.remove()
    return grid
