"""DFML's training step vs plain Proxy-Anchor fine-tuning of the same DeiT-S, dml_jax vs a torch re-creation.

Steps on random 224 px images (the data pipeline is not timed), DeiT-S distilled, 384-d embedding
((cls + dist) / 2 -> L2, no embedding layer), Proxy-Anchor over 100 classes (alpha 32, margin 0.1),
element-wise gradient clamp 10, AdamW (wd 1e-4 on everything, proxies at 100x lr), every parameter training
(the step after DFML's warm-up):

  pa    / ours   dml_jax 'metric_loss' (head 'none') on deit_small_distilled_patch16_224: the trainer's step.
  pa    / torch  timm deit_small_distilled_patch16_224(num_classes=0) + the Proxy-Anchor code's loss.
  dfml  / ours   dml_jax 'dfml' (configs/dfml_*_deit_small.py's objective): the full and the routed stream,
                 every sub-block computed densely (one matmul per layer), matching terms, two PA terms.
  dfml  / torch  a re-creation of the authors' code (vendored timm Attention / Block / forward of wangck20/DFML):
                 three Linear layers per factorized layer and stream, the MLP sub-blocks run a third time for
                 the MLP matching term, as the released code does.

Each (method, implementation) runs in its own subprocess. Reported per row: min / median / max seconds per
step over --steps timed steps after --warmup untimed ones, images/s at the median, process CPU seconds per
step, ours' compilation time (ahead of time, apart from the untimed steps), the untimed steps' time, and the
step's floating-point work (ours: XLA's cost analysis of the compiled step, every op; torch:
torch.utils.flop_counter, matmuls and convolutions only). The section is stamped by benchmarks/common.py
(date, commit, machine, load average before and after, versions, the exact command).

  python benchmarks/dfml_step.py --batch 8 --steps 5 --warmup 2 --out docs/benchmarks/dfml.md   # the docs section
  python benchmarks/dfml_step.py --batch 120 --steps 20 --warmup 3        # a GPU machine
  python benchmarks/dfml_step.py --quick      # tiny sizes: checks that it runs (CI); its figures mean nothing

--quick: depth-2, width-96 (6 heads, 2 per sub-block) distilled DeiTs on 64 px images (4 x 4 patches + 2
tokens), batch 4, 1 untimed + 2 timed steps; torch's rows only when torch and timm are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NUM_CLASSES = 100
LR = 1e-4
NAME = "deit_small_distilled_patch16_224"
# The model's size: DeiT-S at 224 px, or (--quick, set in the child from its flag) a tiny distilled DeiT.
ARCH = dict(img_size=224, depth=12, embed_dim=384, num_heads=6)
QUICK_ARCH = dict(img_size=64, depth=2, embed_dim=96, num_heads=6)


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def _timed(step, sync, steps: int, warmup: int) -> dict:
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = step()
    sync(loss)
  warmup_s = time.perf_counter() - t0
  times, cpu0 = [], _cpu_seconds()
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    sync(loss)
    times.append(time.perf_counter() - t)
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / steps, loss=float(loss))


# -- dml_jax ------------------------------------------------------------------------------------------------


def run_ours(method: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim
  from dml_jax.train import step as step_lib
  from dml_jax.train.config import default_config

  c = default_config()
  c.compute_dtype = dtype
  c.model.backbone = NAME
  c.model.backbone_overrides.update(ARCH)
  c.dataset.image_size = ARCH["img_size"]
  c.model.embedding_dim = ARCH["embed_dim"]
  if method == "dfml":
    c.method = methods.method_config("dfml")
  else:
    c.method = methods.method_config("metric_loss")
    c.method.head = "none"  # (cls + dist) / 2, as DFML's embedding
    c.method.bn_freeze = False
  c.optim.update(dict(optimizer="adamw", lr=LR, weight_decay=1e-4, clip_value=10.0,
                      groups=(("loss/.*", dict(name="proxies", lr_mult=100.0)),)))
  m = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = m.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=m.param_selectors(params))
  groups = plan.groups(0)
  mesh = step_lib.make_mesh()
  cache = step_lib.StepCache(m, mesh, tree_lib.key_index(params))
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(groups, params), jax.random.key(1))
  state = jax.device_put(state, step_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  size = ARCH["img_size"]
  data = step_lib.shard_batch({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                               "label": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32),
                               "index": np.arange(batch, dtype=np.int32)}, mesh)
  lrs, epoch = step_lib.learning_rate_args(groups, 0)
  # Compiled once, ahead of time, so that XLA's cost analysis describes the very executable that is timed.
  t0 = time.perf_counter()
  update = cache.update_fn(groups, 0).lower(state, data, lrs, epoch).compile()
  cost = update.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = {"state": state}

  def step():
    holder["state"], metrics = update(holder["state"], data, lrs, epoch)
    return metrics["loss"]

  compile_s = time.perf_counter() - t0
  out = _timed(step, jax.block_until_ready, steps, warmup)
  out["compile_s"] = compile_s  # reported apart from the untimed steps (jax.jit would pay it in the first)
  out["gflop"] = float(cost.get("flops", float("nan"))) / 1e9
  dev = jax.devices()[0]
  out.update(device=f"{dev.platform} x{mesh.size} ({dev.device_kind})",
             trainable=sum(int(v.size) for v in tree_lib.flatten(params).values()))
  return out


# -- torch ----------------------------------------------------------------------------------------------------


def _torch_proxy_anchor(torch, x, labels, proxies):
  """The Proxy-Anchor code's loss (losses.Proxy_Anchor)."""
  import torch.nn.functional as F
  l2 = lambda t: t / torch.sqrt(t.pow(2).sum(1, keepdim=True) + 1e-12)
  cos = F.linear(l2(x), l2(proxies))
  pos = F.one_hot(labels, proxies.shape[0]).float()
  pos_exp, neg_exp = torch.exp(-32 * (cos - 0.1)), torch.exp(32 * (cos + 0.1))
  num_valid = (pos.sum(0) != 0).sum()
  p_sum = torch.where(pos == 1, pos_exp, torch.zeros_like(pos_exp)).sum(0)
  n_sum = torch.where(pos == 0, neg_exp, torch.zeros_like(neg_exp)).sum(0)
  return torch.log(1 + p_sum).sum() / num_valid + torch.log(1 + n_sum).sum() / proxies.shape[0]


def _torch_factorized_deit(torch, dim=384, depth=12, heads=6, groups=3, patch=16, img=224):
  """The authors' factorized distilled DeiT (vendored timm's Attention / Block / forward), train-mode forward
  returning (m1, m2, attention terms, MLP terms)."""
  import torch.nn as nn
  import torch.nn.functional as F

  def straight_through(logits):
    soft = torch.softmax(logits, dim=-1)
    return (F.one_hot(torch.argmax(soft, dim=-1), groups) - soft).detach() + soft

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(dim, 4 * dim // groups), nn.Linear(4 * dim // groups, dim)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(groups))
      self.proj = nn.ModuleList(nn.Linear(dim // groups, dim) for _ in range(groups))
      self.gate = nn.Linear(dim, groups, bias=False)

    def forward(self, x, signal):
      b, n, _ = x.shape
      prob_true = straight_through(self.gate(x))
      outs = []
      for qkv_j, proj_j in zip(self.qkv, self.proj):
        q, k, v = qkv_j(x).reshape(b, n, 3, heads // groups, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        outs.append(proj_j((attn @ v).transpose(1, 2).reshape(b, n, dim // groups)))
      if signal == "ori":
        return sum(outs)
      prob_d = straight_through(self.gate(x.detach()))
      return (sum(o * prob_true[:, :, j:j + 1] for j, o in enumerate(outs)),
              sum(o.detach() * prob_d[:, :, j:j + 1] for j, o in enumerate(outs)))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
      self.attn = Attention()
      self.mlp = nn.ModuleList(Mlp() for _ in range(groups))
      self.gate = nn.Linear(dim, groups, bias=False)

    def forward(self, x_ori, x_hard):
      x_ori = x_ori + self.attn(self.norm1(x_ori), "ori")
      t_attn = x_ori.detach()
      a, a_d = self.attn(self.norm1(x_hard), "hard")
      d_attn = x_hard.detach() + a_d
      x_hard = x_hard + a
      x_ori = x_ori + sum(m(self.norm2(x_ori)) for m in self.mlp)
      t_mlp = x_ori.detach()
      prob_true = straight_through(self.gate(x_hard))
      x_hard = x_hard + sum(m(self.norm2(x_hard)) * prob_true[:, :, j:j + 1] for j, m in enumerate(self.mlp))
      d_mlp = x_hard.detach() + sum(m(self.norm2(x_hard.detach())) * prob_true[:, :, j:j + 1]
                                    for j, m in enumerate(self.mlp))
      return x_ori, x_hard, (d_attn - t_attn).pow(2).sum(2).sqrt().sum(), (d_mlp - t_mlp).pow(2).sum(2).sqrt().sum()

  class FactorizedDeiT(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_embed = nn.Conv2d(3, dim, patch, patch)
      self.cls_token, self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.randn(1, 2 + (img // patch) ** 2, dim) * 0.02)
      self.blocks = nn.ModuleList(Block() for _ in range(depth))
      self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images):
      x = self.patch_embed(images).flatten(2).transpose(1, 2)
      b = x.shape[0]
      x = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x), dim=1) + self.pos_embed
      x_ori, x_hard, attn_terms, mlp_terms = x, x, [], []
      for blk in self.blocks:
        x_ori, x_hard, a, m = blk(x_ori, x_hard)
        attn_terms.append(a)
        mlp_terms.append(m)

      def embed(t):
        t = self.norm(t)
        t = (t[:, 0] + t[:, 1]) / 2
        return t / torch.sqrt(t.pow(2).sum(1, keepdim=True) + 1e-12)

      return embed(x_ori), embed(x_hard), attn_terms, mlp_terms

  return FactorizedDeiT()


def run_torch(method: str, batch: int, steps: int, warmup: int, dtype: str) -> dict:
  import numpy as np
  import timm
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  if method == "dfml":
    net = _torch_factorized_deit(torch, dim=ARCH["embed_dim"], depth=ARCH["depth"], heads=ARCH["num_heads"],
                                 img=ARCH["img_size"]).to(device).train()
  else:
    net = timm.create_model(NAME, pretrained=False, num_classes=0, **ARCH).to(device).train()
  proxies = torch.empty(NUM_CLASSES, ARCH["embed_dim"], device=device)
  proxies = torch.nn.Parameter(torch.nn.init.kaiming_normal_(proxies, mode="fan_out"))
  opt = torch.optim.AdamW([{"params": net.parameters()}, {"params": [proxies], "lr": LR * 100}], lr=LR,
                          weight_decay=1e-4)
  rng = np.random.default_rng(0)
  size = ARCH["img_size"]
  images = torch.tensor(rng.normal(size=(batch, 3, size, size)).astype(np.float32), device=device)
  labels = torch.tensor(rng.integers(0, NUM_CLASSES, size=batch), device=device)
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      if method == "dfml":
        m1, m2, attn_terms, mlp_terms = net(images)
      else:
        m1 = net(images)  # (cls + dist) / 2
    if method == "dfml":  # train.py
      m1, m2 = m1.float(), m2.float()
      distill = 0.1 * (m2 - m1.detach()).pow(2).sum(dim=1).sqrt().sum()
      for a, m in zip(attn_terms, mlp_terms):
        distill = distill + 0.00001 * a.float() / 12 + 0.00001 * m.float() / 12
      loss = (_torch_proxy_anchor(torch, m1, labels, proxies) + 0.5 * _torch_proxy_anchor(torch, m2, labels, proxies)
              + 0.5 * distill)
    else:
      m1 = m1.float()
      loss = _torch_proxy_anchor(torch, m1 / torch.sqrt(m1.pow(2).sum(1, keepdim=True) + 1e-12), labels, proxies)
    loss.backward()
    torch.nn.utils.clip_grad_value_(net.parameters(), 10)
    torch.nn.utils.clip_grad_value_([proxies], 10)
    opt.step()
    return loss

  def sync(_):
    if device == "cuda":
      torch.cuda.synchronize()

  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:  # one extra step, counted (matmuls and convolutions, forward and backward)
    step()
  out = _timed(step, sync, steps, warmup)
  out["gflop"] = counter.get_total_flops() / 1e9
  out.update(device=torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
             trainable=sum(p.numel() for p in net.parameters()) + proxies.numel())
  return out


# -- driver ---------------------------------------------------------------------------------------------------


def _torch_installed() -> bool:
  try:
    import timm  # noqa: F401
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", nargs="+", default=["pa", "dfml"], choices=["pa", "dfml"])
  p.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
  p.add_argument("--batch", type=int, default=8, help="global batch (images per step)")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator warm-up; torch's first calls)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default="", help="write the markdown section (stamp, table) here")
  p.add_argument("--quick", action="store_true", help="tiny DeiTs, batch 4, 1 + 2 steps (CI)")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    ARCH.update(QUICK_ARCH)
    if not args.child:
      args.batch, args.steps, args.warmup = 4, 2, 1
      if not _torch_installed():  # the torch rows need the parity extra (torch, timm)
        args.impls = [i for i in args.impls if i != "torch"]
  if args.child:
    method, impl = args.child.split("/")
    fn = run_ours if impl == "ours" else run_torch
    print("RESULT " + json.dumps(fn(method, args.batch, args.steps, args.warmup, args.dtype)))
    return

  from benchmarks import common

  doc_stamp = common.stamp()
  rows, failed = [], []
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
      q for q in (REPO, os.environ.get("PYTHONPATH", "")) if q)}
  for method in args.methods:
    for impl in args.impls:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{method}/{impl}", "--batch", str(args.batch),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
      proc = subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=REPO, env=env, capture_output=True,
                            text=True)
      lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
      if proc.returncode or not lines:
        print(f"{method}/{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        failed.append(f"{method}/{impl}")
        continue
      r = json.loads(lines[-1][len("RESULT "):])
      r.update(method=method, impl=impl)
      rows.append(r)
      print(f"{method}/{impl}: median {statistics.median(r['times']):.3f} s/step", file=sys.stderr, flush=True)
  load_after = common.load_average()

  a = ARCH
  size = (f"DeiT-S distilled ({a['depth']} blocks, width {a['embed_dim']}, {a['num_heads']} heads)"
          if not args.quick else
          f"a tiny distilled DeiT ({a['depth']} blocks, width {a['embed_dim']}, {a['num_heads']} heads; --quick: "
          f"the figures mean nothing)")
  body = common.stamp_lines(doc_stamp, load_after) + [
      "",
      f"One training step of {size}, {a['img_size']} px random images, batch {args.batch}, {args.dtype}, "
      f"Proxy-Anchor over {NUM_CLASSES} classes, AdamW (proxies at 100x lr), clamp 10, every parameter training. "
      f"pa = Proxy-Anchor fine-tuning of the plain DeiT, embedding (cls + dist) / 2; dfml = DFML's two-stream "
      f"objective (full and routed stream, matching terms, two PA terms). ours = dml_jax's trainer step, compiled "
      f"ahead of time (compile s; XLA counts every op in GFLOP); torch = timm's DeiT (pa) or a re-creation of "
      f"the authors' factorized DeiT (dfml: three Linear layers per factorized layer and stream, the MLP "
      f"sub-blocks run a third time for the MLP matching term; torch's flop counter counts matmuls and "
      f"convolutions only). Seconds per step, min / median / max over {args.steps} timed steps after "
      f"{args.warmup} untimed (first steps s).",
      "",
      *common.table(
          ["method", "impl", "device", "s/step min / median / max", "images/s", "CPU s/step", "compile s",
           "first steps s", "GFLOP/step", "trainable", "loss"],
          [(r["method"], r["impl"], r["device"], common.fmt_spread(r["times"]),
            f"{args.batch / statistics.median(r['times']):.1f}", f"{r['cpu_per_step']:.2f}",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "-", f"{r['warmup_s']:.1f}", f"{r['gflop']:.2f}",
            f"{r['trainable']:,}", f"{r['loss']:.4f}") for r in rows],
          align="lllrrrrrrrr"),
  ]
  by = {(r["method"], r["impl"]): statistics.median(r["times"]) for r in rows}
  flops = {(r["method"], r["impl"]): r["gflop"] for r in rows}
  ratios = []
  for impl in args.impls:
    if ("pa", impl) in by and ("dfml", impl) in by:
      ratios.append(f"{impl}: a DFML step costs {by[('dfml', impl)] / by[('pa', impl)]:.2f}x a Proxy-Anchor "
                    f"step in time, {flops[('dfml', impl)] / flops[('pa', impl)]:.2f}x in GFLOP.")
  for method in args.methods:
    if (method, "ours") in by and (method, "torch") in by:
      ratio = by[(method, "torch")] / by[(method, "ours")]
      ratios.append(f"{method}: torch's median step / ours = {ratio:.2f} ("
                    + ("ours is faster" if ratio > 1 else "ours is slower") + ").")
  if ratios:
    body += ["", *(f"- {line}" for line in ratios)]
  if failed:
    body += ["", "Failed: " + ", ".join(failed) + " (see the script's standard error)."]
  common.write_section(args.out, "DFML train step: DFML vs Proxy-Anchor on the same DeiT, dml_jax vs torch", body)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
