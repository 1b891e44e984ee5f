"""GPU suite: training throughput and MFU, VPTSP-G against full fine-tuning, the SOP-sized metric suite, exact kNN
and the same models in PyTorch (eager, torch.compile) on the same device, with the performance targets, in one call.

  python benchmarks/gpu_suite.py --out docs/benchmarks/gpu_suite.md && python benchmarks/assemble_docs.py
  python benchmarks/gpu_suite.py --peak_tflops 989 --peak_tflops_f32 495 --out docs/benchmarks/gpu_suite.md
  python benchmarks/gpu_suite.py --batch 256 vit_s16=512 --budget 450     # per-model batch; total time budget
  python benchmarks/gpu_suite.py --quick                                   # tiny sizes on CPU: checks that it runs

Training (ours): the Proxy-Anchor baseline step of dml_jax's trainer (`dml_jax.train.step`: jitted, donated,
data-parallel over every local device) on random 224 px images, for ViT-S/16, ViT-B/16 (Linear head on the cls
token) and ResNet-50 (GAP + GMP -> Linear, BatchNorm with batch statistics), each in float32 and with
`compute_dtype='bfloat16'` (float32 parameters and optimizer state): 512-d embedding, 100 classes, AdamW,
every parameter trains. Batch per model: --batch (default 256 each, for an H200's 141 GB; a step that runs out
of memory is retried at half the batch, at most twice, and the table says so). Each case compiles the step ahead
of time (compile time reported), runs --warmup steps, then --repeats timed runs of --steps steps each (waiting
for the last one): min / median / max seconds per step, images/s at the median.

MFU: the FLOPs of one step from XLA's cost analysis of the compiled program (the per-device program under SPMD:
each device's share of the global batch), divided by the median step time and by one device's peak. The peak
comes from --peak_tflops (bfloat16 rows) and --peak_tflops_f32 (float32 rows), or from PEAK_TFLOPS by the
device's name: dense (no sparsity) tensor-core figures of the vendor's data sheets, TF32 for float32, which is
what XLA uses for float32 matmuls on these GPUs at JAX's default precision. With no peak known (a CPU) the MFU
column says so. XLA counts every floating-point operation of the program (2 per multiply-add), the
optimizer and the loss included, so the figure is comparable across implementations only roughly; GFLOPs per
image (per-device FLOPs x devices / batch) are printed as a check (ViT-B/16 at 224 px: about 3 x 17.6).

VPTSP-G: dml_jax's method `vptsp` with a released ViT-B/16 recipe (--vptsp_recipe, default configs/cars_vitb.py:
task prompts N = 80 in 10 blocks, class prompts m = 50 in 8 blocks, BitFit, GRU semantic proxies, AdamW) on a
random frozen ViT-B (no weights directory; benchmarks/train_step.py's `vptsp_config`), the trainer's update step
at ViT-B/16's batch and --vptsp_dtype, timed as above; against the full fine-tuning row of the same ViT-B/16 at
that dtype (ratio of step times; batches of B/2 classes x 2, at least 100 classes).

Metric suite: benchmarks/eval_metrics.py's "sop" case (60,502 x 512 synthetic embeddings, 11,316 classes of 2-12)
through its own worker with backend 'jax' (chunked JAX kNN and JAX k-means, the GPU path without faiss-gpu):
Recall@1/10/100/1000, precision@1, R-Precision, MAP@R, then NMI and F1 (k-means, 20 iterations), from numpy
embeddings on the host (transfers included): the first run (compilation) apart, then --metric_repeats runs.

kNN: dml_jax's exact JAX kNN (`dml_jax.eval.knn`, backend='jax') on --knn_n random unit embeddings of --knn_dim
dimensions, leave-one-out, k = --knn_k: one untimed call (compilation), then --repeats timed calls.

PyTorch: the same three models through benchmarks/train_step.py's torch side (timm, random init, num_classes=0,
+ Linear head, pytorch-metric-learning's ProxyAnchorLoss or, without it, the same loss in plain torch, AdamW,
gradient clamp) on the same device: eager float32 (TF32 matmuls, as XLA's default), eager with
torch.autocast(bfloat16), and torch.compile (forward and loss; bfloat16 autocast); --torch_steps steps per
timed run, --torch_repeats runs, after --warmup steps (the first step, compilation included, reported apart).
Without torch / timm these rows are skipped with a note; a torch.compile failure is reported in the table.
ours / torch = ours' images/s at the same dtype / torch's.

Targets (shown measured, met or not): ViT-B/16 ours >= 1.5x PyTorch eager and >= 1.0x torch.compile per image
(bfloat16 against bfloat16 autocast); >= 40 % MFU for ViT-B/16 bfloat16; VPTSP-G step <= 0.7x the full
fine-tuning step; the SOP-sized metric suite (steady run) <= 2 s.

Process layout and budget: the parent never touches the device; it runs the cases in priority order (ViT-B/16
and the targets first) in child processes, ours (jax) and torch apart so that neither holds the other's device
memory, each child printing one RESULT line per case. --budget seconds (default 450) bounds the whole call: a
case is not started when too little time is left (it is listed as skipped), and a child still running at the
deadline (+ 15 s) is killed. --parts selects train / vptsp / metrics / knn / torch.

--json FILE writes every figure; --out FILE the markdown section of docs/benchmarks.md (stamp, device, tables,
targets). The exit status is 1 when a case failed (out of memory after two halvings, an error; a torch.compile
failure is only reported). --quick: 64 px, ViT depth 2, one bottleneck per ResNet stage, batch 4, 2 steps,
2 repeats, a 2,000 x 64 metric suite, 2,000 embeddings for kNN, torch for ViT-B/16 only (eager only on a CPU);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
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
TITLES = {"vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16", "resnet50": "ResNet-50"}
DTYPES = ("float32", "bfloat16")
DEFAULT_BATCH = {"vit_s16": 256, "vit_b16": 256, "resnet50": 256}  # H200, 141 GB
TORCH_MODES = {  # name: (dtype, torch.compile)
    "eager_fp32": ("float32", False),
    "eager_bf16": ("bfloat16", False),
    "compile_bf16": ("bfloat16", True),
}
NUM_CLASSES = 100
EMBEDDING = 512
PARTS = ("train", "vptsp", "metrics", "knn", "torch")
# Least time left (seconds) to start a case of each kind; a case started later may be killed at the deadline.
MIN_LEFT = {"train": 30, "vptsp": 45, "metrics": 20, "knn": 15, "torch": 20, "torch_compile": 60}
KILL_GRACE_S = 15
TARGETS = dict(eager=1.5, compile=1.0, mfu=0.40, vptsp=0.7, metrics_s=2.0)
# Dense peak TFLOP/s per device (no sparsity): (bfloat16, float32 as TF32). Matched in order against the lower-cased
# jax device_kind (e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB').
PEAK_TFLOPS = (
    ("h200", (989.0, 494.5)),
    ("h100 pcie", (756.0, 378.0)),
    ("h100", (989.0, 494.5)),  # SXM
    ("a100", (312.0, 156.0)),
)
QUICK = dict(image_size=64, vit_depth=2, resnet_layers=(1, 1, 1, 1), batch=4, steps=2, warmup=1, repeats=2,
             knn_n=2000, knn_dim=64, metric_items=2000, metric_classes=400, metric_dim=64, metric_repeats=1,
             torch_steps=2, torch_repeats=2)


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


def parse_batches(tokens: list[str] | None) -> dict[str, int]:
  """--batch tokens: N (every model) and / or MODEL=N, later ones winning."""
  batches = dict(DEFAULT_BATCH)
  for token in tokens or []:
    name, _, value = token.rpartition("=")
    if name and name not in MODELS:
      raise SystemExit(f"--batch {token}: unknown model {name} (one of {', '.join(MODELS)})")
    for model in [name] if name else list(MODELS):
      batches[model] = int(value)
  return batches


def _error(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory", "oom when"))


# -- ours (jax) -------------------------------------------------------------------------------------------------


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


def _vptsp_config(recipe: str, dtype: str, batch: int):
  """The released recipe on a random frozen ViT, built by benchmarks/train_step.py (tiny under --quick)."""
  from benchmarks import train_step

  c = train_step.vptsp_config(recipe)
  c.compute_dtype = dtype
  c.data.batch_size = batch
  return c


def time_update_step(c, batch: int, num_classes: int, args) -> dict:
  """Compiles and times the trainer's update step of config `c`; returns the figures of one table row."""
  import jax
  import numpy as np

  from benchmarks import train_step
  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim
  from dml_jax.train import step as step_lib

  method = methods.build(c, num_classes=num_classes)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  phase = plan.groups(0)
  mesh = step_lib.make_mesh()
  if batch % mesh.size:
    raise ValueError(f"batch {batch} must be a multiple of the {mesh.size} devices")
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params))
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(phase, params), jax.random.key(1))
  state = jax.device_put(state, step_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  size = c.dataset.image_size
  data = step_lib.shard_batch({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                               "label": train_step.batch_labels(c, batch, num_classes, rng)}, mesh)
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
  dtype = c.compute_dtype
  peak = peak_for(device.device_kind, dtype, args)
  mfu = flops / median / (peak * 1e12) if flops is not None and peak else None
  flat = tree_lib.flatten(params)
  del state, data, compiled
  return dict(dtype=dtype, batch=batch, devices=mesh.size, device_kind=device.device_kind, compile_s=compile_s,
              step_s=per_step, median_s=median, images_per_s=batch / median, flops_per_device_step=flops,
              gflops_per_image=None if flops is None else flops * mesh.size / batch / 1e9, peak_tflops=peak,
              mfu=mfu, loss=loss, trainable=sum(int(flat[p].size) for p in phase.trainable))


def with_oom_retry(run, batch: int, multiple: int = 1) -> dict:
  """run(batch) -> row; out of memory: again at half the batch (a multiple of `multiple`), at most twice."""
  notes = []
  for attempt in range(3):
    try:
      row = run(batch)
      row["oom_notes"] = notes
      return row
    except Exception as e:  # noqa: BLE001
      if not _is_oom(e) or attempt == 2 or batch // 2 < multiple:
        if notes:
          e.args = (f"{e} (after {'; '.join(notes)})",)
        raise
      notes.append(f"batch {batch} out of memory")
      batch = max(multiple, batch // 2 // multiple * multiple)
      gc.collect()
  raise AssertionError("unreachable")


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


def metrics_case(args) -> dict:
  """eval_metrics.py's SOP case, its worker with backend 'jax': retrieval then clustering, per run."""
  import jax

  from benchmarks import eval_metrics

  case = dict(eval_metrics.CASES["sop"])
  if args.quick:
    case.update(num_items=QUICK["metric_items"], num_classes=QUICK["metric_classes"], dim=QUICK["metric_dim"])
  result = eval_metrics.worker("ours_jax", case, niter=20, skip_clustering=False, repeats=args.metric_repeats)
  total = [r + c for r, c in zip(result["retrieval_s"], result["clustering_s"])]
  return dict(case, **result, total_s=total, total_first_s=result["retrieval_first_s"] + result["clustering_first_s"],
              device=str(jax.devices()[0].device_kind), devices=jax.device_count())


def run_ours_case(spec: dict, args, used_batch: dict) -> dict:
  kind = spec["kind"]
  if kind == "train":
    model, dtype = spec["model"], spec["dtype"]
    row = with_oom_retry(lambda b: time_update_step(_config(model, dtype, args.quick), b, NUM_CLASSES, args),
                         spec["batch"])
    used_batch[(model, dtype)] = row["batch"]
    return dict(row, model=model)
  if kind == "vptsp":
    dtype = spec["dtype"]
    batch = used_batch.get(("vit_b16", dtype), spec["batch"])  # the full fine-tuning row's batch after OOM halving

    def run(b):
      c = _vptsp_config(args.vptsp_recipe, dtype, b)
      return time_update_step(c, b, max(NUM_CLASSES, b // c.data.samples_per_class), args)

    return dict(with_oom_retry(run, batch, multiple=2), model="vit_b16_vptsp", recipe=args.vptsp_recipe)
  if kind == "metrics":
    return metrics_case(args)
  if kind == "knn":
    return knn_case(args)
  raise ValueError(kind)


# -- PyTorch ----------------------------------------------------------------------------------------------------


def run_torch_case(spec: dict, args) -> dict:
  import torch

  from benchmarks import train_step

  model, mode = spec["model"], spec["mode"]
  dtype, compiled = TORCH_MODES[mode]
  timm_name, head = MODELS[model]

  def run(batch):
    impl = None
    try:
      t0 = time.perf_counter()
      impl = train_step.make_torch(model, batch, dtype, spec=dict(timm=timm_name, head=head), compile=compiled)
      build_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      impl.step()  # torch.compile compiles here
      first_s = time.perf_counter() - t0
      for _ in range(args.warmup - 1):
        impl.step()
      per_step = []
      for _ in range(args.torch_repeats):
        t0 = time.perf_counter()
        for _ in range(args.torch_steps):
          loss = impl.step()  # synchronises (cuda) and returns the loss
        per_step.append((time.perf_counter() - t0) / args.torch_steps)
      median = common.spread(per_step)[1]
      return dict(batch=batch, build_s=build_s, first_step_s=first_s, step_s=per_step, median_s=median,
                  images_per_s=batch / median, loss=loss, device=impl.device, versions=impl.versions)
    finally:
      del impl
      gc.collect()
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
      if compiled:
        torch._dynamo.reset()

  return dict(with_oom_retry(run, spec["batch"]), model=model, mode=mode, dtype=dtype, compiled=compiled)


# -- child: runs a list of cases, one RESULT line each ---------------------------------------------------------


def child(args) -> None:
  from benchmarks import train_step

  train_step.QUICK["enabled"] = args.quick
  side = args.child
  if side == "torch":
    import torch

    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as XLA's default for float32 on these GPUs
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("RESULT " + json.dumps(dict(device=device, backend="cuda" if device != "cpu" else "cpu",
                                      versions=f"torch {torch.__version__}")), flush=True)
  else:
    import jax

    device = jax.devices()[0].device_kind
    print("RESULT " + json.dumps(dict(device=device, backend=jax.default_backend(), devices=jax.device_count(),
                                      versions=f"jax {jax.__version__}")), flush=True)
  used_batch: dict = {}
  for spec in json.loads(args.cases):
    need = MIN_LEFT["torch_compile" if spec.get("mode") == "compile_bf16" else spec["kind"]]
    left = args.deadline - time.time()
    if left < need:
      print("RESULT " + json.dumps(dict(case=spec, skipped=f"time budget: {left:.0f} s left, {need} s needed")),
            flush=True)
      continue
    if spec["kind"] == "torch" and TORCH_MODES[spec["mode"]][1] and args.quick and device == "cpu":
      print("RESULT " + json.dumps(dict(case=spec, skipped="torch.compile not run by --quick on a CPU")), flush=True)
      continue
    print(f"[{side}] {spec}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
      row = run_torch_case(spec, args) if side == "torch" else run_ours_case(spec, args, used_batch)
      out = dict(case=spec, row=row)
    except Exception as e:  # noqa: BLE001 (one case failing, e.g. out of memory, must not hide the others)
      traceback.print_exc()
      out = dict(case=spec, error=_error(e))
    out["wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out), flush=True)


def run_child(side: str, cases: list[dict], deadline: float, args, env: dict) -> tuple[list[dict], dict, str]:
  """Runs one child; returns its case results, its device line and a note (killed, crashed)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--cases", json.dumps(cases),
         "--deadline", repr(deadline), "--vptsp_recipe", args.vptsp_recipe]
  for key in ("steps", "warmup", "repeats", "torch_steps", "torch_repeats", "metric_repeats", "knn_n", "knn_dim",
              "knn_k"):
    cmd += [f"--{key}", str(getattr(args, key))]
  for key in ("peak_tflops", "peak_tflops_f32"):
    if getattr(args, key):
      cmd += [f"--{key}", str(getattr(args, key))]
  if args.quick:
    cmd.append("--quick")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)
  killed = []

  def kill():
    killed.append(True)
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: its compile workers too
    except ProcessLookupError:
      pass

  timer = threading.Timer(max(deadline + KILL_GRACE_S - time.time(), 1.0), kill)
  timer.start()
  results, info = [], {}
  for line in proc.stdout:
    if line.startswith("RESULT "):
      r = json.loads(line[len("RESULT "):])
      if "case" in r:
        results.append(r)
        print(f"  {side}: {_one_line(r)}", flush=True)
      else:
        info = r
    else:
      print(line, end="", flush=True)
  rc = proc.wait()
  timer.cancel()
  done = {json.dumps(r["case"], sort_keys=True) for r in results}
  note = "killed at the time budget" if killed else (f"child exited with status {rc}" if rc else "")
  for spec in cases:
    if json.dumps(spec, sort_keys=True) not in done:
      results.append(dict(case=spec, error=note or "no result") if rc and not killed else
                      dict(case=spec, skipped=note or "no result"))
  return results, info, note


def _label(spec: dict) -> str:
  if spec["kind"] == "train":
    return f"ours {spec['model']} {spec['dtype']}"
  if spec["kind"] == "vptsp":
    return f"ours VPTSP-G ViT-B/16 {spec['dtype']}"
  if spec["kind"] == "torch":
    return f"torch {spec['model']} {spec['mode']}"
  return {"metrics": "SOP-sized metric suite", "knn": "exact kNN"}[spec["kind"]]


def _one_line(r: dict) -> str:
  label = _label(r["case"])
  if "skipped" in r:
    return f"{label}: skipped ({r['skipped']})"
  if "error" in r:
    return f"{label}: FAILED {r['error']}"
  row = r["row"]
  if "images_per_s" in row:
    extra = f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") is not None else ""
    return f"{label}: batch {row['batch']}, {row['images_per_s']:.1f} images/s{extra} ({r['wall_s']:.0f} s)"
  if "total_s" in row:
    return f"{label}: {common.spread(row['total_s'])[1]:.2f} s per run ({r['wall_s']:.0f} s)"
  return f"{label}: {common.spread(row['seconds'])[1]:.2f} s ({r['wall_s']:.0f} s)"


def plan(args, batches: dict[str, int]) -> list[tuple[str, list[dict]]]:
  """The cases in priority order (ViT-B/16 and the targets first), grouped into children by side."""
  parts = set(args.parts)
  models = [m for m in ("vit_b16", "vit_s16", "resnet50") if m in args.models]
  dtypes = [d for d in ("bfloat16", "float32") if d in args.dtypes]
  first = [m for m in models if m == "vit_b16"]
  rest = [m for m in models if m != "vit_b16"]
  groups: list[tuple[str, list[dict]]] = []

  def train(ms):
    return [dict(kind="train", model=m, dtype=d, batch=batches[m]) for m in ms for d in dtypes] if "train" in parts \
        else []

  def torch_cases(ms, modes):
    return [dict(kind="torch", model=m, mode=mode, batch=batches[m]) for m in ms for mode in modes] \
        if "torch" in parts else []

  ours1 = train(first) + ([dict(kind="vptsp", dtype=args.vptsp_dtype, batch=batches["vit_b16"])]
                          if "vptsp" in parts else []) + ([dict(kind="metrics")] if "metrics" in parts else [])
  eager = [m for m in args.torch_modes if not TORCH_MODES[m][1]]
  compiled = [m for m in args.torch_modes if TORCH_MODES[m][1]]
  torch1 = torch_cases(first, [m for m in ("eager_bf16", "compile_bf16", "eager_fp32") if m in args.torch_modes])
  ours2 = train(rest) + ([dict(kind="knn")] if "knn" in parts and args.knn_n else [])
  torch2 = [] if args.quick else torch_cases(rest, eager) + torch_cases(rest, compiled)  # --quick: ViT-B/16 only
  for side, cases in (("ours", ours1), ("torch", torch1), ("ours", ours2), ("torch", torch2)):
    if cases:
      groups.append((side, cases))
  return groups


# -- the section ------------------------------------------------------------------------------------------------


def _mfu(r: dict) -> str:
  return f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:g}" if r.get("mfu") is not None else "no peak known"


def _batch(r: dict) -> str:
  return f"{r['batch']}" + (f" ({'; '.join(r['oom_notes'])}: halved)" if r.get("oom_notes") else "")


def summarise(results: list[dict]) -> dict:
  """Rows by kind, and the figures the targets need."""
  ok = [r for r in results if "row" in r]
  train = [r["row"] for r in ok if r["case"]["kind"] == "train"]
  vptsp = next((r["row"] for r in ok if r["case"]["kind"] == "vptsp"), None)
  torch_rows = [r["row"] for r in ok if r["case"]["kind"] == "torch"]
  speed = {(r["model"], r["dtype"]): r for r in train}
  torch_by = {(r["model"], r["mode"]): r for r in torch_rows}
  full = speed.get(("vit_b16", vptsp["dtype"])) if vptsp else None
  return dict(train=train, vptsp=vptsp, full=full, torch=torch_rows, speed=speed, torch_by=torch_by,
              metrics=next((r["row"] for r in ok if r["case"]["kind"] == "metrics"), None),
              knn=next((r["row"] for r in ok if r["case"]["kind"] == "knn"), None))


def _why_missing(results: list[dict], match) -> str:
  for r in results:
    if match(r["case"]):
      if "skipped" in r:
        return f"skipped: {r['skipped']}"
      if "error" in r:
        return f"failed: {r['error']}"
  return "not run"


def targets(s: dict, results: list[dict], args) -> list[list[str]]:
  rows = []

  def verdict(value, ok):
    return "met" if ok else "**not met**"

  ours_b = s["speed"].get(("vit_b16", "bfloat16"))
  for mode, key, label in (("eager_bf16", "eager", "PyTorch eager (bf16 autocast)"),
                           ("compile_bf16", "compile", "torch.compile (bf16 autocast)")):
    t = s["torch_by"].get(("vit_b16", mode))
    goal = f">= {TARGETS[key]:.1f}x"
    name = f"ViT-B/16 train step, ours bf16 / {label}, images/s"
    if ours_b and t:
      ratio = ours_b["images_per_s"] / t["images_per_s"]
      rows.append([name, goal, f"{ratio:.2f}x", verdict(ratio, ratio >= TARGETS[key])])
    else:
      why = (_why_missing(results, lambda c: c["kind"] == "train" and c.get("model") == "vit_b16"
                          and c.get("dtype") == "bfloat16") if not ours_b else
             _why_missing(results, lambda c, m=mode: c["kind"] == "torch" and c.get("model") == "vit_b16"
                          and c.get("mode") == m))
      rows.append([name, goal, "-", f"not measured ({why})"])
  name, goal = "ViT-B/16 bf16 train step MFU", f">= {100 * TARGETS['mfu']:.0f} %"
  if ours_b and ours_b.get("mfu") is not None:
    rows.append([name, goal, f"{100 * ours_b['mfu']:.1f} %", verdict(ours_b["mfu"], ours_b["mfu"] >= TARGETS["mfu"])])
  else:
    rows.append([name, goal, "-", "not measured (" + ("no peak known for this device" if ours_b else _why_missing(
        results, lambda c: c["kind"] == "train" and c.get("model") == "vit_b16" and c.get("dtype") == "bfloat16"))
        + ")"])
  name, goal = "VPTSP-G step / full fine-tuning step (ViT-B/16, same batch)", f"<= {TARGETS['vptsp']:.1f}x"
  if s["vptsp"] and s["full"]:
    ratio = s["vptsp"]["median_s"] / s["full"]["median_s"] * s["full"]["batch"] / s["vptsp"]["batch"]
    rows.append([name, goal, f"{ratio:.2f}x", verdict(ratio, ratio <= TARGETS["vptsp"])])
  else:
    why = _why_missing(results, lambda c: c["kind"] == "vptsp") if not s["vptsp"] else \
        f"no full fine-tuning row at {s['vptsp']['dtype']}"
    rows.append([name, goal, "-", f"not measured ({why})"])
  name, goal = "SOP-sized metric suite (JAX backend), steady run", f"<= {TARGETS['metrics_s']:.0f} s"
  if s["metrics"]:
    total = common.spread(s["metrics"]["total_s"])[1]
    rows.append([name, goal, f"{total:.2f} s", verdict(total, total <= TARGETS["metrics_s"])])
  else:
    rows.append([name, goal, "-", f"not measured ({_why_missing(results, lambda c: c['kind'] == 'metrics')})"])
  if args.quick:
    rows = [r[:3] + [f"({r[3]}: --quick, meaningless)"] for r in rows]
  return rows


def markdown(stamp: dict, args, results: list[dict], devices: dict, notes: list[str]) -> list[str]:
  s = summarise(results)
  size = "64 px, tiny models (--quick)" if args.quick else "224 px"
  ours_dev, torch_dev = devices.get("ours", {}), devices.get("torch", {})
  lines = common.stamp_lines(stamp) + [""]
  where = ours_dev.get("device") or torch_dev.get("device") or "?"
  lines += [f"Device: **{where}**" + (f" (x {ours_dev['devices']}, jax backend {ours_dev['backend']})"
                                      if ours_dev else "")
            + (f"; torch on {torch_dev['device']}" if torch_dev else "") + f"; time budget {args.budget:.0f} s.", ""]
  if s["train"]:
    lines += [f"Training step, ours (dml_jax trainer, Proxy-Anchor baseline, AdamW, {EMBEDDING}-d, {NUM_CLASSES} "
              f"classes, random {size} images); step time over {args.repeats} runs of {args.steps} steps after "
              f"{args.warmup} warm-up steps; MFU = XLA cost-analysis FLOPs per device / median step time / peak.", ""]
    lines += common.table(
        ["model", "dtype", "batch", "compile s", "s / step (min / median / max)", "images/s", "GFLOPs / image",
         "MFU"],
        [[TITLES[r["model"]], r["dtype"], _batch(r), f"{r['compile_s']:.1f}", common.fmt_spread(r["step_s"], 4),
          f"{r['images_per_s']:.1f}", "?" if r["gflops_per_image"] is None else f"{r['gflops_per_image']:.1f}",
          _mfu(r)] for r in s["train"]], "llrrrrrr")
    lines.append("")
    sp = {key: r["images_per_s"] for key, r in s["speed"].items()}
    ratios = [f"{TITLES[m]} {sp[(m, 'bfloat16')] / sp[(m, 'float32')]:.2f}x" for m in MODELS
              if (m, "bfloat16") in sp and (m, "float32") in sp]
    if ratios:
      lines += ["bfloat16 over float32 (images/s): " + ", ".join(ratios) + ".", ""]
  if s["vptsp"]:
    v, f = s["vptsp"], s["full"]
    lines += [f"VPTSP-G against full fine-tuning, ViT-B/16 ({v['recipe']} on a random frozen ViT-B, {v['dtype']}; "
              f"trainable parameters {v['trainable']:,}" + (f" against {f['trainable']:,}" if f else "") + "):", ""]
    table_rows = [["VPTSP-G (prompts, BitFit, GRU proxies)", _batch(v), f"{v['compile_s']:.1f}",
                   common.fmt_spread(v["step_s"], 4), f"{v['images_per_s']:.1f}", _mfu(v)]]
    if f:
      table_rows.append(["full fine-tuning (Proxy-Anchor)", _batch(f), f"{f['compile_s']:.1f}",
                         common.fmt_spread(f["step_s"], 4), f"{f['images_per_s']:.1f}", _mfu(f)])
    lines += common.table(["step", "batch", "compile s", "s / step (min / median / max)", "images/s", "MFU"],
                          table_rows, "lrrrrr")
    lines.append("")
    if f:
      lines += [f"VPTSP-G / full fine-tuning, time per image: "
                f"{v['median_s'] / v['batch'] / (f['median_s'] / f['batch']):.2f}x.", ""]
  m = s["metrics"]
  if m:
    lines += [f"SOP-sized metric suite (benchmarks/eval_metrics.py's sop case, backend 'jax'): {m['num_items']:,} x "
              f"{m['dim']} embeddings, {m['num_classes']:,} classes, Recall@{{{', '.join(map(str, m['recall_ks']))}}}, "
              f"precision@1, R-Precision, MAP@R, NMI and F1 (k-means, 20 iterations), from host numpy (transfers "
              f"included), on {m['devices']} x {m['device']}:", ""]
    lines += common.table(
        ["part", "first run s (compilation)", f"steady s (min / median / max of {len(m['total_s'])})"],
        [["retrieval (kNN + metrics)", f"{m['retrieval_first_s']:.2f}", common.fmt_spread(m["retrieval_s"], 2)],
         ["clustering (k-means + NMI, F1)", f"{m['clustering_first_s']:.2f}", common.fmt_spread(m["clustering_s"], 2)],
         ["**whole suite**", f"{m['total_first_s']:.2f}", common.fmt_spread(m["total_s"], 2)]], "lrr")
    lines += ["", f"Values: Recall@1 {m.get('recall@1', float('nan')):.4f}, MAP@R {m.get('map@r', float('nan')):.4f}, "
              f"NMI {m.get('nmi', float('nan')):.4f} (synthetic embeddings: a check that it computed, nothing more).",
              ""]
  k = s["knn"]
  if k:
    lines += [f"Exact kNN (JAX backend, cosine, leave-one-out): {k['n']:,} x {k['dim']}-d random unit "
              f"vectors, every item a query against all, k = {k['k']}, on {k['devices']} x "
              f"{k['device']}: {common.fmt_spread(k['seconds'])} s (min / median / max of "
              f"{len(k['seconds'])}; the first call, compilation included, {k['first_s']:.2f} s), "
              f"{k['queries_per_s']:,.0f} queries/s.", ""]
  torch_results = [r for r in results if r["case"]["kind"] == "torch"]
  if torch_results:
    versions = next((r["versions"] for r in s["torch"]), torch_dev.get("versions", ""))
    lines += [f"PyTorch on the same device ({versions}; timm, random init, num_classes=0, + Linear head, "
              f"Proxy-Anchor, AdamW; eager float32 with TF32 matmuls, eager with bf16 autocast, torch.compile of "
              f"forward and loss with bf16 autocast); {args.torch_repeats} runs of {args.torch_steps} steps after "
              f"{args.warmup} warm-up steps, the first (compilation) apart. ours / torch = ours' images/s at the same "
              f"dtype over torch's:", ""]
    table_rows = []
    for r in torch_results:
      c = r["case"]
      mode = c["mode"].replace("_", " ")
      if "row" not in r:
        table_rows.append([TITLES[c["model"]], mode, c["batch"], "-", "-", "-", "-",
                           f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}"])
        continue
      t = r["row"]
      ours = s["speed"].get((t["model"], t["dtype"]))
      table_rows.append([TITLES[t["model"]], mode, _batch(t), f"{t['first_step_s']:.1f}",
                         common.fmt_spread(t["step_s"], 4), f"{t['images_per_s']:.1f}",
                         f"{ours['images_per_s'] / t['images_per_s']:.2f}x" if ours else "-", ""])
    lines += common.table(["model", "mode", "batch", "first step s", "s / step (min / median / max)", "images/s",
                           "ours / torch", "note"], table_rows, "llrrrrrl")
    lines.append("")
  lines += ["Targets (measured here, met or not):", ""]
  lines += common.table(["target", "goal", "measured", "status"], targets(s, results, args), "lrrl")
  lines.append("")
  skipped = [f"{_label(r['case'])} ({r['skipped']})" for r in results
             if "skipped" in r and r["case"]["kind"] != "torch"]
  failed = [f"{_label(r['case'])}: {r['error']}" for r in results if "error" in r and r["case"]["kind"] != "torch"]
  if skipped:
    lines += ["Skipped: " + "; ".join(skipped) + ".", ""]
  if failed:
    lines += ["**Failed:** " + "; ".join(failed), ""]
  if notes:
    lines += ["Notes: " + "; ".join(notes) + ".", ""]
  if args.quick:
    lines.append("(--quick: tiny sizes that check the benchmark runs; the figures mean nothing.)")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
  parser.add_argument("--batch", nargs="+", default=None, metavar="[MODEL=]N",
                      help="global batch, for every model (N) or one (MODEL=N); default "
                           + ", ".join(f"{m}={b}" for m, b in DEFAULT_BATCH.items()))
  parser.add_argument("--steps", type=int, default=20, help="steps per timed run (ours)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs (ours' training) and calls (kNN)")
  parser.add_argument("--torch_steps", type=int, default=10, help="steps per timed run (torch)")
  parser.add_argument("--torch_repeats", type=int, default=3, help="timed runs (torch)")
  parser.add_argument("--torch_modes", nargs="+", default=list(TORCH_MODES), choices=list(TORCH_MODES))
  parser.add_argument("--vptsp_recipe", default="cars_vitb.py", help="a VPTSP-G ViT-B/16 config in configs/")
  parser.add_argument("--vptsp_dtype", default="bfloat16", choices=list(DTYPES))
  parser.add_argument("--metric_repeats", type=int, default=3, help="steady runs of the metric suite")
  parser.add_argument("--peak_tflops", type=float, default=None, help="one device's dense bfloat16 peak, TFLOP/s")
  parser.add_argument("--peak_tflops_f32", type=float, default=None,
                      help="one device's float32 peak (TF32 tensor cores on GPUs), TFLOP/s")
  parser.add_argument("--knn_n", type=int, default=200_000, help="embeddings for the kNN timing (0: skip it)")
  parser.add_argument("--knn_dim", type=int, default=EMBEDDING)
  parser.add_argument("--knn_k", type=int, default=16)
  parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole call; later cases skip")
  parser.add_argument("--quick", action="store_true", help="tiny sizes on any device: checks that it runs")
  parser.add_argument("--json", default=None, help="write every figure to this file")
  parser.add_argument("--out", default=None, help="write the markdown section to this file")
  parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--cases", help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return 0
  start = time.time()
  deadline = start + args.budget
  stamp = common.stamp(argv if argv is None else [sys.argv[0], *argv])
  batches = parse_batches(args.batch)
  if args.quick:
    for key in ("steps", "warmup", "repeats", "knn_n", "knn_dim", "metric_repeats", "torch_steps", "torch_repeats"):
      setattr(args, key, QUICK[key])
    batches = {m: QUICK["batch"] for m in MODELS}
  notes = []
  missing = [p for p in ("torch", "timm") if importlib.util.find_spec(p) is None]
  if "torch" in args.parts and missing:
    args.parts = [p for p in args.parts if p != "torch"]
    notes.append(f"PyTorch rows skipped: {' and '.join(missing)} not installed")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
  results, devices = [], {}
  for side, cases in plan(args, batches):
    if deadline - time.time() < min(MIN_LEFT.values()):
      results += [dict(case=c, skipped="time budget spent") for c in cases]
      continue
    print(f"== {side}: {len(cases)} case(s), {deadline - time.time():.0f} s of the budget left", flush=True)
    got, info, note = run_child(side, cases, deadline, args, env)
    results += got
    if info:
      devices.setdefault(side, info)
    if note:
      notes.append(f"{side} child: {note}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(stamp=stamp, devices=devices, results=results, notes=notes, wall_s=time.time() - start), f,
                indent=1)
  print(f"total {time.time() - start:.0f} s", flush=True)
  common.write_section(args.out, "GPU suite: training throughput, MFU, VPTSP-G, metric suite, kNN, PyTorch",
                       markdown(stamp, args, results, devices, notes))
  failed = [r for r in results if "error" in r and not (r["case"]["kind"] == "torch"
                                                         and TORCH_MODES[r["case"]["mode"]][1])]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
