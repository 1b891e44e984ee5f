"""GPU suite: training throughput and MFU of the trainer's update step, and exact kNN retrieval time, in one call.

  python benchmarks/gpu_suite.py --out docs/benchmarks/gpu_suite.md          # H100 / H200 / A100: peak from the table
  python benchmarks/gpu_suite.py --peak_tflops 989 --peak_tflops_f32 495 --out docs/benchmarks/gpu_suite.md
  python benchmarks/gpu_suite.py --quick                                      # tiny sizes on CPU: checks that it runs

Training: the Proxy-Anchor baseline step of dml_jax's trainer (`dml_jax.train.step`: jitted, donated,
data-parallel over every local device) on random 224 px images, for ViT-S/16, ViT-B/16 (Linear head on the cls
token) and ResNet-50 (GAP + GMP -> Linear, BatchNorm with batch statistics), each in float32 and with
`compute_dtype='bfloat16'` (float32 parameters and optimizer state): 512-d embedding, 100 classes, AdamW,
every parameter trains. Each case compiles the step ahead of time (compile time reported), runs --warmup steps,
then --repeats timed runs of --steps steps each (waiting for the last one): min / median / max seconds per step,
images/s at the median.

MFU: the FLOPs of one step from XLA's cost analysis of the compiled program (the per-device program under SPMD:
each device's share of the global batch), divided by the median step time and by one device's peak. The peak
comes from --peak_tflops (bfloat16 rows) and --peak_tflops_f32 (float32 rows), or from PEAK_TFLOPS by the
device's name: dense (no sparsity) tensor-core figures of the vendor's data sheets, TF32 for float32, which is
what XLA uses for float32 matmuls on these GPUs at JAX's default precision. With no peak known (a CPU) the MFU
column says so. XLA counts every floating-point operation of the program (2 per multiply-add), the
optimizer and the loss included (under data parallelism every device runs the whole optimizer update, so the
per-device count is a little over 1 / devices of one device's), so the figure is comparable across
implementations only roughly; GFLOPs per image (per-device FLOPs x devices / batch) are printed as a check
(ViT-S/16 at 224 px: about 3 x 9.2 for forward and backward).

Retrieval: dml_jax's exact JAX kNN backend (`dml_jax.eval.knn`, backend='jax', chunked matmul + top-k) on
--knn_n random unit embeddings of --knn_dim dimensions, every item a query against all others (leave-one-out,
the SOP / CUB protocol), k = --knn_k: one untimed call (compilation), then --repeats timed calls.

--json FILE writes every figure; --out FILE the markdown section of docs/benchmarks.md (stamp, tables). A case
that fails (e.g. out of memory at the batch asked for) is reported in the table and the exit status is 1.
--quick: 64 px, ViT depth 2, one bottleneck per ResNet stage, batch 4 (or the device count), 2 steps, 2 repeats,
2,000 embeddings of 64 dimensions; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402

MODELS = {  # name: (registry name, head)
    "vit_s16": ("vit_small_patch16_224", "linear"),
    "vit_b16": ("vit_base_patch16_224", "linear"),
    "resnet50": ("resnet50", "gap_gmp_linear"),
}
DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 100
EMBEDDING = 512
# Dense peak TFLOP/s per device (no sparsity): (bfloat16, float32 as TF32). Matched in order against the lower-cased
# jax device_kind (e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB').
PEAK_TFLOPS = (
    ("h200", (989.0, 494.5)),
    ("h100 pcie", (756.0, 378.0)),
    ("h100", (989.0, 494.5)),  # SXM
    ("a100", (312.0, 156.0)),
)
QUICK = dict(image_size=64, vit_depth=2, resnet_layers=(1, 1, 1, 1), batch=4, steps=2, warmup=1, repeats=2,
             knn_n=2000, knn_dim=64)


def peak_for(device_kind: str, dtype: str, args) -> float | None:
  """TFLOP/s of one device for `dtype` (None: unknown)."""
  given = args.peak_tflops if dtype == "bfloat16" else args.peak_tflops_f32
  if given:
    return given
  kind = device_kind.lower()
  for pattern, (bf16, f32) in PEAK_TFLOPS:
    if pattern in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def _config(model: str, dtype: str, quick: bool):
  from dml_jax import methods
  from dml_jax.train.config import default_config

  backbone, head = MODELS[model]
  c = default_config()
  c.method = methods.method_config("metric_loss")
  c.method.head = head
  c.method.bn_freeze = False
  c.model.backbone = backbone
  c.model.embedding_dim = EMBEDDING
  c.optim.optimizer = "adamw"
  c.optim.lr = 1e-4
  c.optim.groups = (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
  c.compute_dtype = dtype
  c.dataset.image_size = QUICK["image_size"] if quick else 224
  if quick:
    if head == "linear":
      c.model.backbone_overrides.depth = QUICK["vit_depth"]
    else:
      c.model.backbone_overrides.layers = QUICK["resnet_layers"]
  return c


def train_case(model: str, dtype: str, args) -> dict:
  """Compiles and times the trainer's update step; returns the figures of one table row."""
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim
  from dml_jax.train import step as step_lib

  c = _config(model, dtype, args.quick)
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  phase = plan.groups(0)
  mesh = step_lib.make_mesh()
  batch = args.batch
  if batch % mesh.size:
    raise ValueError(f"--batch {batch} must be a multiple of the {mesh.size} devices")
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params))
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(phase, params), jax.random.key(1))
  state = jax.device_put(state, step_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  size = c.dataset.image_size
  data = step_lib.shard_batch({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                               "label": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)}, mesh)
  lrs, epoch = step_lib.learning_rate_args(phase, 0)
  t0 = time.perf_counter()
  compiled = cache.update_fn(phase, 0).lower(state, data, lrs, epoch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"]) if cost and "flops" in cost else None
  for _ in range(args.warmup):
    state, metrics = compiled(state, data, lrs, epoch)
  jax.block_until_ready(metrics)
  per_step = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, data, lrs, epoch)
    loss = float(metrics["loss"])  # waits for the last step
    per_step.append((time.perf_counter() - t0) / args.steps)
  median = common.spread(per_step)[1]
  device = jax.devices()[0]
  peak = peak_for(device.device_kind, dtype, args)
  mfu = flops / median / (peak * 1e12) if flops is not None and peak else None
  return dict(model=model, dtype=dtype, batch=batch, devices=mesh.size, device_kind=device.device_kind,
              compile_s=compile_s, step_s=per_step, images_per_s=batch / median, flops_per_device_step=flops,
              gflops_per_image=None if flops is None else flops * mesh.size / batch / 1e9, peak_tflops=peak, mfu=mfu,
              loss=loss)


def knn_case(args) -> dict:
  import jax
  import numpy as np

  from dml_jax.eval import knn as knn_lib

  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.knn_n, args.knn_dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)

  def run():
    return knn_lib.knn(x, x, args.knn_k, backend="jax", metric="cosine", exclude_self=True)

  t0 = time.perf_counter()
  _, first = run()  # compilation included
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    _, indices = run()  # numpy results: the search has finished
    times.append(time.perf_counter() - t0)
  assert (indices == first).all() and not (indices == np.arange(args.knn_n)[:, None]).any()
  return dict(n=args.knn_n, dim=args.knn_dim, k=args.knn_k, first_s=first_s, seconds=times,
              queries_per_s=args.knn_n / common.spread(times)[1], device=str(jax.devices()[0].device_kind),
              devices=jax.device_count())


def markdown(stamp: dict, args, rows: list[dict], knn_row: dict | None, failed: list[str]) -> list[str]:
  lines = common.stamp_lines(stamp) + [""]
  if rows:
    r0 = rows[0]
    lines += [f"Training step (Proxy-Anchor baseline, AdamW, {EMBEDDING}-d, {NUM_CLASSES} classes, random "
              f"{'64' if args.quick else '224'} px images), global batch {args.batch} on {r0['devices']} x "
              f"{r0['device_kind']}; step time over {args.repeats} runs of {args.steps} steps after {args.warmup} "
              f"warm-up steps; MFU = XLA cost-analysis FLOPs per device / median step time / peak.", ""]

    def mfu(r):
      return f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:g}" if r["mfu"] is not None else "no peak known"

    lines += common.table(
        ["model", "dtype", "compile s", "s / step (min / median / max)", "images/s", "GFLOPs / image", "MFU"],
        [[r["model"], r["dtype"], f"{r['compile_s']:.1f}", common.fmt_spread(r["step_s"], 4),
          f"{r['images_per_s']:.1f}", "?" if r["gflops_per_image"] is None else f"{r['gflops_per_image']:.1f}",
          mfu(r)] for r in rows], "llrrrrr")
    lines.append("")
    speed = {(r["model"], r["dtype"]): r["images_per_s"] for r in rows}
    ratios = [f"{m} {speed[(m, 'bfloat16')] / speed[(m, 'float32')]:.2f}x" for m in MODELS
              if (m, "bfloat16") in speed and (m, "float32") in speed]
    if ratios:
      lines += ["bfloat16 over float32 (images/s): " + ", ".join(ratios) + ".", ""]
  if knn_row:
    lines += [f"Exact kNN (JAX backend, cosine, leave-one-out): {knn_row['n']:,} x {knn_row['dim']}-d random unit "
              f"vectors, every item a query against all, k = {knn_row['k']}, on {knn_row['devices']} x "
              f"{knn_row['device']}: {common.fmt_spread(knn_row['seconds'])} s (min / median / max of "
              f"{len(knn_row['seconds'])}; the first call, compilation included, {knn_row['first_s']:.2f} s), "
              f"{knn_row['queries_per_s']:,.0f} queries/s.", ""]
  if failed:
    lines += ["Failed: " + "; ".join(failed), ""]
  if args.quick:
    lines.append("(--quick: tiny sizes that check the benchmark runs; the figures mean nothing.)")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  parser.add_argument("--batch", type=int, default=128, help="global batch (a multiple of the device count)")
  parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs (training) and calls (kNN)")
  parser.add_argument("--peak_tflops", type=float, default=None, help="one device's dense bfloat16 peak, TFLOP/s")
  parser.add_argument("--peak_tflops_f32", type=float, default=None,
                      help="one device's float32 peak (TF32 tensor cores on GPUs), TFLOP/s")
  parser.add_argument("--knn_n", type=int, default=200_000, help="embeddings for the kNN timing (0: skip it)")
  parser.add_argument("--knn_dim", type=int, default=EMBEDDING)
  parser.add_argument("--knn_k", type=int, default=16)
  parser.add_argument("--quick", action="store_true", help="tiny sizes on any device: checks that it runs")
  parser.add_argument("--json", default=None, help="write every figure to this file")
  parser.add_argument("--out", default=None, help="write the markdown section to this file")
  args = parser.parse_args(argv)
  stamp = common.stamp(argv if argv is None else [sys.argv[0], *argv])
  import jax

  if args.quick:
    for key in ("steps", "warmup", "repeats", "knn_n", "knn_dim"):
      setattr(args, key, QUICK[key])
    args.batch = max(QUICK["batch"], jax.device_count())
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)

  rows, failed = [], []
  for model in args.models:
    for dtype in args.dtypes:
      try:
        row = train_case(model, dtype, args)
      except Exception as e:  # noqa: BLE001 (one case failing, e.g. out of memory, must not hide the others)
        traceback.print_exc()
        failed.append(f"{model} {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        continue
      rows.append(row)
      print(f"{model} {dtype}: {row['images_per_s']:.1f} images/s, compile {row['compile_s']:.1f} s"
            + (f", MFU {100 * row['mfu']:.1f} %" if row["mfu"] is not None else ""), flush=True)
  knn_row = None
  if args.knn_n:
    try:
      knn_row = knn_case(args)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      failed.append(f"knn: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(stamp=stamp, train=rows, knn=knn_row, failed=failed), f, indent=1)
  common.write_section(args.out, "GPU suite: training throughput, MFU, exact kNN",
                       markdown(stamp, args, rows, knn_row, failed))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
