"""Training-step throughput (images/s), dml_jax vs the same model in PyTorch/timm, full fine-tuning at 224 px.

Both sides run the Proxy-Anchor baseline step on random images (the data pipeline is not timed):
backbone -> embedding head (ViT: Linear on the cls token; ResNet-50: GAP + GMP -> Linear) -> L2 ->
Proxy-Anchor loss over 100 classes (alpha 32, margin 0.1) -> element-wise gradient clamp at 10 -> AdamW
(wd 1e-4, proxies at 100x lr). Every parameter trains; ResNet BatchNorm uses batch statistics (torch
train mode) on both sides.

  ours   dml_jax: the trainer's own update step (dml_jax.train.step: jitted, donated, data-parallel over
         all local devices), float32 or --dtype bfloat16 compute with float32 parameters.
  torch  timm.create_model(name, num_classes=0) + torch.nn.Linear + pytorch-metric-learning's
         ProxyAnchorLoss + torch.optim.AdamW on one device (CUDA if available, else CPU with all
         cores); --dtype bfloat16 uses torch.autocast.

Each (model, implementation) runs in its own subprocess. Reported: median seconds per step over --steps
timed steps after --warmup untimed ones (which include XLA compilation, reported separately), images/s =
batch / median, and process CPU seconds per step.

  python benchmarks/train_step.py --batch 8 --steps 5
  python benchmarks/train_step.py --models vit_s16 --impls ours --batch 256 --steps 50 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {
    "vit_s16": dict(timm="vit_small_patch16_224", ours="vit_small_patch16_224", head="linear"),
    "resnet50": dict(timm="resnet50", ours="resnet50", head="gap_gmp_linear"),
}
NUM_CLASSES = 100
EMBEDDING = 512
LR = 1e-4


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def run_ours(model: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax.train import optim, step as step_lib, tree as tree_lib
  from dml_jax.train.config import default_config

  c = default_config()
  c.model.backbone = MODELS[model]["ours"]
  c.model.head = MODELS[model]["head"]
  c.model.embedding_dim = EMBEDDING
  c.model.bn_freeze = False
  c.model.bn_affine_trainable = True
  c.compute_dtype = dtype
  c.optim.lr = LR
  c.optim.warmup_epochs = 0
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), method_frozen=method.frozen_paths(params))
  phase = plan.phase(0)
  mesh = step_lib.make_mesh()
  if batch % mesh.size:
    raise SystemExit(f"--batch {batch} must be a multiple of the {mesh.size} devices")
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params))
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(phase, params), jax.random.key(1))
  state = jax.device_put(state, step_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  data = step_lib.shard_batch({"image": rng.normal(size=(batch, 224, 224, 3)).astype(np.float32),
                               "label": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)}, mesh)
  lrs, epoch = step_lib.learning_rate_args(phase, 0)
  update = cache.update_fn(phase)
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = update(state, data, lrs, epoch)
    jax.block_until_ready(metrics["loss"])
  warmup_s = time.perf_counter() - t0
  times, cpu0 = [], _cpu_seconds()
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = update(state, data, lrs, epoch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / steps,
              device=f"{jax.devices()[0].platform} x{mesh.size} ({jax.devices()[0].device_kind})",
              loss=float(metrics["loss"]), versions=f"jax {jax.__version__}")


def run_torch(model: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  import numpy as np
  import timm
  import torch
  from pytorch_metric_learning import losses as pml_losses

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  net = timm.create_model(MODELS[model]["timm"], pretrained=False, num_classes=0).to(device).train()
  feat_dim = net.num_features
  head = torch.nn.Linear(feat_dim, EMBEDDING).to(device)
  torch.nn.init.kaiming_normal_(head.weight, mode="fan_out")
  torch.nn.init.zeros_(head.bias)
  criterion = pml_losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING, margin=0.1, alpha=32).to(device)
  opt = torch.optim.AdamW([{"params": list(net.parameters()) + list(head.parameters())},
                           {"params": criterion.parameters(), "lr": LR * 100}], lr=LR, weight_decay=1e-4)
  is_cnn = MODELS[model]["head"] == "gap_gmp_linear"
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.normal(size=(batch, 3, 224, 224)).astype(np.float32), device=device)
  labels = torch.tensor(rng.integers(0, NUM_CLASSES, size=batch), device=device)
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      if is_cnn:
        fmap = net.forward_features(images)
        pooled = fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))
      else:
        pooled = net(images)
      emb = head(pooled).float()
    emb = emb / torch.sqrt((emb ** 2).sum(dim=1, keepdim=True) + 1e-12)
    loss = criterion(emb, labels)
    loss.backward()
    torch.nn.utils.clip_grad_value_(list(net.parameters()) + list(head.parameters()), 10)
    torch.nn.utils.clip_grad_value_(criterion.parameters(), 10)
    opt.step()
    return loss

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = step()
    sync()
  warmup_s = time.perf_counter() - t0
  times, cpu0 = [], _cpu_seconds()
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t)
  name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / steps, device=name,
              loss=float(loss), versions=f"torch {torch.__version__}, timm {timm.__version__}")


def _child(args) -> None:
  fn = run_ours if args.impl == "ours" else run_torch
  result = fn(args.model, args.batch, args.steps, args.warmup, args.dtype)
  print("RESULT " + json.dumps(result))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
  p.add_argument("--batch", type=int, default=8, help="global batch (images per step)")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--json", default="", help="also write the results to this file")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  p.add_argument("--impl", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return

  rows = []
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for model in args.models:
    for impl in args.impls:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--impl", impl, "--batch",
             str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        print(f"{model} {impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        continue
      r = json.loads(lines[-1][len("RESULT "):])
      median = statistics.median(r["times"])
      row = dict(model=model, impl=impl, batch=args.batch, dtype=args.dtype, median_s=median,
                 images_per_s=args.batch / median, min_s=min(r["times"]), warmup_s=r["warmup_s"],
                 cpu_s_per_step=r["cpu_per_step"], device=r["device"], versions=r["versions"], loss=r["loss"])
      rows.append(row)
      print(f"{model:9s} {impl:6s} batch {args.batch:4d} {args.dtype:9s} {row['images_per_s']:9.2f} images/s "
            f"(median {median:.3f} s/step, min {row['min_s']:.3f}, warm-up {row['warmup_s']:.1f} s, "
            f"CPU {row['cpu_s_per_step']:.2f} s/step) on {row['device']}", flush=True)
  meta = dict(python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
