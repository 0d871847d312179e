"""The benchmark entry point still runs: ``python -m benchmarks --quick`` on tiny models.

No timing is asserted (benchmarks are not tests); only that every case produced rows and
that fxstore's captures were verified against the independent references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.xdist_group("benchmarks_smoke")
def test_quick_benchmark_run_prints_a_verified_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| Case | Contender | Median | × plain |" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"].split(" ", 1)[0] for r in rows}
    assert cases == {str(n) for n in range(1, 11)}
    fxstore_rows = [r for r in rows if r["contender"].startswith("fxstore") and "hook backend" not in r["contender"]]
    assert fxstore_rows
    failed = [(r["case"], r["contender"], r["verified"]) for r in fxstore_rows if r["verified"].startswith("FAILED")]
    assert not failed
