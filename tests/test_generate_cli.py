"""``fxstore generate hf:DIR``: the printed texts and the written features against Hugging Face's own
``model.generate`` (steered and recorded by forward hooks) and ``tokenizer.batch_decode``.

Tiny random GPT-2 and Llama folders written with ``save_pretrained``, their tokenizers trained offline
(``text_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_generate import _hooked_generate
from text_helpers import corpus, save

from fxstore.cli import main
from fxstore.cli.hf import load_hf

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {kind: save(kind, tmp_path_factory.mktemp(kind)) for kind in BLOCKS}


def _reference(folder: Path, prompts: list[str], add: torch.Tensor | None = None, **kwargs):
    """(texts, sequences, block 1 at every position) from hooked ``model.generate`` on the same folder."""
    model, tok = load_hf(folder)
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    blocks = BLOCKS["gpt2" if hasattr(model, "transformer") else "llama"]
    sequences, record = _hooked_generate(model, blocks, batch["input_ids"], batch["attention_mask"], add=add,
                                         pad_token_id=tok.pad_token_id, **kwargs)
    return tok.batch_decode(sequences, skip_special_tokens=True), sequences, record


def _run(capsys, *argv: str) -> tuple[list[str], str]:
    status = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out.splitlines(), captured.err


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_steered_texts_and_features_equal_hooked_generate(kind, folders, tmp_path, capsys):
    blocks = BLOCKS[kind]
    vector = torch.randn(16, generator=torch.Generator().manual_seed(1))
    torch.save({f"{blocks}.0": vector, "other": torch.zeros(16)}, tmp_path / "vecs.pt")
    prompts = corpus(3, seed=4)  # different lengths: a left-padded batch
    texts, err = _run(capsys, f"hf:{folders[kind]}", "--prompt", prompts[0], "--prompt", prompts[1], "--prompt",
                      prompts[2], "--max-new-tokens", 6, "--add", f"{blocks}.0={tmp_path / 'vecs.pt'}:3.5",
                      "--layers", f"{blocks}.1", "--out", tmp_path / "f.safetensors")
    expected, sequences, record = _reference(folders[kind], prompts, add=3.5 * vector, max_new_tokens=6)
    assert texts == expected
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("sequences"), sequences)
        torch.testing.assert_close(f.get_tensor(f"{blocks}.1"), record, rtol=0, atol=1e-5)
        assert f.metadata()["prompt_length"] == str(sequences.shape[1] - 6)
    assert "wrote" in err
    plain, _, _ = _reference(folders[kind], prompts, max_new_tokens=6)
    assert texts != plain  # the vector steered the answer


def test_prompts_file_and_seeded_sampling_equal_model_generate(folders, tmp_path, capsys):
    prompts = corpus(4, seed=7)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    texts, err = _run(capsys, f"hf:{folders['gpt2']}", "--prompts-file", tmp_path / "prompts.txt", "--max-new-tokens",
                      5, "--do-sample", "--top-k", 5, "--temperature", 1.5, "--seed", 11, "--quiet")
    torch.manual_seed(11)
    expected, _, _ = _reference(folders["gpt2"], prompts, max_new_tokens=5, do_sample=True, top_k=5, temperature=1.5)
    assert texts == expected and err == ""


def test_prompts_run_in_batches_of_batch_size(folders, capsys):
    prompts = corpus(5, seed=9)
    texts, _ = _run(capsys, f"hf:{folders['llama']}", *[a for p in prompts for a in ("--prompt", p)],
                    "--max-new-tokens", 4, "--batch-size", 2)
    expected = [t for i in range(0, 5, 2) for t in _reference(folders["llama"], prompts[i:i + 2], max_new_tokens=4)[0]]
    assert texts == expected


@pytest.mark.compile
def test_compiled_generation_prints_the_hooked_texts(folders, tmp_path, capsys):
    torch.save(torch.ones(16), tmp_path / "v.pt")
    prompts = corpus(2, seed=2)
    texts, _ = _run(capsys, f"hf:{folders['gpt2']}", "--prompt", prompts[0], "--prompt", prompts[1],
                    "--max-new-tokens", 4, "--add", f"transformer.h.0={tmp_path / 'v.pt'}:-2", "--positions",
                    "generated", "--compile", "aot_eager")
    model, tok = load_hf(folders["gpt2"])
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    generated = list(range(batch["input_ids"].shape[1], batch["input_ids"].shape[1] + 4))
    sequences, _ = _hooked_generate(model, "transformer.h", batch["input_ids"], batch["attention_mask"],
                                    add=-2 * torch.ones(16), positions=generated, pad_token_id=tok.pad_token_id,
                                    max_new_tokens=4)
    assert texts == tok.batch_decode(sequences, skip_special_tokens=True)


@pytest.mark.parametrize(("extra", "message"), [
    (["--add", "transformer.h.0"], "is not LAYER=VEC"),
    (["--add", "transformer.h.0=missing.pt"], "no such file"),
    (["--add", "transformer.h.0={dir}/vecs.pt"], "not 'transformer.h.0'"),
    (["--add", "transformer.h.0={dir}/bad.pt:2"], "holds no floating-point vector"),
    (["--add", "transformer.h.9={dir}/one.pt"], "names no module"),
    (["--layers", "transformer.h.1"], "--layers given without --out"),
    (["--layers", "transformer.h.1", "--out", "{dir}/f.npy"], "not a .safetensors file"),
    (["--prompt", "dogs ran", "--batch-size", "1", "--out", "{dir}/f.safetensors"], "exceed --batch-size 1"),
    (["--add", "transformer.h.0={dir}/narrow.pt"], "error: edit Add on 'transformer.h.0': vector of shape (8,)"),
    (["--add", "transformer.h.0={dir}/narrow.pt", "--compile", "aot_eager"], "error: edit Add on 'transformer.h.0'"),
])
def test_bad_arguments_exit_1_naming_the_input_with_a_hint(extra, message, folders, tmp_path, capsys):
    torch.save({"a": torch.zeros(16), "b": torch.zeros(16)}, tmp_path / "vecs.pt")
    torch.save(torch.arange(16), tmp_path / "bad.pt")
    torch.save(torch.zeros(16), tmp_path / "one.pt")
    torch.save(torch.zeros(8), tmp_path / "narrow.pt")  # the model is 16 wide
    argv = ["generate", f"hf:{folders['gpt2']}", "--prompt", "the cat", "--max-new-tokens", "2",
            *(a.format(dir=tmp_path) for a in extra)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Hint:" in err and err.startswith("fxstore generate: error:")


def test_no_prompt_and_a_model_that_is_no_folder_are_refused(folders, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["generate", f"hf:{folders['gpt2']}", "--prompts-file", str(tmp_path / "empty.txt")]) == 1
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", "resnet18", "--prompt", "the cat"]) == 1
    assert "not a Hugging Face folder" in capsys.readouterr().err
