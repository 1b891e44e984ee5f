"""Regenerates tests/references/*.npz by running the live parity tests against the real libraries.

  pip install -e '.[cpu,parity]'
  python tests/make_references.py                              # every reference
  python tests/make_references.py tests/test_losses.py         # the references one file asks for
  python tests/make_references.py "tests/test_losses.py::test_proxy_nca_matches_pml"

Each `ref(name, compute)` of the selected `[live]` tests runs `compute` and writes its result to
tests/references/<name>.npz (instead of comparing with it); the tests then assert as usual, so a run that
passes has also checked dml_jax against what it wrote. Review the diff (`git status tests/references`)
before committing.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from reference import ROOT, WRITE_ENV

REPO = pathlib.Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
  targets = argv or ["tests"]
  env = {**os.environ, WRITE_ENV: "1", "HF_HUB_OFFLINE": "1"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  # Only the `[live]` variants compute; a `[file]` one may run before the file it reads is written.
  cmd = [sys.executable, "-m", "pytest", "-q", "-m", "parity", "-k", "live", "-p", "no:cacheprovider", *targets]
  print("+", " ".join(cmd), f"({WRITE_ENV}=1: writes {ROOT.relative_to(REPO)}/)", flush=True)
  return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
