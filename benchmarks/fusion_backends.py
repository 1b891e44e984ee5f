"""Does XLA recompute the ViT backward chain on this backend? The trainer's update step, compiled per backend.

XLA:CPU's fusion pass once rebuilt the ViT-S/16 backward pass so that every block's gradient fusion re-added
the gradients of all later blocks (fusions whose operand count grows with depth; docs/benchmarks.md,
"Training step"). dml_jax's ViT avoids it with a hand-written LayerNorm backward (backbones/vit.py). This
script compiles the trainer's own update step (Proxy-Anchor full fine-tuning, `make_ours` of
benchmarks/train_step.py) at several depths and reports the largest fusion by operand count after
optimisation, for two LayerNorms:

  ours       the hand-written backward (what dml_jax runs)
  autodiff   jax's autodiffed LayerNorm (flax nnx.LayerNorm): the pattern that XLA:CPU recomputes

on each backend asked for:

  cpu        this machine's XLA:CPU
  gpu        XLA:GPU for the GPU a target file describes, compiled without a GPU (deviceless ahead-of-time
             compilation through jax's CUDA plugin and jax.experimental.topologies). Needs the plugin in the
             venv: pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')" (about 4.6 GB
             with NVIDIA's libraries; no GPU or driver needed). The plugin's startup check of the CUDA
             libraries is skipped (JAX_SKIP_CUDA_CONSTRAINTS_CHECK) and, with no GPU to autotune on, XLA's
             Triton GEMMs and autotuning are off (cuBLAS for every dot).
             On a GPU machine the same runs against the real device with --gpu-target "".

"grows" means the largest fusion has more operands at a greater depth: XLA recomputes the chain. Each
backend and LayerNorm runs in its own child process (XLA flags are per process).

  python benchmarks/fusion_backends.py                           # cpu and gpu (H100 target file)
  python benchmarks/fusion_backends.py --gpu-python /tmp/cuda-venv/bin/python   # the plugin in another venv
  python benchmarks/fusion_backends.py --backends cpu --depths 2 4 --batch 4 --quick
  python benchmarks/fusion_backends.py --out docs/benchmarks/fusion_backends.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H100 = os.path.join(REPO, "benchmarks", "gpu_targets", "h100_sxm.txtpb")
LAYER_NORMS = ("ours", "autodiff")


def _use_autodiff_layer_norm() -> None:
  from flax import nnx

  from dml_jax.backbones import vit

  def flax_layer_norm(dim, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  vit._layer_norm = flax_layer_norm


def _gpu_devices(target: str):
  """The devices to compile for: a deviceless topology from a GpuTargetConfig text file, or the local GPUs."""
  import jax

  if not target:
    return jax.devices("gpu")
  from jax.experimental import topologies

  with open(target) as f:
    return topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology="1x1x1").devices


def compile_step(depth: int, batch: int, devices, quick: bool):
  """The trainer's Proxy-Anchor ViT-S/16 update step at `depth`, lowered on abstract inputs for `devices`."""
  import jax
  import numpy as np

  from benchmarks import train_step as ts
  from dml_jax.train import step as step_lib

  ts.QUICK["enabled"] = quick
  with jax.default_device(jax.devices("cpu")[0]):  # the host builds the state; only shapes travel
    ours = ts.build_ours("vit_s16", batch, "float32", depth=depth, devices=devices)
  mesh = ours.cache.mesh
  abstract = lambda tree, sharding: jax.tree.map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)
  return ours.lower(abstract(ours.state, step_lib.replicated(mesh)),
                    abstract(ours.batch, step_lib.batch_sharded(mesh))).compile()


def _child(args) -> None:
  if args.backend == "gpu":
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if args.gpu_target:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0").strip()
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  from benchmarks.train_step import fusion_stats

  if args.layer_norm == "autodiff":
    _use_autodiff_layer_norm()
  devices = _gpu_devices(args.gpu_target) if args.backend == "gpu" else jax.devices("cpu")[:1]
  rows = []
  for depth in args.depths:
    t = time.perf_counter()
    stats = fusion_stats(compile_step(depth, args.batch, devices, args.quick).as_text())
    rows.append(dict(depth=depth, compile_s=time.perf_counter() - t, **stats))
  kind = getattr(devices[0], "device_kind", "") or devices[0].platform
  print("RESULT " + json.dumps(dict(backend=args.backend, layer_norm=args.layer_norm, device=kind,
                                    jax=jax.__version__, rows=rows)), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backends", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
  p.add_argument("--gpu-target", default=H100, help="GpuTargetConfig text file ('' = the local GPU)")
  p.add_argument("--gpu-python", default=sys.executable,
                 help="the python of a venv with jax's CUDA plugin, for the gpu backend (default: this one)")
  p.add_argument("--depths", nargs="+", type=int, default=[2, 4, 12])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="64 px images (compiles faster; same pattern)")
  p.add_argument("--out", default="", metavar="FILE", help="write the markdown section here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--backend", help=argparse.SUPPRESS)
  p.add_argument("--layer-norm", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return

  from benchmarks import common

  stamp = common.stamp()
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  results, failed = [], []
  for backend in args.backends:
    for ln in LAYER_NORMS:
      python = args.gpu_python if backend == "gpu" else sys.executable
      cmd = [python, os.path.abspath(__file__), "--child", "--backend", backend, "--layer-norm", ln,
             "--gpu-target", args.gpu_target, "--batch", str(args.batch), "--depths", *map(str, args.depths)]
      proc = subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True)
      lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
      if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        print(f"{backend} / {ln} LayerNorm failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        failed.append(f"{backend} / {ln}: {tail.splitlines()[-1] if tail else 'no output'}")
        continue
      r = json.loads(lines[-1][len("RESULT "):])
      results.append(r)
      print(f"{backend} ({r['device']}), {ln} LayerNorm: largest fusion by depth "
            + ", ".join(f"{x['depth']}: {x['largest']}" for x in r["rows"]) + f" operands -> {_verdict(r)}",
            flush=True)
  common.write_section(args.out or None, "Recomputing fusions in the ViT training step, per XLA backend",
                       markdown(stamp, args, results, failed))
  if failed and not results:
    raise SystemExit("every backend failed")


def _verdict(r: dict) -> str:
  largest = [x["largest"] for x in r["rows"]]
  return "grows with depth: XLA recomputes the backward chain" if largest[-1] > largest[0] else "flat: no recomputation"


def markdown(stamp: dict, args, results: list[dict], failed: list[str]) -> list[str]:
  from benchmarks import common

  size = 64 if args.quick else 224
  lines = common.stamp_lines(stamp) + ["", (
      f"The trainer's update step (Proxy-Anchor full fine-tuning of ViT-S/16 at {size} px, batch {args.batch}, "
      f"float32, AdamW) compiled at depths {', '.join(map(str, args.depths))}; per cell the largest fusion of "
      "the optimised HLO by operand count, and how many fusions have more than 32 operands. 'ours' is "
      "dml_jax's LayerNorm with its hand-written backward, 'autodiff' jax's autodiffed LayerNorm (the pattern "
      "XLA:CPU recomputes). GPU: compiled without a GPU for the target file "
      f"`{os.path.relpath(args.gpu_target, REPO) if args.gpu_target else 'local GPU'}` (deviceless, cuBLAS "
      "dots, no autotuning)."), ""]
  header = ["backend (device)", "LayerNorm", *[f"depth {d}" for d in args.depths], "verdict"]
  rows = [[f"{r['backend']} ({r['device']}, jax {r['jax']})", r["layer_norm"],
           *[f"{x['largest']} ({x['over_threshold']} over 32)" for x in r["rows"]], _verdict(r)] for r in results]
  lines += common.table(header, rows, "ll" + "r" * len(args.depths) + "l")
  if failed:
    lines += ["", "Not run: " + "; ".join(failed)]
  return lines


if __name__ == "__main__":
  main()
