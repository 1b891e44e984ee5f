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

Prompt tuning: `vit_s16_vptsp` is VPTSP-G (docs/methods/vptsp.md) on the same ViT-S/16 at the same
batch, with the Cars196 ViT-S recipe (task prompts N = 80 in 11 blocks, class prompts m = 50 in 8 blocks,
BitFit, GRU semantic proxies, E = 384, AdamW; batches of B/2 classes x 2): the frozen ViT gets no
gradient, but the step runs two ViT passes (sample tower with task prompts, proxy tower with class
prompts). Its torch side restates the official step (architectures/peft_vit.py, criteria/
dml_proxy_peft.py) on timm. The last lines give prompt tuning / full fine-tuning per implementation.

Each (model, implementation) runs in its own subprocess. Reported: median seconds per step over --steps
timed steps after --warmup untimed ones (which include XLA compilation, reported separately), images/s =
batch / median, and process CPU seconds per step.

  python benchmarks/train_step.py --batch 8 --steps 5
  python benchmarks/train_step.py --models vit_s16 --impls ours --batch 256 --steps 50 --dtype bfloat16
  python benchmarks/train_step.py --models vit_s16 vit_s16_vptsp --batch 8 --steps 5
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
    "vit_s16_vptsp": dict(timm="vit_small_patch16_224", ours="vit_small_patch16_224", head="vptsp"),
}
NUM_CLASSES = 100
EMBEDDING = 512
LR = 1e-4


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def _vptsp_cars_config():
  """configs/vptsp_cars_vits.py (the official Cars ViT-S/16 setting) on a random-init ViT: no weights needed."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("vptsp_cars_vits", os.path.join(REPO, "configs", "vptsp_cars_vits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.weights = ""
  return c


def run_ours(model: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim, step as step_lib
  from dml_jax.train.config import default_config

  vptsp = MODELS[model]["head"] == "vptsp"
  if vptsp:
    c = _vptsp_cars_config()
    c.data.batch_size = batch
  else:
    c = default_config()
    c.method = methods.method_config("metric_loss")
    c.method.head = MODELS[model]["head"]
    c.method.bn_freeze = False
    c.model.backbone = MODELS[model]["ours"]
    c.model.embedding_dim = EMBEDDING
    c.optim.lr = LR
  c.compute_dtype = dtype
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  phase = plan.groups(0)
  mesh = step_lib.make_mesh()
  if batch % mesh.size:
    raise SystemExit(f"--batch {batch} must be a multiple of the {mesh.size} devices")
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params))
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(phase, params), jax.random.key(1))
  state = jax.device_put(state, step_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  if vptsp:  # B/k distinct classes, k contiguous images each (the class_random sampler)
    k = c.data.samples_per_class
    labels = np.repeat(rng.choice(NUM_CLASSES, batch // k, replace=False), k)
  else:
    labels = rng.integers(0, NUM_CLASSES, size=batch)
  data = step_lib.shard_batch({"image": rng.normal(size=(batch, 224, 224, 3)).astype(np.float32),
                               "label": labels.astype(np.int32)}, mesh)
  lrs, epoch = step_lib.learning_rate_args(phase, 0)
  update = cache.update_fn(phase, 0)
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
  flat = tree_lib.flatten(params)
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / steps,
              device=f"{jax.devices()[0].platform} x{mesh.size} ({jax.devices()[0].device_kind})",
              loss=float(metrics["loss"]), versions=f"jax {jax.__version__}",
              trainable=sum(int(flat[p].size) for p in phase.trainable))


def run_torch(model: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  if MODELS[model]["head"] == "vptsp":
    return run_torch_vptsp(batch, steps, warmup, dtype)
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

  return _time_torch(step, device, steps, warmup)


def run_torch_vptsp(batch: int, steps: int, warmup: int, dtype: str) -> dict:
  """The official VPTSP-G step (architectures/peft_vit.py, criteria/dml_proxy_peft.py) restated on timm."""
  import numpy as np
  import timm
  import torch
  import torch.nn.functional as F

  c = _vptsp_cars_config()
  o = c.method
  r = dict(embed=c.model.embedding_dim, k=c.data.samples_per_class, lr=c.optim.lr, decay=c.optim.weight_decay,
           lr_proxy=c.optim.groups[1][1]["lr"], alpha=o.proxy_bias_ratio,
           prompts=(o.num_prompts, o.prompt_depth, o.prompt_block_step),
           class_prompts=(o.num_class_prompts, o.class_prompt_depth, o.class_prompt_block_step))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).to(device).train()
  dim, emb_dim, k = vit.embed_dim, r["embed"], r["k"]
  trainable = []
  for name, p in vit.named_parameters():
    p.requires_grad_("bias" in name)  # BitFit
    if p.requires_grad:
      trainable.append(p)

  def xavier_normal(*shape):
    return torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.zeros(*shape, device=device)))

  (num, depth, task_step), (p_num, p_depth, p_step) = r["prompts"], r["class_prompts"]
  task = [xavier_normal(1, num, dim) for _ in range(depth)]
  cls_prompts = [xavier_normal(NUM_CLASSES, p_num, dim) for _ in range(p_depth)]
  heads = [torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, emb_dim)).to(device) for _ in range(2)]
  gru = {n: torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.zeros(emb_dim, emb_dim, device=device)))
         for n in ("W_ir", "W_hr", "W_iz", "W_hz", "W_in", "W_hn")}
  gru.update({n: torch.nn.Parameter(torch.zeros(emb_dim, device=device)) for n in ("b_ir", "b_iz", "b_in")})
  bias = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.zeros(NUM_CLASSES, emb_dim, device=device)) / 8)
  container = F.normalize(torch.nn.init.xavier_uniform_(torch.zeros(NUM_CLASSES, emb_dim, device=device)), dim=1)
  main = trainable + task + cls_prompts + [p for h in heads for p in h.parameters()] + list(gru.values())
  opt = torch.optim.AdamW(main, lr=r["lr"], weight_decay=r["decay"])
  p_opt = torch.optim.AdamW([bias], lr=r["lr_proxy"], weight_decay=r["decay"])
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.normal(size=(batch, 3, 224, 224)).astype(np.float32), device=device)
  labels = torch.tensor(np.repeat(rng.choice(NUM_CLASSES, batch // k, replace=False), k), device=device)
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def tower(x, prompts):
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for i, blk in enumerate(vit.blocks):
      if i < len(prompts) and prompts[i] is not None and prompts[i].shape[1]:
        n = prompts[i].shape[1]
        t = blk(torch.cat([prompts[i], t], dim=1))[:, n:]
      else:
        t = blk(t)
    return vit.norm(t)[:, 0]

  def step():
    nonlocal container
    opt.zero_grad(set_to_none=True)
    p_opt.zero_grad(set_to_none=True)
    with autocast:
      b = images.shape[0]
      e = F.normalize(heads[0](tower(images, [task[i][:, :max(num - i * task_step, 0)].expand(b, -1, -1)
                                               for i in range(depth)])).float(), dim=-1)
      p = F.normalize(heads[1](tower(images, [cls_prompts[i][labels, :max(p_num - i * p_step, 0)]
                                               for i in range(p_depth)])).float(), dim=-1)
    u = labels[::k]
    h = container[u]
    for j in range(k):
      x = p.view(b // k, k, -1)[:, j]
      z = torch.sigmoid(x @ gru["W_iz"] + h @ gru["W_hz"] + gru["b_iz"])
      rr = torch.sigmoid(x @ gru["W_ir"] + h @ gru["W_hr"] + gru["b_ir"])
      h = (1 - z) * F.relu(x @ gru["W_in"] + rr * (h @ gru["W_hn"]) + gru["b_in"]) + z * h
    container = container.clone()
    container[u] = h
    container = F.normalize(container, dim=-1)
    proxies = F.normalize(r["alpha"] * bias + (1 - r["alpha"]) * container, dim=-1)
    sims = e @ proxies.T
    pos = F.one_hot(labels, NUM_CLASSES).bool()
    neg_inf = torch.finfo(sims.dtype).min
    zeros = torch.zeros(1, NUM_CLASSES, device=device)

    def lse(logits, mask):  # the code's masked log-sum-exp with the extra 0 logit
      out = torch.logsumexp(torch.cat([logits.masked_fill(~mask, neg_inf), zeros]), dim=0)
      return out.masked_fill(~mask.any(0), 0)

    loss = lse(-32 * (sims - 0.1), pos).mean() + lse(32 * (sims + 0.1), ~pos).mean()
    loss.backward()
    opt.step()
    p_opt.step()
    container = container.detach()
    return loss

  return _time_torch(step, device, steps, warmup, trainable=sum(p.numel() for p in main) + bias.numel())


def _time_torch(step, device: str, steps: int, warmup: int, **extra) -> dict:
  import timm
  import torch

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
              loss=float(loss), versions=f"torch {torch.__version__}, timm {timm.__version__}", **extra)


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
                 cpu_s_per_step=r["cpu_per_step"], device=r["device"], versions=r["versions"], loss=r["loss"],
                 trainable=r.get("trainable"))
      rows.append(row)
      print(f"{model:9s} {impl:6s} batch {args.batch:4d} {args.dtype:9s} {row['images_per_s']:9.2f} images/s "
            f"(median {median:.3f} s/step, min {row['min_s']:.3f}, warm-up {row['warmup_s']:.1f} s, "
            f"CPU {row['cpu_s_per_step']:.2f} s/step) on {row['device']}", flush=True)
  by_key = {(r["model"], r["impl"]): r for r in rows}
  for impl in args.impls:
    full, prompt = by_key.get(("vit_s16", impl)), by_key.get(("vit_s16_vptsp", impl))
    if full and prompt:
      print(f"{impl}: prompt tuning (VPTSP-G) / full fine-tuning, ViT-S/16 batch {args.batch}: "
            f"{prompt['median_s'] / full['median_s']:.2f}x the step time", flush=True)
  meta = dict(python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
