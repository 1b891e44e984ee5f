"""benchmarks/: every script is run by run_all (quick in CI, documented for docs/benchmarks.md), and every section
of docs/benchmarks.md comes from a script's stamped output."""

from __future__ import annotations

import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package

from benchmarks import assemble_docs, run_all  # noqa: E402


def test_every_benchmark_script_is_in_run_all_with_a_quick_mode():
  listed = {script for script, _, _ in run_all.BENCHMARKS.values()}
  assert set(run_all.scripts_on_disk()) <= listed, "add the new script to benchmarks/run_all.BENCHMARKS"
  for name, (script, quick, documented) in run_all.BENCHMARKS.items():
    source = (REPO / "benchmarks" / script).read_text()
    assert "--quick" in quick and '"--quick"' in source, f"{name}: {script} needs a --quick mode"
    if documented is not None:  # the documented run writes the section assemble_docs reads
      out = documented[documented.index("--out") + 1]
      assert out.startswith("docs/benchmarks/") and pathlib.Path(out).name in dict(
          (f, h) for h, f in assemble_docs.SECTIONS), f"{name}: {out} is not a section of docs/benchmarks.md"


def test_every_section_of_the_benchmark_page_is_stamped_by_its_script():
  for _, name in assemble_docs.SECTIONS:
    path = REPO / "docs" / "benchmarks" / name
    if not path.exists():
      continue
    text = path.read_text()
    command = re.search(r"command: `(python benchmarks/[^`]+)`", text)
    assert command, f"docs/benchmarks/{name} has no stamped command: it must be written by a benchmark script"
    assert f"--out docs/benchmarks/{name}" in command.group(1), f"{name}: written by another command"
    for field in ("date:", "machine:", "load average", "versions:"):
      assert field in text, f"docs/benchmarks/{name} lacks the stamp's {field}"
