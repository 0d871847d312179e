"""Sizes and repetitions: one profile per kind of run (CPU, CUDA, quick smoke run)."""

from __future__ import annotations

import dataclasses

__all__ = ["Profile", "profile_for"]


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything a run's size depends on. Batch ``b`` and resolution ``r`` per case."""

    name: str
    reps: int
    warmup: int
    compile_backend: str
    backward_compile_backend: str  # CPU: aot_eager (inductor's C++ codegen of fwd+bwd takes minutes on 2 cores)
    fresh_compile_cache: bool  # cold inductor cache for each compiled contender (honest compile times)
    isolate_memory: bool  # measure memory in a fresh process per contender
    slow_every: int  # TorchLens takes part in every n-th repetition only
    torchlens: bool  # include TorchLens (when installed)
    threads: int | None  # torch threads unless --threads says otherwise (None: torch's default)
    resnet: str
    eager_b: int
    eager_r: int
    taps_r: int
    trunc_b: int
    trunc_r: int
    vgg: str  # "" skips the VGG half of the truncation case
    vgg_b: int
    vgg_r: int
    small_resnet: str
    compile_b: int
    compile_r: int
    backward_b: int
    backward_r: int
    memory_b: int
    memory_r: int
    memory_steps: int
    trace_models: tuple[str, ...]
    vit: str
    vit_b: int
    vit_r: int
    vit_compiled: bool  # also run the compiled half of the ViT case
    copy_b: int
    copy_r: int
    cut_vit: str  # the ViT cut after block ``cut_block`` (case 10)
    cut_vit_b: int
    cut_vit_r: int
    cut_block: int
    shapes_layers: int  # the GPT-2 run over 8 shapes (case 11)
    shapes_width: int


_CPU = Profile(
    name="cpu", reps=9, warmup=2, compile_backend="inductor", backward_compile_backend="aot_eager", fresh_compile_cache=True, isolate_memory=True,
    slow_every=3, torchlens=True, threads=None,
    resnet="resnet50", eager_b=2, eager_r=128, taps_r=64, trunc_b=2, trunc_r=128,
    vgg="vgg19", vgg_b=1, vgg_r=96,
    small_resnet="resnet18", compile_b=2, compile_r=64, backward_b=4, backward_r=64,
    memory_b=4, memory_r=112, memory_steps=8,
    trace_models=("resnet50", "vit_b_16"),
    vit="vit_small", vit_b=2, vit_r=96, vit_compiled=True,
    copy_b=4, copy_r=224,
    cut_vit="vit_b_16", cut_vit_b=1, cut_vit_r=224, cut_block=2,
    shapes_layers=4, shapes_width=256,
)

_CUDA = dataclasses.replace(
    _CPU, name="cuda", reps=30, warmup=5, slow_every=10, backward_compile_backend="inductor",
    eager_b=4, eager_r=224, taps_r=64, trunc_b=4, trunc_r=224, vgg_b=4, vgg_r=224,
    compile_b=8, compile_r=112, backward_b=16, backward_r=224,
    memory_b=16, memory_r=224, memory_steps=8,
    vit="vit_b_16", vit_b=8, vit_r=224,
    copy_b=32, copy_r=224,
    cut_vit_b=8,
)

_QUICK = Profile(
    name="quick", reps=1, warmup=0, compile_backend="eager", backward_compile_backend="eager", fresh_compile_cache=False, isolate_memory=False,
    slow_every=1, torchlens=False, threads=1,
    resnet="resnet_tiny", eager_b=1, eager_r=32, taps_r=32, trunc_b=1, trunc_r=32,
    vgg="", vgg_b=1, vgg_r=32,
    small_resnet="resnet_tiny", compile_b=1, compile_r=32, backward_b=1, backward_r=32,
    memory_b=1, memory_r=32, memory_steps=2,
    trace_models=("resnet_tiny", "vit_tiny"),
    vit="vit_tiny", vit_b=1, vit_r=32, vit_compiled=False,
    copy_b=1, copy_r=32,
    cut_vit="vit_small", cut_vit_b=1, cut_vit_r=32, cut_block=2,
    shapes_layers=2, shapes_width=32,
)


def profile_for(device: str, quick: bool) -> Profile:
    """The profile of a run on ``device`` (``"cpu"`` or ``"cuda"``); ``quick``: the tiny smoke run."""
    if quick:
        return _QUICK
    return _CUDA if device == "cuda" else _CPU
