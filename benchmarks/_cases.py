"""The registry of cases: name -> function(profile, device) -> rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _cases_backward, _cases_compile, _cases_cuda, _cases_deploy, _cases_forward, _cases_trace, _memory
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
    "deploy": _cases_deploy.deployed,
}
