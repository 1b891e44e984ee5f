"""Writes docs/benchmarks.md from the per-topic files in docs/benchmarks/ (one section each).

Each benchmark script records its figures in its own file so that runs on different machines and days stay
separate; this page puts them under the headings the issues name.

  python benchmarks/assemble_docs.py
"""

from __future__ import annotations

import pathlib

SECTIONS = (  # (heading, file in docs/benchmarks/)
    ("input pipeline", "input_pipeline.md"),
    ("evaluation", "eval_metrics.md"),
    ("train step", "train_step.md"),
    ("divide & conquer re-clustering", "dnc_recluster.md"),
    ("Proxy-ISA step", "proxy_isa.md"),
    ("DADA iteration", "dada.md"),
)


def main() -> None:
  docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
  parts = ["# Benchmarks\n",
           "Every figure gives its date, machine and command. Assembled by `python benchmarks/assemble_docs.py` "
           "from the files in `docs/benchmarks/`.\n"]
  for heading, name in SECTIONS:
    text = (docs / "benchmarks" / name).read_text().strip()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the file's own title becomes a subtitle
    title = text.split("\n", 1)[0].lstrip("# ").strip() if text.startswith("# ") else ""
    parts.append(f"## {heading}\n")
    if title:
      parts.append(f"_{title}_\n")
    parts.append(body.replace("\n## ", "\n### ").strip() + "\n")
  (docs / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
  main()
