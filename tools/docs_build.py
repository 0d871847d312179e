"""Build steps of the documentation site (``make docs``), wired up in ``mkdocs.yml``.

Two pieces, each loaded by its tool from this file's path:

* **mkdocs hooks** (``hooks: [tools/docs_build.py]``): the pictures. When ``docs/gen_pictures.py``
  exists, ``on_files`` runs it as ``python docs/gen_pictures.py DIR`` (``DIR`` a fresh temporary
  folder, the repository on ``PYTHONPATH``) and adds every file it wrote to the site under
  ``pictures/``, keeping sub-folders: ``DIR/graph.svg`` is ``pictures/graph.svg``, so a page in
  ``docs/`` shows it with ``![...](pictures/graph.svg)``. Nothing is written into ``docs/`` (so
  ``mkdocs serve`` does not rebuild in a loop), and a script that fails stops the build. Without
  the script the hook does nothing. The script itself is not published (``exclude_docs``).
* **a griffe extension** (``mkdocstrings`` option ``extensions: [tools/docs_build.py:ExampleSections]``):
  fxstore's docstrings head their runnable examples ``Example:``, as napoleon reads Google style;
  griffe knows only ``Examples:`` and would render the examples as Markdown prose (``storage[m][0]``
  read as a link). The extension renames the heading before griffe parses the docstring.

Both are imported lazily or guarded, so ``pytest --doctest-modules tools`` collects this module where
the ``docs`` extra is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:  # the docs extra (mkdocstrings-python brings griffe); absent in a test-only environment
    import griffe
except ImportError:  # pragma: no cover - exercised only without the docs extra
    griffe = None

__all__ = ["PICTURES", "SCRIPT", "example_sections", "generate_pictures", "on_files", "on_post_build"]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "gen_pictures.py"
"""The picture generator's name, in the site's ``docs_dir``."""
PICTURES = "pictures"
"""The site folder the generated pictures are served from (``docs/x.md`` links ``pictures/NAME``)."""

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_made: list[tempfile.TemporaryDirectory] = []


def example_sections(docstring: str) -> str:
    """``docstring`` with each ``Example:`` section heading spelled ``Examples:``.

    Args:
        docstring: A Google-style docstring.

    Returns:
        The same text, where a line holding only ``Example:`` now reads ``Examples:``.

    Example:
        >>> print(example_sections("Add one.\\n\\nExample:\\n    add_one(1)\\n\\nNot an Example: heading."))
        Add one.
        <BLANKLINE>
        Examples:
            add_one(1)
        <BLANKLINE>
        Not an Example: heading.
    """
    return _EXAMPLE.sub(r"\1Examples:", docstring)


def generate_pictures(script: Path, folder: Path) -> list[Path]:
    """Run ``script FOLDER`` with this repository importable and list the files it wrote.

    Args:
        script: The picture generator (``docs/gen_pictures.py``).
        folder: An empty folder it writes into.

    Returns:
        Every regular file under ``folder`` afterwards, sorted.

    Raises:
        RuntimeError: the script exits with an error (its output is in the message).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script), str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {folder} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def on_files(files: Any, config: Any, **_: Any) -> Any:
    """mkdocs hook: add the pictures ``docs/gen_pictures.py`` makes, if that script exists."""
    script = Path(config["docs_dir"]) / SCRIPT
    if not script.exists():
        return files
    from mkdocs.exceptions import PluginError  # the docs extra; imported only while mkdocs builds
    from mkdocs.structure.files import File

    made = tempfile.TemporaryDirectory(prefix="fxstore-pictures-")
    _made.append(made)
    folder = Path(made.name)
    try:
        pictures = generate_pictures(script, folder)
    except RuntimeError as error:
        raise PluginError(str(error)) from error
    for path in pictures:
        uri = f"{PICTURES}/{path.relative_to(folder).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_post_build(**_: Any) -> None:
    """mkdocs hook: remove the temporary picture folders once the site is written."""
    while _made:
        _made.pop().cleanup()


if griffe is not None:
    class ExampleSections(griffe.Extension):
        """griffe extension: read ``Example:`` docstring sections as ``Examples:`` (see the module)."""

        def on_object(self, *, obj: Any, **_: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = example_sections(obj.docstring.value)
