"""What every benchmark records with its figures: the stamp (date, commit, machine, load, versions, command),
timing summaries (compile apart, min / median / max of the steady state) and the markdown section it writes.

A figure in docs/benchmarks.md is only ever written by a script: each benchmark's `--out FILE` writes one
section (docs/benchmarks/<name>.md) that starts with its stamp; `benchmarks/assemble_docs.py` joins them.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "grain", "faiss-cpu", "torch", "torchvision", "timm",
            "pytorch-metric-learning", "pillow")


def load_average() -> float:
  """The 1-minute load average (0 where the OS has none)."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return 0.0


def _git(*cmd: str) -> str:
  try:
    return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "?"


def command_line(argv: Sequence[str] | None = None) -> str:
  """The command as typed from the repository root: `python benchmarks/x.py --flag ...`."""
  argv = list(sys.argv if argv is None else argv)
  script = os.path.relpath(os.path.abspath(argv[0]), REPO) if argv else "?"
  return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in argv[1:]])


def stamp(argv: Sequence[str] | None = None) -> dict:
  """Date (UTC), commit (with ' (modified)' when tracked files differ from it), machine, Python and package
  versions, XLA_FLAGS, the exact command, and the load average now (call again at the end for 'after')."""
  from importlib import metadata

  def version(pkg: str) -> str:
    try:
      return metadata.version(pkg)
    except metadata.PackageNotFoundError:
      return ""

  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  # Tracked files that differ from the commit, the benchmark records themselves (docs/) aside.
  modified = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs")
  return dict(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              commit=_git("rev-parse", "--short", "HEAD") + (" (modified)" if modified and modified != "?" else ""),
              command=command_line(argv), python=platform.python_version(),
              machine=f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu})",
              versions={p: v for p in PACKAGES if (v := version(p))},
              xla_flags=os.environ.get("XLA_FLAGS", ""), load_before=load_average())


def stamp_lines(s: dict, load_after: float | None = None) -> list[str]:
  """The stamp as markdown lines (a bullet list), load before and after the run."""
  after = load_average() if load_after is None else load_after
  versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
  lines = [f"- date: {s['date']}; commit {s['commit']}",
           f"- machine: {s['machine']}; python {s['python']}",
           f"- load average (1 min): {s['load_before']:.2f} before, {after:.2f} after"
           + ("  (a shared machine: compare rows of one run, not runs)" if max(s["load_before"], after) > 1.5 else ""),
           f"- versions: {versions}"]
  if s.get("xla_flags"):
    lines.append(f"- XLA_FLAGS: `{s['xla_flags']}`")
  lines.append(f"- command: `{s['command']}`")
  return lines


def spread(values: Iterable[float]) -> tuple[float, float, float]:
  """(min, median, max)."""
  values = list(values)
  return min(values), statistics.median(values), max(values)


def fmt_spread(values: Iterable[float], digits: int = 3) -> str:
  lo, mid, hi = spread(values)
  return f"{lo:.{digits}f} / {mid:.{digits}f} / {hi:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> list[str]:
  """A markdown table; `align` one character per column ('l' or 'r', default all 'l')."""
  align = align or "l" * len(header)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def write_section(path: str | None, title: str, body: list[str]) -> str:
  """`# title` + body, printed, and written to `path` when given; returns the text."""
  text = "\n".join([f"# {title}", ""] + body).rstrip() + "\n"
  print(text, flush=True)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return text
