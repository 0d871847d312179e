"""Every measured figure in README.md comes from a recorded run in ``benchmarks/results/``.

The benchmark table is generated (``python -m benchmarks.readme_table FILE``) and must equal
what its source file renders to; figures quoted in the prose must equal the recorded file
named next to them. Every recorded file says when, on which commit and machine, and with
which command it was made.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks package lives at the root

from benchmarks import readme_table  # noqa: E402

README = (ROOT / "README.md").read_text()


def _recorded(path: str) -> dict:
    payload = json.loads((ROOT / path).read_text())
    machine = payload["machine"]
    for key in ("date", "commit", "cpu", "cores", "torch", "command"):
        assert machine.get(key), f"{path} does not record the {key}"
    assert re.fullmatch(r"[0-9a-f]{40}", machine["commit"]), f"{path}: not a clean commit ({machine['commit']})"
    return payload


def test_the_benchmark_table_is_generated_from_its_recorded_run():
    source = readme_table.source_of(README)
    payload = _recorded(str(source.relative_to(ROOT)))
    assert payload["rows"], "the recorded run has no rows"
    assert readme_table.main(["--check"]) == 0, "README.md's table was edited by hand or its file changed"


def test_readme_table_check_notices_a_hand_edited_figure(tmp_path):
    edited = README.replace(" | exact |", " | exact! |", 1)
    assert edited != README
    (tmp_path / "README.md").write_text(edited)
    assert readme_table.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1


def test_graph_break_figures_equal_their_recorded_run():
    found = re.search(r"gives (\d+) graphs, (\d+) breaks \(`aot_eager`\).*?recorded in\s+`([^`]+)`", README, re.S)
    assert found, "the graph-break figures name no recorded file"
    result = _recorded(found[3])["result"]
    assert (result["graphs"], result["graph_breaks"], result["backend"]) == (int(found[1]), int(found[2]),
                                                                            "aot_eager")
    assert result["compiled_equals_eager"]


def test_dataset_throughput_figures_equal_their_recorded_run():
    found = re.search(r"(\d+) vs (\d+) samples/s.*?recorded in\s+`([^`]+)`", README, re.S)
    if found is None:
        pytest.fail("the dataset throughput figures name no recorded file")
    medians = _recorded(found[3])["result"]["median_samples_per_s"]
    assert (int(found[1]), int(found[2])) == (round(medians["off"]), round(medians["on"]))


@pytest.mark.parametrize("typed", ["+0.66 ms", "1.018×", "1.066×", "93 vs 78", "20 graphs, 19 breaks"])
def test_figures_no_script_produces_are_gone(typed):
    assert typed not in README
