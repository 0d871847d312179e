"""The documentation: a short README that leads into the site, a site whose nav and API reference are
complete, and the build step that puts generated pictures into it.

The pages' examples themselves run as doctests (``docs/*.md`` through ``--doctest-glob`` in setup.cfg);
``make docs`` builds the whole site with ``--strict`` in CI.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxstore

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
HOOKS = ROOT / "tools" / "docs_build.py"


def _nav_pages(entries: list) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_the_readme_is_a_landing_page_of_at_most_250_lines():
    assert len(README.splitlines()) <= 250
    for heading in ("## Set-up", "## Why not hooks?", "## Quickstart", "## Benchmarks", "## Documentation"):
        assert f"\n{heading}\n" in README, heading
    assert not re.search(r"^#+ .*what changed", README, re.M | re.I), "change logs belong in CHANGELOG.md"


def test_the_readme_set_up_commands_are_make_targets():
    commands = re.findall(r"^make (\S+)", README, re.M)
    assert {"demo", "test"} <= set(commands)
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(commands) <= targets, set(commands) - targets


def test_every_link_of_the_readme_and_changelog_reaches_a_file():
    for name in ("README.md", "CHANGELOG.md"):
        text = (ROOT / name).read_text()
        links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
        missing = [link for link in links if link and not (ROOT / link).exists()]
        assert missing == [], f"{name} links to missing files: {missing}"


def test_the_readme_links_to_every_page_of_the_site():
    pages = _nav_pages(_mkdocs_config()["nav"])
    unlinked = [p for p in pages if p not in ("index.md", "changelog.md") and f"(docs/{p})" not in README]
    assert unlinked == [], f"README.md's documentation table does not link {unlinked}"


def test_every_page_in_docs_is_in_the_nav_and_every_nav_entry_exists():
    pages = _nav_pages(_mkdocs_config()["nav"])
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(pages) == on_disk, (sorted(set(on_disk) - set(pages)), sorted(set(pages) - set(on_disk)))


def test_the_site_builds_offline():
    config = _mkdocs_config()
    assert config["theme"]["font"] is False, "web fonts are fetched from a CDN"
    plugins = {next(iter(p)) if isinstance(p, dict) else p for p in config["plugins"]}
    assert plugins == {"search", "mkdocstrings"}, plugins
    assert "import" not in str(config["plugins"]), "mkdocstrings inventories are fetched over the network"


def test_the_api_reference_documents_every_public_name():
    identifiers = re.findall(r"^::: (\S+)$", (DOCS / "api.md").read_text(), re.M)
    documented = {}
    for identifier in identifiers:
        module, _, name = identifier.rpartition(".")
        documented[name] = getattr(importlib.import_module(module), name)
    assert sorted(documented) == sorted(fxstore.__all__), set(documented) ^ set(fxstore.__all__)
    wrong = [name for name, obj in documented.items() if obj is not getattr(fxstore, name)]
    assert wrong == [], f"api.md documents another object than fxstore.{wrong}"
    assert len(identifiers) == len(documented), "a name is documented twice"


def test_no_page_keeps_a_change_log():
    logs = [p.name for p in DOCS.glob("*.md") if re.search(r"^#+ .*what changed", p.read_text(), re.M | re.I)]
    assert logs == []
    assert "## Capture v2" in (ROOT / "CHANGELOG.md").read_text()


def test_the_nothing_lost_subsection_moved_whole():
    page = (DOCS / "datasets.md").read_text()
    start = page.index("### Nothing lost\n")
    section = page[start:page.index("\n## ", start)]
    assert "| Fault injected | Outcome |" in section and "Not covered: power loss" in section


# -- the picture step of the build ---------------------------------------------------------------------

def _site(tmp_path: Path, script: str | None) -> subprocess.CompletedProcess:
    """Build a one-page site with the repository's hooks; ``script`` is its gen_pictures.py (None: none)."""
    pytest.importorskip("mkdocs")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Pictures\n\n![a graph](pictures/graphs/one.svg)\n")
    if script is not None:
        (docs / "gen_pictures.py").write_text(textwrap.dedent(script))
    (tmp_path / "mkdocs.yml").write_text(textwrap.dedent(f"""\
        site_name: pictures
        strict: true
        exclude_docs: "*.py"
        hooks: ["{HOOKS}"]
        validation: {{unrecognized_links: warn, omitted_files: warn}}
        nav: [index.md]
        """))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"})


def test_the_build_serves_what_gen_pictures_writes(tmp_path):
    done = _site(tmp_path, """\
        import importlib.util
        import os
        import sys
        from pathlib import Path

        assert importlib.util.find_spec("fxstore").origin.startswith(os.getcwd())  # run in the repository, importable

        folder = Path(sys.argv[1]) / "graphs"
        folder.mkdir()
        (folder / "one.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
        """)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "pictures" / "graphs" / "one.svg").read_text().startswith("<svg")
    assert 'src="pictures/graphs/one.svg"' in (tmp_path / "site" / "index.html").read_text()
    assert not (tmp_path / "site" / "gen_pictures.py").exists()
    assert not (tmp_path / "docs" / "pictures").exists(), "the pictures are not written into docs/"


def test_a_failing_picture_script_fails_the_build_with_its_output(tmp_path):
    done = _site(tmp_path, """\
        raise SystemExit("dot is missing")
        """)
    assert done.returncode != 0
    assert "gen_pictures.py" in done.stderr and "dot is missing" in done.stderr


def test_without_the_script_a_missing_picture_fails_the_strict_build(tmp_path):
    done = _site(tmp_path, None)
    assert done.returncode != 0
    assert "pictures/graphs/one.svg" in done.stderr


def test_the_api_reference_shows_every_public_member_the_extractor_inherits_from_fxstore():
    """``FeatureExtractor``'s methods from fxstore's own mixins (``Readout``, ``WorkflowMethods``) appear
    only when listed in ``inherited_members``: a new one must be listed too."""
    page = (DOCS / "api.md").read_text()
    found = re.search(r"^::: fxstore\.FeatureExtractor\n    options:\n      inherited_members: \[([^\]]*)\]", page, re.M)
    assert found, "api.md lists no inherited members of FeatureExtractor"
    listed = {name.strip() for name in found[1].split(",")}
    inherited = {name for base in fxstore.FeatureExtractor.__mro__[1:] if base.__module__.startswith("fxstore.")
                 for name in vars(base) if not name.startswith("_")}
    assert listed == inherited, (sorted(inherited - listed), sorted(listed - inherited))
