"""Training-step time, dml_jax against PyTorch (timm), side by side in one process, 224 px.

Both sides run the Proxy-Anchor baseline step on random images (the data pipeline is not timed):
backbone -> embedding head (ViT: Linear on the cls token; ResNet-50: GAP + GMP -> Linear) -> L2 ->
Proxy-Anchor loss over 100 classes (alpha 32, margin 0.1) -> element-wise gradient clamp at 10 -> AdamW
(wd 1e-4, proxies at 100x lr). Every parameter trains; ResNet BatchNorm uses batch statistics (torch
train mode) on both sides. Random initialisation: step time does not depend on the weights.

  ours   dml_jax: the trainer's own update step (dml_jax.train.step: jitted, donated, data-parallel over
         all local devices), float32 or --dtype bfloat16 compute with float32 parameters.
  torch  timm.create_model(name, num_classes=0) + torch.nn.Linear + pytorch-metric-learning's
         ProxyAnchorLoss + torch.optim.AdamW on one device (CUDA if available, else CPU with all
         cores); --dtype bfloat16 uses torch.autocast.

Prompt tuning: `vit_s16_vptsp` is VPTSP-G on the same ViT-S/16 at the same batch, with the Cars196 ViT-S
recipe (task prompts N = 80 in 11 blocks, class prompts m = 50 in 8 blocks, BitFit, GRU semantic proxies,
E = 384, AdamW; batches of B/2 classes x 2): the frozen ViT gets no gradient, but the step runs two ViT
passes (sample tower with task prompts, proxy tower with class prompts). Its torch side restates the
authors' step (their architectures/peft_vit.py and criteria/dml_proxy_peft.py) on timm.

Protocol (A-B-A-B): each model runs in its own child process, which builds the step of every
implementation, runs --warmup untimed steps of each (compilation included; reported), then --steps
rounds that each time one step of every implementation in turn, so that load changes on a shared machine
hit all sides alike. Reported per implementation: min / median / max seconds per step, images/s at the
median, process CPU seconds per step; and the median over rounds of the per-round ratio of step times
(paired, so robust to load drift). The load average is recorded before and after every child and after
every round. The output and the --json file carry the date, git commit, versions and the command.

  python benchmarks/train_step.py --models vit_s16 vit_s16_vptsp --batch 16 --steps 8 --json /tmp/ts.json
  python benchmarks/train_step.py --models resnet50 --batch 16 --steps 5 --trace /tmp/trace
  python benchmarks/train_step.py --models vit_s16 --impls ours --hlo-report /tmp/hlo   # also on a GPU

--hlo-report DIR compiles our update step on whatever backend jax finds (CPU, GPU), writes its HLO before
(backend-independent) and after optimisation to DIR and prints what exposes XLA recomputing the backward
chain across blocks: dot_generals contracting several axes before optimisation; the largest fusion by
operand count, the fusions over 32 operands and the bytes accessed after; for vit_s16 also the largest
fusion at depths 2 and 4, which grows with depth when XLA recomputes (tests/test_vit_fusion.py checks the
same on a tiny ViT).

--trace DIR runs one more step of each implementation under jax.profiler / torch.profiler and prints the
time per op, summed over threads (XLA: HLO instruction with the jax op it came from; torch: aten op).

--out FILE writes the markdown section of docs/benchmarks.md (stamp, table, the paired ratio in words).
--quick runs every model at tiny sizes (64 px, 2 ViT blocks, one bottleneck per ResNet stage, VPTSP prompts
in 2 blocks, batch 4, 2 rounds): it checks that the benchmark runs, its figures mean nothing. The exit status
is 1 when any model fails.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

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
_BIG_FUSION = 32  # operands; ViT-S/16 step: up to 180 when XLA recomputed the backward chain, 15 without
# --quick: tiny versions of every model (set in the child from its flag), so that CI runs the whole benchmark.
QUICK = dict(enabled=False, image_size=64, vit_depth=2, resnet_layers=(1, 1, 1, 1))


def image_size() -> int:
  return QUICK["image_size"] if QUICK["enabled"] else 224


@dataclasses.dataclass
class Impl:
  """One implementation's step, ready to run: `step()` runs one update and waits for it, returning the loss."""
  step: Callable[[], float]
  device: str
  versions: str
  trainable: int | None = None
  compiled: Any = None  # ours: the compiled XLA executable (optimised HLO, cost analysis)
  lowered: Any = None  # ours: the step before XLA's optimisation passes (backend-independent StableHLO)
  warmup_s: float = 0.0


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def vptsp_config(config_file: str = "vptsp_cars_vits.py"):
  """A released VPTSP-G recipe from configs/ (default configs/vptsp_cars_vits.py, the authors' Cars196 ViT-S/16
  setting) on a random frozen ViT (same step time, no converted weights needed); tiny under --quick."""
  import importlib.util

  name = os.path.splitext(os.path.basename(config_file))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.weights = ""
  if QUICK["enabled"]:
    c.dataset.image_size = QUICK["image_size"]
    c.model.backbone_overrides.img_size = QUICK["image_size"]
    c.model.backbone_overrides.depth = QUICK["vit_depth"]
    c.method.prompt_depth = c.method.class_prompt_depth = QUICK["vit_depth"]
  return c


def _vptsp_cars_config():
  return vptsp_config("vptsp_cars_vits.py")


def batch_labels(c, batch: int, num_classes: int, rng):
  """Random int32 labels of one batch: VPTSP-G's class_random sampler (B/k distinct classes, k contiguous images
  each) for method 'vptsp', uniform otherwise."""
  import numpy as np

  if c.method.name == "vptsp":
    k = c.data.samples_per_class
    return np.repeat(rng.choice(num_classes, batch // k, replace=False), k).astype(np.int32)
  return rng.integers(0, num_classes, size=batch).astype(np.int32)


def _ours_config(model: str, batch: int, dtype: str, depth: int | None = None):
  from dml_jax import methods
  from dml_jax.train.config import default_config

  if MODELS[model]["head"] == "vptsp":
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
  if QUICK["enabled"]:
    c.dataset.image_size = QUICK["image_size"]
    if MODELS[model]["head"] == "gap_gmp_linear":
      c.model.backbone_overrides.layers = QUICK["resnet_layers"]
    else:
      c.model.backbone_overrides.depth = QUICK["vit_depth"]
  if depth is not None:
    c.model.backbone_overrides.depth = depth
  c.compute_dtype = dtype
  return c


@dataclasses.dataclass
class OurStep:
  """The trainer's update step for one model before compilation; state and batch still on the host."""
  cache: Any  # dml_jax.train.step.StepCache: the jitted update, its mesh and compile options
  phase: Any  # the epoch-0 parameter groups
  params: Any
  state: Any  # the train state (numpy / host arrays)
  batch: dict  # {"image": float32 [B, S, S, 3], "label": int32 [B]}
  lrs: Any
  epoch: Any

  def lower(self, state, batch):
    return self.cache.update_fn(self.phase, 0).lower(state, batch, self.lrs, self.epoch)


def build_ours(model: str, batch: int, dtype: str, depth: int | None = None, devices=None) -> OurStep:
  """The trainer's update step for `model` on a mesh of `devices` (default: all local ones), random init."""
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim
  from dml_jax.train import step as step_lib

  c = _ours_config(model, batch, dtype, depth)
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  phase = plan.groups(0)
  mesh = step_lib.make_mesh(devices)
  if batch % mesh.size:
    raise SystemExit(f"--batch {batch} must be a multiple of the {mesh.size} devices")
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(phase, params), jax.random.key(1))
  rng = np.random.default_rng(0)
  labels = batch_labels(c, batch, NUM_CLASSES, rng)
  size = image_size()
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  lrs, epoch = step_lib.learning_rate_args(phase, 0)
  return OurStep(step_lib.StepCache(method, mesh, tree_lib.key_index(params)), phase, params, state,
                 {"image": images, "label": labels.astype(np.int32)}, lrs, epoch)


def make_ours(model: str, batch: int, dtype: str, depth: int | None = None, xla_defaults: bool = False) -> Impl:
  """The trainer's update step, compiled ahead of time (the same executable `jax.jit` would run).

  xla_defaults: compile with jaxlib's default options instead of dml_jax's (dml_jax/train/compile_options.py),
  to measure what those options change.
  """
  import jax

  from dml_jax import pytree as tree_lib
  from dml_jax.train import step as step_lib

  ours = build_ours(model, batch, dtype, depth)
  cache, phase, lrs, epoch = ours.cache, ours.phase, ours.lrs, ours.epoch
  if xla_defaults:
    cache.compiler_options = None  # read when the update step is jitted, in `lower`
  mesh = cache.mesh
  state = jax.device_put(ours.state, step_lib.replicated(mesh))
  data = step_lib.shard_batch(ours.batch, mesh)
  lowered = ours.lower(state, data)
  compiled = lowered.compile()
  current = [state]

  def step() -> float:
    current[0], metrics = compiled(current[0], data, lrs, epoch)
    return float(metrics["loss"])  # waits for the step

  flat = tree_lib.flatten(ours.params)
  dev = jax.devices()[0]
  options = f", XLA options {cache.compiler_options}" if cache.compiler_options else ""
  return Impl(step=step, device=f"{dev.platform} x{mesh.size} ({dev.device_kind}){options}",
              versions=f"jax {jax.__version__}", trainable=sum(int(flat[p].size) for p in phase.trainable),
              compiled=compiled, lowered=lowered)


def _proxy_anchor_torch(num_classes: int, dim: int, margin: float = 0.1, alpha: float = 32.0):
  """Proxy-Anchor (Kim et al., 2020) in plain torch, the formula of PML's ProxyAnchorLoss (cosine, proxies
  kaiming-normal init): for machines without pytorch-metric-learning."""
  import torch
  import torch.nn.functional as F

  class ProxyAnchor(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.proxies = torch.nn.Parameter(torch.empty(num_classes, dim))
      torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, emb, labels):
      sims = F.normalize(emb, dim=1) @ F.normalize(self.proxies, dim=1).T
      pos = F.one_hot(labels, num_classes).bool()
      zero = torch.zeros(1, num_classes, device=sims.device, dtype=sims.dtype)
      low = torch.finfo(sims.dtype).min
      pos_lse = torch.logsumexp(torch.cat([(-alpha * (sims - margin)).masked_fill(~pos, low), zero]), dim=0)
      neg_lse = torch.logsumexp(torch.cat([(alpha * (sims + margin)).masked_fill(pos, low), zero]), dim=0)
      with_pos = pos.any(0)
      return (pos_lse * with_pos).sum() / with_pos.sum().clamp(min=1) + neg_lse.mean()

  return ProxyAnchor()


def make_torch(model: str, batch: int, dtype: str, spec: dict | None = None, compile: bool = False) -> Impl:
  """timm + torch.nn.Linear + PML's ProxyAnchorLoss (plain-torch Proxy-Anchor without PML) + AdamW; VPTSP-G: the
  official step restated on timm. `spec` overrides MODELS[model] (timm name, head); `compile` wraps forward and
  loss in torch.compile (the backward follows from it, AOTAutograd; the optimizer step stays eager)."""
  spec = spec or MODELS[model]
  if spec["head"] == "vptsp":
    return make_torch_vptsp(batch, dtype)
  import numpy as np
  import timm
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  is_cnn = spec["head"] == "gap_gmp_linear"
  tiny = {}
  if QUICK["enabled"]:
    tiny = dict(layers=list(QUICK["resnet_layers"])) if is_cnn else dict(img_size=QUICK["image_size"],
                                                                         depth=QUICK["vit_depth"])
  net = timm.create_model(spec["timm"], pretrained=False, num_classes=0, **tiny).to(device).train()
  feat_dim = net.num_features
  head = torch.nn.Linear(feat_dim, EMBEDDING).to(device)
  torch.nn.init.kaiming_normal_(head.weight, mode="fan_out")
  torch.nn.init.zeros_(head.bias)
  try:
    from pytorch_metric_learning import losses as pml_losses

    criterion = pml_losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING, margin=0.1, alpha=32).to(device)
    loss_name = "PML ProxyAnchorLoss"
  except ImportError:
    criterion = _proxy_anchor_torch(NUM_CLASSES, EMBEDDING).to(device)
    loss_name = "plain-torch Proxy-Anchor"
  opt = torch.optim.AdamW([{"params": list(net.parameters()) + list(head.parameters())},
                           {"params": criterion.parameters(), "lr": LR * 100}], lr=LR, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.normal(size=(batch, 3, image_size(), image_size())).astype(np.float32), device=device)
  labels = torch.tensor(rng.integers(0, NUM_CLASSES, size=batch), device=device)
  bf16 = dtype == "bfloat16"

  def forward_loss(images, labels):
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      if is_cnn:
        fmap = net.forward_features(images)
        pooled = fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))
      else:
        pooled = net(images)
      emb = head(pooled).float()
    emb = emb / torch.sqrt((emb ** 2).sum(dim=1, keepdim=True) + 1e-12)
    return criterion(emb, labels)

  forward = torch.compile(forward_loss) if compile else forward_loss

  def step():
    opt.zero_grad(set_to_none=True)
    loss = forward(images, labels)
    loss.backward()
    torch.nn.utils.clip_grad_value_(list(net.parameters()) + list(head.parameters()), 10)
    torch.nn.utils.clip_grad_value_(criterion.parameters(), 10)
    opt.step()
    return loss

  impl = _torch_impl(step, device)
  impl.versions += f"; {loss_name}"
  return impl


def make_torch_vptsp(batch: int, dtype: str) -> Impl:
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
  tiny = dict(img_size=QUICK["image_size"], depth=QUICK["vit_depth"]) if QUICK["enabled"] else {}
  vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **tiny).to(device).train()
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
  images = torch.tensor(rng.normal(size=(batch, 3, image_size(), image_size())).astype(np.float32), device=device)
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

  return _torch_impl(step, device, trainable=sum(p.numel() for p in main) + bias.numel())


def _torch_impl(step: Callable, device: str, **extra) -> Impl:
  import timm
  import torch

  def run() -> float:
    loss = step()
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())

  name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
  return Impl(step=run, device=name, versions=f"torch {torch.__version__}, timm {timm.__version__}", **extra)


# -- HLO fusion statistics ----------------------------------------------------------------------------------

# `%name = f32[...] fusion(%a, %b, ...), kind=kLoop, calls=...` (one instruction per line in HLO text).
_FUSION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\bfusion\((.*?)\),\s*kind=(\w+)")


def fusion_stats(hlo_text: str) -> dict:
  """Fusions in an optimised HLO module: count, largest by operand count, those over _BIG_FUSION operands."""
  fusions = []
  for line in hlo_text.splitlines():
    m = _FUSION_RE.match(line)
    if m:
      fusions.append((len([o for o in m.group(2).split(",") if o.strip()]), m.group(1), m.group(3)))
  fusions.sort(reverse=True)
  return dict(fusions=len(fusions), largest=fusions[0][0] if fusions else 0,
              largest_names=[f"{name} ({kind}, {n})" for n, name, kind in fusions[:3]],
              over_threshold=sum(n > _BIG_FUSION for n, _, _ in fusions))


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if cost and k in cost}


def hlo_report(model: str, batch: int, dtype: str, out_dir: str, impl: Impl | None = None) -> dict:
  """Writes our step's HLO before and after optimisation to out_dir; returns fusion statistics.

  Before optimisation (backend-independent): dot_generals that contract more than one axis, e.g. a weight
  gradient over [B, N, D] tokens, which XLA canonicalises with a transposed copy of an operand. After
  (backend-specific): the fusion statistics, and for the ViTs the largest fusion at depths 2 and 4.
  """
  import jax

  os.makedirs(out_dir, exist_ok=True)
  impl = impl or make_ours(model, batch, dtype)
  stem = os.path.join(out_dir, f"{model}_{jax.default_backend()}_b{batch}_{dtype}")
  pre = impl.lowered.as_text()
  with open(stem + ".pre.txt", "w") as f:
    f.write(pre)
  text = impl.compiled.as_text()
  with open(stem + ".hlo.txt", "w") as f:
    f.write(text)
  multi_axis = len(re.findall(r"contracting_dims = \[\d+(?:, \d+)+\] x", pre))
  report = dict(model=model, backend=jax.default_backend(), hlo=stem + ".hlo.txt", multi_axis_dots=multi_axis,
                **fusion_stats(text), **_cost(impl.compiled))
  if MODELS[model]["head"] == "linear":  # depth scaling (prompt recipes fix their own depths)
    report["largest_by_depth"] = [[d, fusion_stats(make_ours(model, batch, dtype, depth=d).compiled.as_text())[
        "largest"]] for d in (2, 4)]
  return report


def _print_hlo_report(r: dict) -> None:
  line = (f"HLO {r['model']} on {r['backend']}: before optimisation {r['multi_axis_dots']} dot_generals "
          f"contracting several axes; after: {r['fusions']} fusions, largest {r['largest']} operands "
          f"({', '.join(r['largest_names'])}), {r['over_threshold']} over {_BIG_FUSION} operands")
  if "bytes accessed" in r:
    line += f", {r['bytes accessed'] / 1e9:.2f} GB accessed, {r['flops'] / 1e9:.1f} GFLOP"
  if "largest_by_depth" in r:
    (d0, n0), (d1, n1) = r["largest_by_depth"]
    grows = n1 > n0
    line += (f"; largest fusion at depth {d0} / {d1}: {n0} / {n1} operands -> "
             f"{'RECOMPUTES the backward chain' if grows else 'no recomputation'}")
  print(line + f"; HLO in {r['hlo']} (and .pre.txt)", flush=True)


# -- per-op traces ------------------------------------------------------------------------------------------

def _hlo_op_sources(hlo_text: str) -> dict[str, str]:
  """ENTRY instruction name -> 'opcode[kind] <- jax op' from the optimised HLO's metadata."""
  sources = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
    if not m:
      continue
    kind = re.search(r"kind=(\w+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    jax_op = op_name.group(1).split("/")[-1] if op_name else "?"
    if op_name and "transpose(" in op_name.group(1):
      jax_op += " (bwd)"
    sources[m.group(1)] = f"{m.group(2)}{'[' + kind.group(1) + ']' if kind else ''} <- {jax_op}"
  return sources


def trace_ours(impl: Impl, out_dir: str, top: int) -> list[tuple[str, float, int]]:
  """One step under jax.profiler; returns (op, seconds summed over threads, calls), largest first."""
  import jax

  os.makedirs(out_dir, exist_ok=True)
  with jax.profiler.trace(out_dir):
    impl.step()
  path = max(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  sources = _hlo_op_sources(impl.compiled.as_text())
  totals, calls = collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op:
          totals[op] += event.duration_ns / 1e9
          calls[op] += 1
  by_source = collections.Counter()
  for op, seconds in totals.items():
    by_source[sources.get(op, "?")] += seconds
  print(f"  ours: {sum(totals.values()):.3f} s in HLO ops; by kind <- jax op:", flush=True)
  for source, seconds in by_source.most_common(top):
    print(f"    {seconds:8.3f} s  {source}")
  print("  ours: largest single HLO ops:")
  for op, seconds in totals.most_common(top):
    print(f"    {seconds:8.3f} s  x{calls[op]:<3d} {op}  ({sources.get(op, '?')})")
  return dict(total_s=sum(totals.values()), by_source=by_source.most_common(top),
              ops=[(op, s, calls[op]) for op, s in totals.most_common(top)])


def trace_torch(impl: Impl, top: int) -> list[tuple[str, float, int]]:
  """One step under torch.profiler (CPU activities); returns (aten op, self seconds, calls)."""
  import torch

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    impl.step()
  rows = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
  print(f"  torch: {sum(r[1] for r in rows):.3f} s self CPU time in ops; largest:", flush=True)
  for key, seconds, count in rows[:top]:
    print(f"    {seconds:8.3f} s  x{count:<3d} {key}")
  return dict(total_s=sum(r[1] for r in rows), ops=rows[:top])


# -- the side-by-side child and the driver ------------------------------------------------------------------

def _child(args) -> None:
  QUICK["enabled"] = args.quick
  model, impls = args.model, args.impls
  load_before = os.getloadavg()
  built: dict[str, Impl] = {}
  startup: dict[str, dict] = {}
  for impl in impls:
    t0 = time.perf_counter()
    built[impl] = (make_torch(model, args.batch, args.dtype) if impl == "torch" else
                   make_ours(model, args.batch, args.dtype, xla_defaults=impl == "ours_xla_defaults"))
    build_s = time.perf_counter() - t0  # ours: tracing and XLA compilation (ahead of time) included
    warm = []
    for _ in range(args.warmup):
      t = time.perf_counter()
      built[impl].step()
      warm.append(time.perf_counter() - t)
    built[impl].warmup_s = time.perf_counter() - t0  # build + compile + warm-up steps
    startup[impl] = dict(build_s=build_s, warmup_steps_s=warm)
  rounds = []
  for _ in range(args.steps):  # A-B-A-B: one step of each implementation per round
    row = {}
    for name, impl in built.items():
      cpu0, t = _cpu_seconds(), time.perf_counter()
      loss = impl.step()
      row[name] = dict(s=time.perf_counter() - t, cpu_s=_cpu_seconds() - cpu0, loss=loss)
    row["load1"] = os.getloadavg()[0]
    rounds.append(row)
  result = dict(model=model, load_before=load_before, load_after=os.getloadavg(), rounds=rounds,
                impls={name: dict(device=i.device, versions=i.versions, trainable=i.trainable, warmup_s=i.warmup_s,
                                  **startup[name]) for name, i in built.items()})
  if args.hlo_report and "ours" in built:
    result["hlo"] = hlo_report(model, args.batch, args.dtype, args.hlo_report, built["ours"])
  if args.trace:
    print(f"RESULT {json.dumps(result)}", flush=True)  # the timings survive a failing trace
    for name in ("ours", "torch"):
      if name not in built:
        continue
      print(f"per-op trace, {model} {name} (one step, load {os.getloadavg()[0]:.2f}):", flush=True)
      if name == "ours":
        result["trace_ours"] = trace_ours(built[name], os.path.join(args.trace, f"{model}_ours"), args.trace_top)
      else:
        result["trace_torch"] = trace_torch(built[name], args.trace_top)
  print(f"RESULT {json.dumps(result)}", flush=True)


def _summary(result: dict, batch: int, dtype: str) -> list[dict]:
  rows = []
  rounds = result["rounds"]
  for name, info in result["impls"].items():
    times = [r[name]["s"] for r in rounds]
    median = statistics.median(times)
    rows.append(dict(model=result["model"], impl=name, batch=batch, dtype=dtype, min_s=min(times), median_s=median,
                     max_s=max(times), images_per_s=batch / median,
                     cpu_s_per_step=statistics.mean(r[name]["cpu_s"] for r in rounds), warmup_s=info["warmup_s"],
                     build_s=info.get("build_s"), first_step_s=(info.get("warmup_steps_s") or [None])[0],
                     loss=rounds[-1][name]["loss"], device=info["device"], versions=info["versions"],
                     trainable=info["trainable"]))
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "ours_xla_defaults", "torch"],
                 help="ours_xla_defaults: our step compiled with jaxlib's default options, not dml_jax's")
  p.add_argument("--batch", type=int, default=8, help="global batch (images per step)")
  p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each implementation per round)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--json", default="", help="also write the results (every round) to this file")
  p.add_argument("--hlo-report", default="", metavar="DIR", help="write our optimised HLO and its fusion statistics")
  p.add_argument("--trace", default="", metavar="DIR", help="per-op trace of one more step of each implementation")
  p.add_argument("--trace-top", type=int, default=25, help="ops listed per trace")
  p.add_argument("--quick", action="store_true",
                 help="tiny models (64 px, 2 blocks / 1 bottleneck per stage), batch 4, 2 rounds: checks that it runs")
  p.add_argument("--out", default="", metavar="FILE", help="write the markdown section (docs/benchmarks/...) here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return
  if args.quick:
    given = set(sys.argv[1:])
    args.batch = args.batch if "--batch" in given else 4
    args.steps = args.steps if "--steps" in given else 2
    args.warmup = args.warmup if "--warmup" in given else 1
    if "--impls" not in given:
      try:
        import timm  # noqa: F401  (torch side only where the parity extra is installed)
      except ImportError:
        args.impls = ["ours"]

  from benchmarks import common

  stamp = common.stamp()
  print(f"train_step benchmark, {stamp['date']}, commit {stamp['commit']}\n  command: {stamp['command']}\n"
        f"  {stamp['machine']}; python {stamp['python']}; "
        + ", ".join(f"{k} {v}" for k, v in stamp["versions"].items())
        + (f"; XLA_FLAGS={stamp['xla_flags']}" if stamp["xla_flags"] else ""), flush=True)
  failed = []
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  # Both stacks share one GPU in a child: jax must not grab 75 % of its memory up front.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  rows, results = [], []
  for model in args.models:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--impls", *args.impls,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype",
           args.dtype, "--hlo-report", args.hlo_report, "--trace", args.trace, "--trace-top", str(args.trace_top)]
    if args.quick:
      cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
      if not line.startswith("RESULT "):
        print(line)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{model} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
      failed.append(model)
    if not lines:
      continue
    result = json.loads(lines[-1][len("RESULT "):])
    results.append(result)
    per_round = " ".join(f"{r['load1']:.2f}" for r in result["rounds"])
    print(f"{model}: load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after; "
          f"after each round: {per_round}")
    for row in _summary(result, args.batch, args.dtype):
      rows.append(row)
      print(f"  {row['impl']:6s} batch {args.batch:4d} {args.dtype:9s} {row['images_per_s']:8.2f} images/s  "
            f"s/step min {row['min_s']:.3f} median {row['median_s']:.3f} max {row['max_s']:.3f}  "
            f"CPU {row['cpu_s_per_step']:.2f} s/step  build+warm-up {row['warmup_s']:.1f} s  on {row['device']}",
            flush=True)
    if {"ours", "torch"} <= set(result["impls"]):
      ratios = [r["ours"]["s"] / r["torch"]["s"] for r in result["rounds"]]
      print(f"  ours / torch step time: median {statistics.median(ratios):.2f}x over {len(ratios)} rounds "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}); torch / ours = speed of ours relative to torch "
            f"{1 / statistics.median(ratios):.2f}x", flush=True)
    if "hlo" in result:
      _print_hlo_report(result["hlo"])
  by_key = {(r["model"], r["impl"]): r for r in rows}
  for impl in args.impls:
    full, prompt = by_key.get(("vit_s16", impl)), by_key.get(("vit_s16_vptsp", impl))
    if full and prompt:
      print(f"{impl}: prompt tuning (VPTSP-G) / full fine-tuning, ViT-S/16 batch {args.batch}: "
            f"{prompt['median_s'] / full['median_s']:.2f}x the step time", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=stamp, rows=rows, results=results), f, indent=2)
  if args.out or args.quick:
    common.write_section(args.out or None, "Training step: dml_jax against PyTorch (timm), side by side",
                         markdown(stamp, args, rows, results, failed))
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)}")


_TITLES = {"vit_s16": "ViT-S/16, full fine-tuning (Proxy-Anchor)",
           "resnet50": "ResNet-50, full fine-tuning (Proxy-Anchor)",
           "vit_s16_vptsp": "ViT-S/16, VPTSP-G prompt tuning (Cars196 ViT-S recipe)"}


# Said under the figures of every CPU run; the profiles (--trace) are the evidence.
_ON_CPU = (
    "What shapes the CPU figures. The FLOPs are the same: XLA's cost analysis counts what torch's flop counter "
    "counts (benchmarks/dfml_step.py, GFLOP column), and on their own XLA's Eigen matmuls run as fast as torch's. "
    "The rest of a step is memory traffic: every elementwise pass over the [B*N, 4D] MLP activations or the "
    "[B, H, N, N] attention arrays costs about as much as an attention matmul. dml_jax therefore (1) keeps the ViT "
    "backward free of recomputing fusions (tests/test_vit_fusion.py; section 'Recomputing fusions per XLA "
    "backend'), (2) gives attention a hand-written backward with fewer passes over the [N, N] arrays "
    "(dml_jax/backbones/attention.py), (3) computes the exact GELU with erf, torch's formula (XLA's erfc costs an "
    "exponential and two branches), (4) takes the Linear layers' bias gradients as matrix-vector products, and (5) "
    "compiles without jaxlib 0.10's YNNPACK dot and convolution fusions, which were slower here than XLA's Eigen "
    "kernels (dml_jax/train/compile_options.py; the rows `ours_xla_defaults` time the same step compiled with "
    "jaxlib's defaults, round by round). torch's CPU attention is a fused flash-attention kernel that keeps the "
    "[N, N] blocks in cache, which XLA has no equivalent of. XLA runs its Eigen dots asynchronously, beside the "
    "elementwise fusions: in the per-op profile a traced op's time includes the dots that ran beside it, and the "
    "dots show only their dispatch. On a GPU both sides call cuBLAS / cuDNN, so these CPU figures say nothing "
    "about GPU speed (benchmarks/gpu_suite.py).")


def markdown(stamp: dict, args, rows: list[dict], results: list[dict], failed: list[str]) -> list[str]:
  """The docs section: stamp, one row per (model, implementation), and the paired ratio said in words."""
  from benchmarks import common

  size = "64 px, tiny models (--quick: the figures only show that it runs)" if args.quick else "224 px"
  by_model = {r["model"]: r for r in results}
  table_rows, sentences = [], []
  for row in rows:
    result = by_model[row["model"]]
    times = [r[row["impl"]]["s"] for r in result["rounds"]]
    ratio = ""
    if row["impl"] == "ours_xla_defaults" and "ours" in result["impls"]:
      lo, mid, hi = common.spread(r["ours_xla_defaults"]["s"] / r["ours"]["s"] for r in result["rounds"])
      sentences.append(f"- {_TITLES[row['model']]}: compiled with jaxlib's default XLA options instead of dml_jax's "
                       f"(YNNPACK fusions on), our step takes {mid:.2f}x the time (paired median, range "
                       f"{lo:.2f}-{hi:.2f}).")
    if row["impl"] == "ours" and {"ours", "torch"} <= set(result["impls"]):
      ratios = [r["ours"]["s"] / r["torch"]["s"] for r in result["rounds"]]
      lo, mid, hi = common.spread(ratios)
      ratio = f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"
      verdict = (f"ours is **slower**: {mid:.2f}x torch's step time" if mid > 1.05 else
                 f"ours is faster: {mid:.2f}x torch's step time" if mid < 0.95 else
                 f"ours and torch are level ({mid:.2f}x)")
      torch_row = next(r for r in rows if r["model"] == row["model"] and r["impl"] == "torch")
      sentences.append(f"- {_TITLES[row['model']]}: {verdict} (paired median over {len(ratios)} rounds, "
                       f"range {lo:.2f}-{hi:.2f}; CPU seconds per step {row['cpu_s_per_step']:.2f} ours against "
                       f"{torch_row['cpu_s_per_step']:.2f} torch).")
    per_round = [r["load1"] for r in result["rounds"]]
    table_rows.append((_TITLES[row["model"]], row["impl"], f"{row['trainable']:,}" if row["trainable"] else "-",
                       f"{row['build_s']:.1f}" if row.get("build_s") is not None else "-",
                       f"{row['first_step_s']:.2f}" if row.get("first_step_s") is not None else "-",
                       common.fmt_spread(times, 3), f"{row['images_per_s']:.2f}", f"{row['cpu_s_per_step']:.2f}", ratio,
                       f"{result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f} "
                       f"({min(per_round):.1f}-{max(per_round):.1f})"))
  body = common.stamp_lines(stamp) + [
      "",
      f"Proxy-Anchor full fine-tuning and VPTSP-G prompt tuning at {size}, batch {args.batch}, {args.dtype}, random "
      f"images and initialisation; both implementations built in one child process per model and timed A-B-A-B "
      f"({args.warmup} untimed warm-up step(s) each, then {args.steps} rounds of one step of each). Build = "
      f"constructing the step (for ours: tracing and XLA compilation, ahead of time); first step = the first warm-up "
      f"step (allocation, first-touch); the steady state is the rounds: min / median / max seconds per step, images/s "
      f"at the median, mean process CPU seconds per step (all threads; the steadier figure on a shared machine). "
      f"ours / torch = median over rounds of the per-round ratio of step times (paired, so robust to load drift).",
      "",
      *common.table(["model", "impl", "trainable params", "build s", "first step s", "s/step min / median / max",
                     "images/s", "CPU s/step", "ours / torch", "load before -> after (per round)"], table_rows,
                    "llrrrrrrrl"),
  ]
  if sentences:
    body += ["", "In words:", "", *sentences]
    if all(r.get("device", "cpu").startswith("cpu") for r in rows):
      body += ["", _ON_CPU]
  for result in results:  # --trace: where the time of one step goes
    title = _TITLES[result["model"]]
    if "trace_ours" in result:
      t = result["trace_ours"]
      body += ["", f"Profile of one step of ours, {title} (jax.profiler, seconds summed over threads, "
               f"{t['total_s']:.2f} s in HLO ops), by HLO kind <- the jax op it came from:", "",
               *common.table(["seconds", "share", "HLO op kind <- jax op"],
                             [(f"{sec:.3f}", f"{sec / t['total_s']:.0%}", f"`{src}`") for src, sec in
                              t["by_source"][:8]], "rrl")]
    if "trace_torch" in result:
      t = result["trace_torch"]
      body += ["", f"Profile of one step of torch, {title} (torch.profiler, self CPU seconds, {t['total_s']:.2f} s "
               f"in ops):", "",
               *common.table(["seconds", "share", "calls", "aten op"],
                             [(f"{sec:.3f}", f"{sec / t['total_s']:.0%}", n, f"`{op}`") for op, sec, n in
                              t["ops"][:8]], "rrrl")]
  if failed:
    body += ["", f"**Failed:** {', '.join(failed)} (see the run's stderr)."]
  return body


if __name__ == "__main__":
  main()
