"""Every measured figure in the README and the docs comes from a recorded run in ``benchmarks/results/``.

The full benchmark table (``docs/benchmarks.md``) and the README's headline rows are generated
(``python -m benchmarks.readme_table FILE``) and must equal what their source file renders to;
figures quoted in the prose must equal the recorded file named next to them. Every recorded file
says when, on which commit and machine, and with which command it was made. Each figure is read
from the page it lives on (``PAGES``).
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
PAGES = {name: (ROOT / "docs" / f"{name}.md").read_text() for name in ("benchmarks", "capture", "datasets")}
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
EVERY_PAGE = {"README.md": README, "CHANGELOG.md": CHANGELOG,
              **{f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}}


def _recorded(path: str) -> dict:
    payload = json.loads((ROOT / path).read_text())
    machine = payload["machine"]
    for key in ("date", "commit", "cpu", "cores", "torch", "command"):
        assert machine.get(key), f"{path} does not record the {key}"
    assert re.fullmatch(r"[0-9a-f]{40}", machine["commit"]), f"{path}: not a clean commit ({machine['commit']})"
    return payload


def test_the_benchmark_table_is_generated_from_its_recorded_run():
    source = readme_table.source_of(PAGES["benchmarks"])
    payload = _recorded(str(source.relative_to(ROOT)))
    assert payload["rows"], "the recorded run has no rows"
    assert readme_table.main(["--check"]) == 0, \
        "docs/benchmarks.md's table or README.md's headline rows were edited by hand, or their file changed"


@pytest.mark.parametrize("page", ["docs/benchmarks.md", "README.md"])
def test_readme_table_check_notices_a_hand_edited_figure(tmp_path, page):
    text = (ROOT / page).read_text()
    edited = text.replace(" | exact |", " | exact! |", 1)
    assert edited != text
    paths = {"docs/benchmarks.md": ROOT / "docs" / "benchmarks.md", "README.md": ROOT / "README.md"}
    paths[page] = tmp_path / Path(page).name
    paths[page].write_text(edited)
    assert readme_table.main(["--check", "--page", str(paths["docs/benchmarks.md"]),
                              "--readme", str(paths["README.md"])]) == 1


def test_the_readme_headline_rows_are_rows_of_the_full_table():
    headline = README[README.index(readme_table.HEADLINE_BEGIN):README.index(readme_table.HEADLINE_END)]
    table = PAGES["benchmarks"][PAGES["benchmarks"].index(readme_table.BEGIN):]
    rows = [found for found in re.findall(r"^\|[^|\n]*\| (.+)$", headline, re.M) if not found.startswith("Contender")]
    assert len(rows) == len(readme_table.HEADLINE)
    for row in rows:
        assert f"| {row}" in table, row
    assert str(readme_table.source_of(PAGES["benchmarks"]).relative_to(ROOT)) in headline


def test_graph_break_figures_equal_their_recorded_run():
    found = re.search(r"gives (\d+) graphs, (\d+) breaks \(`aot_eager`\).*?recorded in\s+`([^`]+)`", PAGES["capture"],
                      re.S)
    assert found, "the graph-break figures name no recorded file"
    result = _recorded(found[3])["result"]
    assert (result["graphs"], result["graph_breaks"], result["backend"]) == (int(found[1]), int(found[2]),
                                                                            "aot_eager")
    assert result["compiled_equals_eager"]


def test_dataset_throughput_figures_equal_their_recorded_run():
    found = re.search(r"(\d+) vs (\d+) samples/s.*?recorded in\s+`([^`]+)`", PAGES["datasets"], re.S)
    if found is None:
        pytest.fail("the dataset throughput figures name no recorded file")
    medians = _recorded(found[3])["result"]["median_samples_per_s"]
    assert (int(found[1]), int(found[2])) == (round(medians["off"]), round(medians["on"]))


_GRADS_RERUN = [  # (words before the figure, case prefix, contender) of the gradient-tap rerun paragraph
    (r"eager gradient taps on resnet18", "5 backward eager", "fxstore grads="),
    (r"tensor hooks", "5 backward eager", "tensor hooks (out.register_hook)"),
    (r"compiled taps \(aot_eager\)", "5 backward torch.compile", "fxstore grads="),
    (r"on resnet50 with the re-inplacing pass", "16 re-inplacing · resnet50 b2 128² · eager", "fxstore grads=, pass on"),
    (r"53 stored `Conv2d` outputs", "16 re-inplacing · resnet50 b2 128² · 53", "fxstore, pass on"),
    (r"4 stages", "16 re-inplacing · resnet50 b2 128² · 4 stages", "fxstore, pass on"),
    (r"ViT", "16 re-inplacing · vit", "fxstore, pass on"),
]


def test_gradient_tap_rerun_ratios_equal_their_recorded_run():
    _, payload = _quoted_paragraph("**Gradient taps and re-inplacing, measured again with 40 repetitions**",
                                   _GRADS_RERUN)
    assert "--reps 40" in payload["machine"]["command"]


@pytest.mark.parametrize("typed", ["+0.66 ms", "1.018×", "1.066×", "93 vs 78", "20 graphs, 19 breaks"])
def test_figures_no_script_produces_are_gone(typed):
    assert [name for name, text in EVERY_PAGE.items() if typed in text] == []


def test_coverage_summary_equals_the_recorded_coverage_table():
    """The coverage summary on docs/capture.md is the summary of ``make coverage``'s output, docs/coverage.md."""
    def summary(text: str) -> list[str]:
        start = text.index("| group | verified | frontends |")
        return text[start:].split("\n\n", 1)[0].strip().splitlines()

    recorded = (ROOT / "docs" / "coverage.md").read_text()
    # the recorded table predates the tool's move out of the package (fxstore.coverage -> tools.coverage)
    assert "Generated by `python -m tools.coverage` on " in recorded or \
        "Generated by `python -m fxstore.coverage` on " in recorded
    assert summary(PAGES["capture"]) == summary(recorded)


def test_the_coverage_count_quoted_in_the_prose_is_the_recorded_one():
    recorded = (ROOT / "docs" / "coverage.md").read_text()
    rows = re.findall(r"^\| [a-z_]+ \| (\d+) / (\d+) \|", recorded, re.M)
    verified, total = (sum(int(r[i]) for r in rows) for i in (0, 1))
    assert f"{total} models" in recorded
    for name in ("docs/capture.md", "CHANGELOG.md"):
        quoted = re.findall(r"verifies (\d+) / (\d+) models", EVERY_PAGE[name])
        assert quoted == [(str(verified), str(total))], (name, quoted, verified, total)


_RERUN = [  # (words before the figure on docs/benchmarks.md, case prefix, contender) of the rerun paragraph
    (r"fxstore compiled \(inductor\)", "4 torch.compile", "fxstore, compiled fullgraph=True"),
    (r"torchvision's compiled extractor at", "4 torch.compile", "torchvision extractor, compiled"),
    (r"hooks registered before compile at", "4 torch.compile", "hooks registered before compile"),
    (r"eager gradient taps", "5 backward eager", "fxstore grads="),
    (r"gradient taps \(aot_eager\)", "5 backward torch.compile", "fxstore grads="),
    (r"ViT eager", "8 ViT eager", "fxstore"),
    (r"ViT compiled", "8 ViT torch.compile", "fxstore, compiled fullgraph=True"),
]


def _quoted_paragraph(heading: str, quotes: list[tuple[str, str, str]]) -> tuple[str, dict]:
    """The docs/benchmarks.md paragraph starting with ``heading`` and the one recorded run it names, after
    checking that each ``(words, case prefix, contender)`` figure it quotes equals that run's ratio."""
    page = PAGES["benchmarks"]
    start = page.index(heading)
    paragraph = " ".join(page[start:page.index("\n\n", start)].split())
    named = re.findall(r"`(benchmarks/results/[^`]+\.json)`", paragraph)
    assert len(named) == 1, f"the paragraph {heading!r} names no recorded file"
    payload = _recorded(named[0])
    for words, case, contender in quotes:
        found = re.search(words + r" (\d\.\d{3})×", paragraph)
        assert found, f"the paragraph quotes no figure after {words!r}"
        (recorded,) = [r["ratio"] for r in payload["rows"] if r["case"].startswith(case) and r["contender"] == contender]
        assert found[1] == f"{recorded:.3f}", f"{words}: the page says {found[1]}, the run gave {recorded:.3f}"
    return paragraph, payload


def test_rerun_ratios_quoted_in_the_prose_equal_their_recorded_runs():
    paragraph, _ = _quoted_paragraph("**Overhead, measured again with more repetitions.**", _RERUN)
    table = {f"{r['ratio']:.3f}" for r in _recorded(str(readme_table.source_of(PAGES["benchmarks"]).relative_to(ROOT)))["rows"]
             if r["ratio"] is not None}
    above = re.search(r"the table above \(([^)]*)\)", paragraph)
    assert above, "the rerun paragraph quotes no figures of the table"
    quoted = re.findall(r"(\d\.\d{3})×", above[1])
    assert len(quoted) == 5 and set(quoted) <= table, f"not in the table: {sorted(set(quoted) - table)}"
