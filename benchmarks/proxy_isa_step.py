"""Proxy-ISA's loss step with and without its memory: dml_jax vs the torch re-creation of the authors' code.

What is timed: one step of the objective on given embeddings (the backbone is left out: it is the same as
Proxy-Anchor's): loss, gradients with respect to the embeddings [B, E] and the proxies [C, E], and the state
update (counts, learned similarities, the memory queue).

  pa       (ours only) Proxy-Anchor's loss and gradients, the [B, C] baseline every proxy loss pays
  isa_off  Proxy-ISA before `start_epoch`: class weights and negative damping, counts; no memory
  isa_on   Proxy-ISA with the memory and the outlier filter on: a full queue of T rows, the enqueue, S of the
           batch's classes from the memory

  ours   dml_jax.methods.proxy_isa.isa_step under jax.jit (state donated), on jax's default device
  torch  tests/proxy_isa_torch.py: the authors' forward restated, a Python loop over the batch's classes and
         over all C classes for the negatives, float64 state; CUDA if torch finds it, else CPU

Each (implementation, C) runs in its own subprocess. Reported per variant: min / median / max seconds per
step over --steps timed steps after --warmup untimed ones (compilation included there).

  python benchmarks/proxy_isa_step.py --out docs/benchmarks/proxy_isa.md
  python benchmarks/proxy_isa_step.py --classes 100 11318 --memory 55000 --batch 128 --steps 5
  python benchmarks/proxy_isa_step.py --quick      # tiny sizes: checks that it runs (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
HPARAMS = dict(volume=100.0, eta_scale=0.9, eta_margin=0.1, hardness_scale=0.15)


def make_inputs(batch: int, dim: int, classes: int, memory: int, seed: int = 0) -> dict:
  """Unit embeddings near their class's proxy, N(0, 2/C) proxies, counts spread over E's range, a full queue of
  unit rows with labels in [1, C) (so the code's fullness test reads all T rows)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  proxies = rng.normal(0, np.sqrt(2 / classes), (classes, dim)).astype(np.float32)
  labels = rng.integers(0, classes, batch).astype(np.int32)
  pn = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
  sign = np.where(rng.random(batch) < 0.1, -1.0, 1.0)
  x = sign[:, None] * pn[labels] + 2.0 * rng.normal(size=(batch, dim)) / np.sqrt(dim)
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  feats = rng.normal(size=(memory, dim))
  feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
  return dict(x=x, labels=labels, proxies=proxies, counts=rng.integers(0, 600, classes).astype(np.int32),
              learned=rng.uniform(-0.1, 0.15, classes).astype(np.float32), memory_features=feats,
              memory_labels=rng.integers(1, classes, memory).astype(np.int32))


def _stats(times: list[float]) -> dict:
  return dict(min=min(times), median=statistics.median(times), max=max(times))


def run_ours(batch: int, dim: int, classes: int, memory: int, steps: int, warmup: int) -> dict:
  import functools

  import jax
  import jax.numpy as jnp

  from dml_jax import losses
  from dml_jax.losses import proxy_isa as isa_loss
  from dml_jax.methods import proxy_isa

  d = make_inputs(batch, dim, classes, memory)
  settings = proxy_isa.ISASettings(alpha=32.0, margin=0.1, eta_scale=HPARAMS["eta_scale"],
                                   eta_margin=HPARAMS["eta_margin"], hardness_scale=HPARAMS["hardness_scale"],
                                   ring_buffer=False, tables=isa_loss.count_tables(HPARAMS["volume"], 1.5))
  x, labels, proxies = jnp.asarray(d["x"]), jnp.asarray(d["labels"]), jnp.asarray(d["proxies"])

  def fresh_state():
    classes_state = {"count": jnp.asarray(d["counts"]), "similarity": jnp.asarray(d["learned"])}
    mem = {"features": jnp.asarray(d["memory_features"]), "labels": jnp.asarray(d["memory_labels"]),
           "pointer": jnp.zeros((), jnp.int32), "size": jnp.asarray(memory, jnp.int32)}
    return classes_state, mem

  @functools.partial(jax.jit, static_argnums=(4, 5), donate_argnums=(2, 3))
  def isa(x, proxies, classes_state, mem, memory_on, filter_on):
    def f(x, p):
      return proxy_isa.isa_step(x, labels, p, classes_state, mem, settings, memory_on=memory_on, filter_on=filter_on)

    (loss, (_, new_classes, new_mem)), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, proxies)
    return loss, grads, new_classes, new_mem

  @jax.jit
  def pa(x, proxies):
    return jax.value_and_grad(lambda x, p: losses.proxy_anchor_loss(x, labels, p, normalize_embeddings=False),
                              (0, 1))(x, proxies)

  results = {}
  for variant in ("pa", "isa_off", "isa_on"):
    classes_state, mem = fresh_state()
    times, t_warm = [], time.perf_counter()
    for i in range(warmup + steps):
      t = time.perf_counter()
      if variant == "pa":
        out = pa(x, proxies)
      else:
        on = variant == "isa_on"
        loss, grads, classes_state, mem = out = isa(x, proxies, classes_state, mem, on, on)
      jax.block_until_ready(out)
      if i >= warmup:
        times.append(time.perf_counter() - t)
      elif i == warmup - 1:
        results[f"{variant}_warmup_s"] = time.perf_counter() - t_warm
    results[variant] = _stats(times)
  results["device"] = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
  results["versions"] = f"jax {jax.__version__}"
  return results


def run_torch(batch: int, dim: int, classes: int, memory: int, steps: int, warmup: int) -> dict:
  import torch

  sys.path.insert(0, os.path.join(REPO, "tests"))
  from proxy_isa_torch import TorchProxyISA

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  d = make_inputs(batch, dim, classes, memory)
  results = {}
  for variant in ("isa_off", "isa_on"):
    ref = TorchProxyISA(classes, dim, memory, **HPARAMS)
    ref.set_counts(d["counts"])
    ref.learned = torch.tensor(d["learned"], dtype=torch.float64)
    ref.memory.features = torch.tensor(d["memory_features"])
    ref.memory.labels = torch.tensor(d["memory_labels"], dtype=torch.long)
    on = variant == "isa_on"
    labels = torch.tensor(d["labels"], dtype=torch.long)
    times, t_warm = [], time.perf_counter()
    for i in range(warmup + steps):
      x = torch.tensor(d["x"], requires_grad=True)
      proxies = torch.tensor(d["proxies"], requires_grad=True)
      t = time.perf_counter()
      loss, _ = ref.step(x, labels, proxies, memory_on=on, filter_on=on)
      loss.backward()
      if device == "cuda":
        torch.cuda.synchronize()
      if i >= warmup:
        times.append(time.perf_counter() - t)
      elif i == warmup - 1:
        results[f"{variant}_warmup_s"] = time.perf_counter() - t_warm
    results[variant] = _stats(times)
  results["device"] = device
  results["versions"] = f"torch {torch.__version__}"
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--classes", type=int, nargs="+", default=[100, 11318], help="C (11,318: SOP's training classes)")
  parser.add_argument("--memory", type=int, default=55000, help="T")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
  parser.add_argument("--out", default="", help="write a markdown report here (else print it)")
  parser.add_argument("--quick", action="store_true", help="C 20, T 200, B 16, E 32, 2 steps (CI)")
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick and not args._child:
    args.classes, args.memory, args.batch, args.dim, args.steps = [20], 200, 16, 32, 2
    try:
      import torch  # noqa: F401  (the re-creation is torch)
    except ImportError:
      args.impls = [i for i in args.impls if i != "torch"]
  if args._child:
    impl, classes = args._child.split(":")
    fn = run_ours if impl == "ours" else run_torch
    print("RESULT " + json.dumps(fn(args.batch, args.dim, int(classes), args.memory, args.steps, args.warmup)))
    return

  from benchmarks import common

  doc_stamp = common.stamp()
  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.UTC)
  rows = []
  for classes in args.classes:
    for impl in args.impls:
      env = {**os.environ, "PYTHONPATH": REPO}
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", f"{impl}:{classes}",
                             "--memory", str(args.memory), "--batch", str(args.batch), "--dim", str(args.dim),
                             "--steps", str(args.steps), "--warmup", str(args.warmup)], cwd=REPO, env=env,
                            capture_output=True, text=True)
      if proc.returncode:
        raise SystemExit(f"{impl} C={classes} failed:\n{proc.stderr[-3000:]}")
      result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
      rows.append((classes, impl, result))
      print(f"C={classes} {impl}: " + ", ".join(f"{k} {v['median'] * 1e3:.1f} ms" for k, v in result.items()
                                                if isinstance(v, dict)), flush=True)
  load_after = os.getloadavg()
  import numpy

  versions = [f"Python {platform.python_version()}", f"numpy {numpy.__version__}"]
  versions += sorted({r["versions"] for _, _, r in rows})
  lines = ["# Proxy-ISA step: the memory's cost, dml_jax vs the torch re-creation", "",
           *common.stamp_lines(doc_stamp, load_after[0]),
           "- devices: " + "; ".join(sorted({f'{impl} on {r["device"]}' for _, impl, r in rows}))
           + f" ({', '.join(versions)}); started {started:%H:%M} UTC", ""]
  if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
    lines += ["**Measured under load** (the 1-minute load average exceeded the core count): the times are "
              "inflated and noisy; compare rows of this table, not runs.", ""]
  lines += [f"B = {args.batch}, E = {args.dim}, T = {args.memory} (a full queue), V 100, k 0.9, lambda 0.1, h 0.15. "
            f"Time per step (loss, gradients to embeddings and proxies, state update), {args.steps} timed steps "
            f"after {args.warmup} untimed (compilation there), min / median / max:", "",
            "| C | implementation | variant | warm-up s (compile) | min (ms) | median (ms) | max (ms) |",
            "|---:|---|---|---:|---:|---:|---:|"]
  for classes, impl, result in rows:
    for variant in ("pa", "isa_off", "isa_on"):
      if variant in result:
        s = result[variant]
        warm = result.get(f"{variant}_warmup_s")
        lines.append(f"| {classes:,} | {impl} | {variant} | {'-' if warm is None else f'{warm:.2f}'} | "
                     f"{s['min'] * 1e3:.1f} | {s['median'] * 1e3:.1f} | {s['max'] * 1e3:.1f} |")
  lines += ["", "Variants: `pa` Proxy-Anchor's loss and gradients (ours; the [B, C] cost every proxy loss pays), "
            "`isa_off` Proxy-ISA before `start_epoch` (weights, counts), `isa_on` with the memory and the filter "
            "(enqueue, S from all T rows)."]
  report = "\n".join(lines) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)
  print(report)


if __name__ == "__main__":
  main()
