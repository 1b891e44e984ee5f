"""The repository passes `ruff check` (rules and exceptions in pyproject.toml's [tool.ruff])."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(REPO)],
                        cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, f"ruff check found problems (ruff check --fix repairs many):\n{proc.stdout}{proc.stderr}"
