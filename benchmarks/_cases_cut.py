"""Case 10: a ViT cut after an early encoder block, through the blocks' input assertions.

Every torchvision ``EncoderBlock`` asserts on its input. fxstore drops the assertions that
only guard values past the cut, so the cut graph runs the first blocks only; torchvision's
``create_feature_extractor`` keeps them (``eliminate_dead_code`` keeps every side effect)
and with them the whole encoder. The floor is a hand-written prefix of the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import _contenders as C
from ._config import Profile
from ._measure import attempt, compare
from ._models import build
from ._report import Row
from ._timing import Contender
from ._verify import forward_reference

__all__ = ["vit_cut", "VitPrefix"]


class VitPrefix(nn.Module):
    """A torchvision ViT up to encoder block ``last``: the least work the cut can do."""

    def __init__(self, vit: nn.Module, last: int) -> None:
        super().__init__()
        self.vit = vit
        self.blocks = vit.encoder.layers[: last + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit, encoder = self.vit, self.vit.encoder
        x = vit._process_input(x)
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks(encoder.dropout(x + encoder.pos_embedding))


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def vit_cut(profile: Profile, device: torch.device) -> list[Row]:
    """Case 10: ``vit_b_16`` (CPU/CUDA) cut after block 2, against the full model and torchvision."""
    model = build(profile.cut_vit, image_size=profile.cut_vit_r).to(device)
    last = profile.cut_block
    layer = f"encoder.layers.encoder_layer_{last}"
    x = torch.rand(profile.cut_vit_b, 3, profile.cut_vit_r, profile.cut_vit_r,
                   generator=torch.Generator().manual_seed(1)).to(device)
    prefix = VitPrefix(model, last)
    share = _flops(prefix, x) / _flops(model, x)
    case = (f"10 cut through asserts · {profile.cut_vit} b{profile.cut_vit_b} {profile.cut_vit_r}² · "
            f"only {layer} (FLOP share {share:.2f})")
    entries = [
        C.plain(model, x, name="plain model (full forward)"),
        C.plain(prefix, x, name=f"plain prefix up to block {last} (the floor)"),
        attempt("fxstore keep_output=False", lambda: C.extractor(model, [layer], x, keep_output=False,
                                                                   name="fxstore keep_output=False")),
        attempt("torchvision create_feature_extractor",
                lambda: C.torchvision_extractor(model, [layer], x, keep_output=False)),
    ]
    only = {e.name: [layer] for e in entries if isinstance(e, Contender)}
    return compare(case, entries, forward_reference(model, [layer], x), profile, device, keys=only)
