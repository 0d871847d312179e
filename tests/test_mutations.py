"""The suite can go red: each bug class is planted on purpose and the tests that guard it must fail.

Each test runs a few guarding tests in a fresh ``pytest`` process with a plugin that breaks
fxstore at import time (a mutant), and checks that every one of them fails.

- an in-place overwrite: alias analysis says no later in-place op writes into a stored value,
  so no clone is inserted and the stored value is the rectified one;
- a wrong gradient: the gradient tap deposits ``1.001 * grad`` instead of ``grad``, so every
  tapped gradient is 0.1 % too large;
- a silent frontend fallback: the fx frontend always fails, so ``frontend="auto"`` quietly
  captures traceable models with another frontend.

If a mutant's target moved (the capture code was restructured), the plugin fails to import
and these tests fail with that error: point the mutant at the new place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

MUTANTS = {
    "inplace_overwrite": """
        from fxstore.capture import _alias
        assert hasattr(_alias.AliasAnalysis, "overwritten_later")
        _alias.AliasAnalysis.overwritten_later = lambda self, node: False
    """,
    "wrong_gradient": """
        from fxstore.capture import _taps
        store = _taps._store
        _taps._store = lambda number, grad: store(number, 1.001 * grad)
    """,
    "silent_fallback": """
        from fxstore.capture import _frontends
        from fxstore.errors import TraceError
        assert hasattr(_frontends, "build_fx")

        def broken(request, training, strict):
            raise TraceError("mutant: the fx frontend is broken")

        _frontends.build_fx = broken
    """,
}

GUARDS = {
    "inplace_overwrite": [
        "tests/test_extractor.py::test_value_before_an_inplace_relu_is_kept",
        "tests/test_extractor.py::test_functional_inplace_ops_are_detected",
        "tests/test_export.py::test_aten_in_place_ops_do_not_change_stored_values",
    ],
    "wrong_gradient": [
        "tests/test_seeds.py::test_backward_storage_fills_during_a_training_step",
        "tests/test_seeds.py::test_full_backward_hooks_fail_where_the_fx_storage_works",
        "tests/test_export.py::test_gradients_equal_autograd_on_hooked_outputs[gpt2]",
    ],
    "silent_fallback": [
        "tests/test_extractor.py::test_leaf_modules_make_it_traceable",
        "tests/test_timm.py::test_timm_model_uses_fx_and_matches_hooks[convnext_atto]",
    ],
}


def run_with_mutant(tmp_path: Path, mutant: str, tests: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "fxstore_mutant.py").write_text(textwrap.dedent(MUTANTS[mutant]))
    path = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fxstore_mutant", "-n", "0", "-q", "-rf", "-p", "no:cacheprovider",
         "--no-header", *tests],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_planted_bug_turns_the_guarding_tests_red(tmp_path, mutant):
    done = run_with_mutant(tmp_path, mutant, GUARDS[mutant])
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 1, report  # 1: tests ran and some failed (not a usage or import error)
    failed = {line.split(" - ", 1)[0][len("FAILED "):] for line in done.stdout.splitlines()
              if line.startswith("FAILED ")}
    for test in GUARDS[mutant]:
        assert test in failed, f"{test} did not fail under the mutant:\n{report}"
    assert f"{len(GUARDS[mutant])} failed" in done.stdout, report
