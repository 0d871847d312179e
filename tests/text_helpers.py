"""Tiny random language models saved with save_pretrained, with tokenizers trained offline on the test corpus.

* GPT-2: byte-free WordLevel tokenizer, no pad token, right padding, adds nothing.
* Llama: adds BOS (``<s> $A``), left padding, no pad token.
* BERT: ``[CLS] $A [SEP]``, a pad token, right padding (an encoder with an attention mask).

Importable by subprocesses (``python tests/text_helpers.py OUT DELAY`` runs the extraction the
kill-and-resume test interrupts).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

WORDS = ("the cat sat on a mat while dogs ran far away and birds sang softly in tall green trees near old "
         "stone walls").split()


def corpus(n: int = 24, seed: int = 0) -> list[str]:
    """``n`` documents of 1 to 12 words (at most 14 tokens: one padded shape), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(1, 13, (), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
    return docs


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    specials = {"gpt2": ["[UNK]", "<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"],
                "bert": ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]}[kind]
    tok = Tokenizer(models.WordLevel(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>")
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       padding_side="left")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _model(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=3, n_head=2, n_positions=64,
                                         bos_token_id=1, eos_token_id=1)
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=None)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, pad_token_id=1)
    return transformers.BertModel(config)


BLOCKS = {"gpt2": "transformer.h.{}", "llama": "model.layers.{}", "bert": "encoder.layer.{}"}
"""Module path of block ``i`` (its output is ``hidden_states[i + 1]`` for every block but the last)."""


def save(kind: str, folder: Path, with_tokenizer: bool = True) -> Path:
    """Save a tiny random ``kind`` model (and its tokenizer) into ``folder``."""
    tok = _tokenizer(kind)
    _model(kind, len(tok)).eval().save_pretrained(folder)
    if with_tokenizer:
        tok.save_pretrained(folder)
    return folder


def run_extraction(folder: str, out: str, delay: float = 0.0, shuffle: int | None = None) -> dict:
    """The CLI-equivalent extraction the kill-and-resume test interrupts and repeats."""
    from fxstore.cli.hf import load_hf
    from fxstore.dataset import extract_dataset
    from fxstore.dataset.formats import safetensors as _sinks

    if delay:
        finish = _sinks.SafetensorsSink.finish

        def slow_finish(self, *args, **kwargs):
            finish(self, *args, **kwargs)
            time.sleep(delay)

        _sinks.SafetensorsSink.finish = slow_finish
    model, tok = load_hf(folder)
    return extract_dataset(model, ["transformer.h.0", "transformer.h.1"], corpus(40), out, tokenizer=tok,
                           batch_size=4, shard_size=40, shuffle=shuffle, progress=False)


if __name__ == "__main__":
    import sys

    run_extraction(sys.argv[1], sys.argv[2], float(sys.argv[3]), None if sys.argv[4] == "-" else int(sys.argv[4]))
