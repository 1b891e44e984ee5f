"""Writes docs/benchmarks.md from the per-benchmark sections in docs/benchmarks/ (one file each).

Every section is written by its benchmark script (`--out docs/benchmarks/<name>.md`), stamped with the date,
commit, machine, load average before and after, versions and the exact command that wrote it, so each section
regenerates with the command it shows and `python benchmarks/run_all.py` regenerates them all. Nothing in
docs/benchmarks/ is written by hand.

  python benchmarks/assemble_docs.py
"""

from __future__ import annotations

import pathlib

SECTIONS = (  # (heading, file in docs/benchmarks/)
    ("Input pipeline", "input_pipeline.md"),
    ("Evaluation metrics", "eval_metrics.md"),
    ("Training step", "train_step.md"),
    ("Training step: per-op profile", "train_step_profile.md"),
    ("Recomputing fusions per XLA backend", "fusion_backends.md"),
    ("Divide & Conquer re-clustering", "dnc_recluster.md"),
    ("Proxy-ISA step", "proxy_isa.md"),
    ("DFML train step", "dfml.md"),
    ("DADA iteration", "dada.md"),
    ("GPU suite", "gpu_suite.md"),
)

INTRO = """# Benchmarks

Every figure below is written by a script in `benchmarks/`: each section starts with its stamp (date, commit,
machine, load average before and after, versions) and the exact command, which regenerates that section from a
clean checkout; `python benchmarks/run_all.py` runs all of them and then `python benchmarks/assemble_docs.py`
joins the sections into this page (`python benchmarks/run_all.py --quick` runs every script on tiny sizes, in
CI). Times are min / median / max over repeated runs, with compilation (JAX) and other first-run costs reported
apart from the steady state.

Figures taken on a shared machine (the stamp's load average well above its core count) are indicative only:
compare rows of one section, which were measured side by side, not sections or runs. Sections can also come
from different machines (the stamp's machine line names the CPU: the same 2-core class of machine has been an
Intel Xeon on some days and an AMD EPYC on others, with step times 3 to 4x apart). CPU figures say nothing
about GPU speed. Where ours is slower than the reference, the section says so in words.
"""


def main() -> None:
  docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
  parts, missing = [INTRO], []
  for heading, name in SECTIONS:
    path = docs / "benchmarks" / name
    if not path.exists():
      missing.append(name)
      continue
    text = path.read_text().strip()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the file's own title becomes a subtitle
    title = text.split("\n", 1)[0].lstrip("# ").strip() if text.startswith("# ") else ""
    parts.append(f"## {heading}\n")
    if title:
      parts.append(f"_{title}_\n")
    parts.append(body.replace("\n## ", "\n### ").strip() + "\n")
  if missing:
    parts.append("Not yet run: " + ", ".join(f"`docs/benchmarks/{m}`" for m in missing)
                 + " (`python benchmarks/run_all.py` writes them).\n")
  (docs / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
  main()
