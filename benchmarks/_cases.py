"""The registry of cases: name -> function(profile, device) -> rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import (
    _cases_backward,
    _cases_capture,
    _cases_compile,
    _cases_cuda,
    _cases_cut,
    _cases_deploy,
    _cases_forward,
    _cases_reinplace,
    _cases_shapes,
    _cases_trace,
    _memory,
)
from ._config import Profile
from ._report import Row

__all__ = ["CASES"]

Case = Callable[[Profile, torch.device], list[Row]]

CASES: dict[str, Case] = {
    "eager": _cases_forward.stage_outputs,
    "taps": _cases_forward.many_taps,
    "truncated": _cases_forward.truncated,
    "compile": _cases_compile.compiled_resnet,
    "backward": _cases_backward.backward,
    "memory": _memory.memory,
    "trace": _cases_trace.trace_time,
    "vit": _cases_compile.vit,
    "cuda_copy": _cases_cuda.copy_to_cpu,
    "vit_cut": _cases_cut.vit_cut,
    "shapes": _cases_shapes.gpt2_shapes,
    "many": _cases_capture.many_compiled,
    "grads_shapes": _cases_capture.grads_over_shapes,
    "verify": _cases_capture.verify_cost,
    "deploy": _cases_deploy.deployed,
    "reinplace": _cases_reinplace.reinplace,
}
