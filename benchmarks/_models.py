"""The models the cases run: torchvision architectures with random (seeded) weights."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

__all__ = ["build", "vit_blocks", "STAGES"]

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
