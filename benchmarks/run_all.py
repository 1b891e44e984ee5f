"""Runs every benchmark: on tiny sizes (--quick, CI: none may rot) or as documented (regenerates docs/benchmarks.md).

  python benchmarks/run_all.py --quick      # each script's --quick mode; exit 1 when any fails
  python benchmarks/run_all.py              # the documented commands, each writing its docs/benchmarks/<name>.md,
                                            # then benchmarks/assemble_docs.py (hours on a CPU; run on a quiet machine)
  python benchmarks/run_all.py --only train_step

Every script in benchmarks/ except the helpers below must be listed in BENCHMARKS (a test checks it), so that a
new benchmark joins the quick run and the documentation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = ("common.py", "run_all.py", "assemble_docs.py", "__init__.py")

# name: (script, quick arguments, documented arguments). The documented arguments write docs/benchmarks/<name>.md;
# None where a benchmark has no documented run (e.g. it needs a GPU the docs do not cover).
BENCHMARKS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "input_pipeline": ("input_pipeline.py", ["--quick"],
                       ["--num_images", "2000", "--repeats", "5", "--out", "docs/benchmarks/input_pipeline.md"]),
    "eval_metrics": ("eval_metrics.py", ["--quick", "--impls", "ours_auto", "ours_jax", "pml"],
                     ["--cases", "sop", "--num_items", "20000", "--num_classes", "3740", "--impls", "ours_auto",
                      "ours_jax", "pml", "--repeats", "3", "--out", "docs/benchmarks/eval_metrics.md"]),
    "train_step": ("train_step.py", ["--quick"],
                   ["--models", "vit_s16", "vit_s16_vptsp", "resnet50", "--impls", "ours", "ours_xla_defaults", "torch",
                    "--batch", "16", "--steps", "5", "--warmup", "1", "--out", "docs/benchmarks/train_step.md"]),
    "train_step_profile": ("train_step.py", ["--quick", "--models", "vit_s16", "--steps", "1", "--trace",
                                             "/tmp/dml_jax_trace_quick"],
                           ["--models", "vit_s16", "resnet50", "--batch", "16", "--steps", "2", "--warmup", "1",
                            "--trace", "/tmp/dml_jax_trace", "--out", "docs/benchmarks/train_step_profile.md"]),
    # The documented run also compiles for a GPU without one (needs jax's CUDA plugin; see the script).
    "fusion_backends": ("fusion_backends.py", ["--quick", "--backends", "cpu", "--depths", "2", "4", "--batch", "4"],
                        ["--out", "docs/benchmarks/fusion_backends.md"]),
    "dada_step": ("dada_step.py", ["--quick"],
                  ["--batch", "8", "--steps", "5", "--warmup", "1", "--out", "docs/benchmarks/dada.md"]),
    "dnc_recluster": ("dnc_recluster.py", ["--quick"],
                      ["--num_items", "20000", "--num_classes", "3800", "--repeats", "2", "--out",
                       "docs/benchmarks/dnc_recluster.md"]),
    "proxy_isa_step": ("proxy_isa_step.py", ["--quick"], ["--out", "docs/benchmarks/proxy_isa.md"]),
    "dfml_step": ("dfml_step.py", ["--quick"],
                  ["--batch", "8", "--steps", "5", "--warmup", "2", "--out", "docs/benchmarks/dfml.md"]),
    # Needs a GPU: `python benchmarks/gpu_suite.py --out docs/benchmarks/gpu_suite.md` on one (see its docstring).
    "gpu_suite": ("gpu_suite.py", ["--quick"], None),
}


def scripts_on_disk() -> list[str]:
  here = os.path.join(REPO, "benchmarks")
  return sorted(f for f in os.listdir(here) if f.endswith(".py") and f not in HELPERS)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
  parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="these benchmarks only")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 600 quick)")
  args = parser.parse_args(argv)

  unlisted = sorted(set(scripts_on_disk()) - {script for script, _, _ in BENCHMARKS.values()})
  if unlisted:
    print(f"benchmarks/{', benchmarks/'.join(unlisted)} not in run_all.BENCHMARKS: add its quick and documented "
          "arguments", file=sys.stderr)
    return 2
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p),
         "HF_HUB_OFFLINE": "1"}
  timeout = args.timeout or (600.0 if args.quick else None)
  failed, wrote = [], False
  for name in args.only or list(BENCHMARKS):
    script, quick, documented = BENCHMARKS[name]
    arguments = quick if args.quick else documented
    if arguments is None:
      print(f"== {name}: no documented run", flush=True)
      continue
    cmd = [sys.executable, os.path.join("benchmarks", script), *arguments]
    print(f"== {name}: {' '.join(['python'] + cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
      rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    print(f"== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.perf_counter() - start:.0f} s", flush=True)
    if rc != 0:
      failed.append(name)
    wrote = wrote or not args.quick
  if wrote:
    subprocess.run([sys.executable, os.path.join("benchmarks", "assemble_docs.py")], cwd=REPO, env=env, check=True)
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
