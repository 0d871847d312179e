"""What :func:`fxstore.generation.generate` returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["Generation"]


@dataclasses.dataclass
class Generation:
    """The result of ``FeatureExtractor.generate``: the tokens and every stored layer at every position.

    Attributes:
        sequences: ``[batch, prompt_len + new_tokens]`` token ids, as ``model.generate`` returns them
            (prompt included, rows that stopped early padded with ``pad_token_id``).
        features: Stored layer key -> its value at every position the model ran on, in position
            order: ``[batch, prompt_len + new_tokens - 1, ...]`` (the last generated token is never fed
            back). Column ``c`` is the ``c``-th column of ``sequences``: with left padding a row's
            first real token is at column ``pad`` (its padding columns hold what the model computed there).
        prompt_length: Columns of the (padded) prompt.
        compiled: Whether the prompt and decode steps ran compiled programs (static KV cache).
        output: What Hugging Face's ``generate`` returned (a ``GenerateDecoderOnlyOutput`` with scores
            or logits when asked for with ``return_dict_in_generate=True``, else the sequences).

    Example:
        >>> import torch, transformers, fxstore
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> ex = fxstore.FeatureExtractor(model, ["transformer.h.1"])
        >>> out = ex.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        >>> tuple(out.sequences.shape), tuple(out.features["transformer.h.1"].shape)
        ((1, 7), (1, 6, 32))
    """

    sequences: torch.Tensor
    features: dict[str, torch.Tensor]
    prompt_length: int
    compiled: bool
    output: Any = None

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated tokens only: ``sequences[:, prompt_length:]``."""
        return self.sequences[:, self.prompt_length:]
