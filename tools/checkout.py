"""Which commit of fxstore's own git checkout is running (for recorded runs: coverage, benchmarks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["commit"]


def commit() -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``"unknown"`` outside git.

    Example:
        >>> from tools.checkout import commit
        >>> commit() == "unknown" or len(commit().split("+")[0]) == 40
        True
    """
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
