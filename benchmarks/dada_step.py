"""DADA's training iteration, dml_jax vs a torch re-creation of the authors' loop, on the same machine.

One iteration = what the official `main.py` does per batch: the network without gradient (training mode), three
discriminator steps (domain discriminator U, category discriminator D_c, one Adam), one generator step (the
network again with gradient, the proxies' Adam and the network's Adam). Setting: configs/dada_cub_resnet50.py
(ResNet-50 with frozen BN statistics, 224 px, intra-class mixup, BN on both discriminators' logits, U 512, D_c
512 / 128), after the warm-up (every group trains), random weights, random images, 100 classes; --batch images
as --batch / 2 classes x 2 (one class drawn twice, as the with-replacement sampler does).

  ours   the trainer's update step (dml_jax.train.step: one jitted, donated function holding all sub-steps),
         float32.
  torch  tests/dada_torch_reference.py's `TorchDADATraining` (the authors' loop re-created: functional
         torchvision-layout ResNet-50, the criterion as nn.Modules, three torch.optim.Adam), float32, on CUDA
         when present, else the CPU with all cores; the random draws are made inside the timed iteration.

The authors' loop runs the backbone forward twice per iteration (the no-grad pass for the discriminator steps,
then the generator's pass). The script also compiles ours and counts the convolutions in the optimised program
of a discriminator-only iteration (= one backbone forward) and of a full iteration: a full iteration with a single
forward holds about 3x as many (forward, input gradient, kernel gradient), with two forwards about 4x.

Each implementation runs in its own subprocess; reported: min / median / max seconds per iteration over --steps
timed iterations after --warmup untimed ones (ours is compiled before those, its compilation time is reported
apart; torch's first iterations include its allocator warm-up), with the date, git commit, machine, load average
before and after, library versions and the exact command. --out writes the figures as markdown.

  python benchmarks/dada_step.py --batch 8 --steps 3 --warmup 1 --out docs/benchmarks/dada.md
  python benchmarks/dada_step.py --batch 90 --steps 20 --warmup 3      # the recipe's batch, on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NUM_CLASSES = 100


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def _config(batch: int, image_size: int, tiny: bool):
  spec = importlib.util.spec_from_file_location("dada_cub", os.path.join(REPO, "configs", "dada_cub_resnet50.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.weights = ""  # random init: speed does not depend on the weights
  c.data.batch_size = batch
  c.dataset.image_size = image_size
  if tiny:  # a smoke-test size
    c.model.backbone_overrides.update(dict(layers=(1, 1), channels=(8, 16), stem_width=8))
  return c


def _labels(batch: int, rng):
  import numpy as np

  classes = rng.choice(NUM_CLASSES, batch // 2 - 1, replace=False)
  return np.repeat(np.concatenate([classes, classes[:1]]), 2).astype(np.int32)


def run_ours(args) -> dict:
  import jax
  import numpy as np

  from dml_jax import methods
  from dml_jax import pytree as tree_lib
  from dml_jax.train import optim
  from dml_jax.train import step as step_lib

  c = _config(args.batch, args.image_size, args.tiny)
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))
  plan = optim.ParamPlan(c.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  mesh = step_lib.make_mesh()
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params))
  rng = np.random.default_rng(0)
  data = step_lib.shard_batch({"image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
      np.float32), "label": _labels(args.batch, rng), "index": np.arange(args.batch, dtype=np.int32)}, mesh)

  def state_for(epoch):
    groups = plan.groups(epoch)
    state = step_lib.init_train_state(params, method_state, optim.init_group_states(groups, params),
                                      jax.random.key(1))
    return groups, jax.device_put(state, step_lib.replicated(mesh))

  convolutions, compile_s = {}, 0.0
  for name, epoch in (("discriminator_only", 0), ("full", 1)):
    groups, state = state_for(epoch)
    lrs, ep = step_lib.learning_rate_args(groups, epoch)
    t = time.perf_counter()
    text = cache.update_fn(groups, epoch).lower(state, data, lrs, ep).compile().as_text()
    if name == "full":
      compile_s = time.perf_counter() - t
    convolutions[name] = len(re.findall(r"= \S+ convolution\(", text))

  epoch = 1  # after CUB's warm-up: every group trains
  groups, state = state_for(epoch)
  lrs, ep = step_lib.learning_rate_args(groups, epoch)
  update = cache.update_fn(groups, epoch)
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    state, metrics = update(state, data, lrs, ep)
    jax.block_until_ready(metrics["loss"])
  warmup_s = time.perf_counter() - t0
  times, cpu0 = [], _cpu_seconds()
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = update(state, data, lrs, ep)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  import flax
  import optax
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / args.steps,
              device=f"{jax.devices()[0].platform} x{mesh.size} ({jax.devices()[0].device_kind})",
              loss=float(metrics["loss"]), convolutions=convolutions, compile_s=compile_s,
              versions=f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")


def run_torch(args) -> dict:
  import jax
  import numpy as np
  import torch

  sys.path.insert(0, os.path.join(REPO, "tests"))
  from dada_torch_reference import TorchDADATraining

  from dml_jax import methods
  from dml_jax import pytree as tree_lib

  c = _config(args.batch, args.image_size, args.tiny)
  method = methods.build(c, num_classes=NUM_CLASSES)
  params, method_state = method.init(jax.random.key(0))  # the same initial weights as ours
  flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}
  stats = {k: np.asarray(v) for k, v in tree_lib.flatten(method_state).items()}
  o = method.opts
  layers = tuple(c.model.backbone_overrides.get("layers", (3, 4, 6, 3)))
  groups = dict(c.optim.groups[i] for i in range(len(c.optim.groups)))
  hp = dict(lr=c.optim.lr, decay=c.optim.weight_decay, proxy_lr=groups["loss/proxies"]["lr"],
            dis_lr=groups["discriminators/.*"]["lr"], dis_decay=groups["discriminators/.*"]["weight_decay"],
            warmup=1, step_size=c.optim.schedule.step_size, gamma=c.optim.schedule.gamma, layers=layers,
            bn_freeze=o["bn_freeze"])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  training = TorchDADATraining(flat, stats, o, hp, device=device)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  labels = _labels(args.batch, rng)
  rows = args.batch + args.batch // 2
  draw_rng = np.random.RandomState(0)

  def draws():  # the authors' draws: numpy Beta in the code's order, torch Bernoulli dropout masks
    out = []
    for _ in range(o["d_step"] + 1):
      m = [draw_rng.beta(2.0, 2.0), draw_rng.beta(2.0, 2.0), draw_rng.beta(o["mix_alpha"], o["mix_beta"]),
           draw_rng.beta(o["mix_alpha"], o["mix_beta"])]
      pairs = [np.array([m[0], 1 - m[0]], np.float32), np.array([m[1], 1 - m[1]], np.float32),
               np.array([1 - m[2], m[2]], np.float32), np.array([1 - m[3], m[3]], np.float32)]
      masks = [torch.bernoulli(torch.full((rows, w), 1 - o["dropout"])).bool().numpy()
               for w in (o["fc_fc1_dim"], o["fc_fc2_dim"]) * 2]
      out.append((pairs, masks))
    return out

  def iteration():
    out = training.iteration(1, images, labels, draws())
    sync()
    return out

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    iteration()
  warmup_s = time.perf_counter() - t0
  times, cpu0 = [], _cpu_seconds()
  for _ in range(args.steps):
    t = time.perf_counter()
    _, loss = iteration()
    times.append(time.perf_counter() - t)
  name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
  return dict(times=times, warmup_s=warmup_s, cpu_per_step=(_cpu_seconds() - cpu0) / args.steps, device=name,
              loss=float(loss),
              versions=f"torch {torch.__version__}")


def _git_commit() -> str:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _markdown(meta: dict, rows: list[dict]) -> str:
  lines = ["# DADA iteration: dml_jax vs a torch re-creation of the authors' loop", "",
           f"Date {meta['date']}; git commit {meta['commit']}; machine: {meta['machine']}; "
           f"1-minute load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after "
           f"(**measured under load on a shared machine: compare the rows, not the runs**). "
           f"Python {meta['python']}; {'; '.join(sorted({r['versions'] for r in rows}))}.", "",
           f"Command: `{meta['command']}`", "",
           f"Setting: configs/dada_cub_resnet50.py after its warm-up, random weights and images, {meta['image_size']} "
           f"px, batch {meta['batch']}, {NUM_CLASSES} classes{' (tiny ResNet)' if meta['tiny'] else ''}; "
           f"{meta['steps']} timed iterations after {meta['warmup']} untimed.", "",
           "| impl | device | s/iteration min | median | max | CPU s/iteration | untimed first iterations (s) | "
           "compilation (s) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
    lines.append(f"| {r['impl']} | {r['device']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['max_s']:.3f} | "
                 f"{r['cpu_s_per_step']:.2f} | {r['warmup_s']:.1f} | {compile_s} |")
  ours = next((r for r in rows if r["impl"] == "ours" and r.get("convolutions")), None)
  if ours:
    conv = ours["convolutions"]
    lines += ["", f"Backbone forwards: the optimised program of a discriminator-only iteration (epoch 0: one backbone "
              f"forward, no backward) holds {conv['discriminator_only']} convolutions, that of a full iteration "
              f"{conv['full']} ({conv['full'] / max(conv['discriminator_only'], 1):.2f}x; one forward plus its "
              f"backward is about 3x, two forwards plus a backward about 4x). The authors' loop runs the backbone "
              f"forward twice per iteration (a no-grad pass, then the generator's); in dml_jax both passes are "
              f"written as in the code, and XLA computes the shared forward once."]
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
  p.add_argument("--batch", type=int, default=8, help="global batch (images per iteration), even")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--steps", type=int, default=3, help="timed iterations")
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (compilation, allocator warm-up)")
  p.add_argument("--tiny", action="store_true", help="a two-stage ResNet instead of ResNet-50 (smoke test)")
  p.add_argument("--json", default="", help="also write the results to this file")
  p.add_argument("--out", default="", help="write the figures as markdown to this file")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.batch % 2 or args.batch < 4:
    raise SystemExit("--batch must be even and at least 4 (classes x 2 images)")
  if args.child:
    result = (run_ours if args.child == "ours" else run_torch)(args)
    print("RESULT " + json.dumps(result))
    return

  command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:])
  load_before = os.getloadavg()[0]
  started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  rows = []
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for impl in args.impls:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--batch", str(args.batch), "--image_size",
           str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
               ["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    row = dict(impl=impl, min_s=min(r["times"]), median_s=statistics.median(r["times"]), max_s=max(r["times"]),
               times=r["times"], warmup_s=r["warmup_s"], cpu_s_per_step=r["cpu_per_step"], device=r["device"],
               versions=r["versions"], loss=r["loss"], convolutions=r.get("convolutions"),
               compile_s=r.get("compile_s"))
    rows.append(row)
    print(f"{impl:6s} batch {args.batch}: {row['median_s']:.3f} s/iteration median (min {row['min_s']:.3f}, "
          f"max {row['max_s']:.3f}; untimed {row['warmup_s']:.1f} s; CPU {row['cpu_s_per_step']:.2f} s/iteration) "
          f"on {row['device']}" + (f"; convolutions {row['convolutions']}" if row["convolutions"] else ""),
          flush=True)
  meta = dict(date=started, commit=_git_commit(),
              machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
              load_before=load_before, load_after=os.getloadavg()[0], python=platform.python_version(),
              command=command, batch=args.batch, image_size=args.image_size, steps=args.steps, warmup=args.warmup,
              tiny=args.tiny)
  print(f"load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after; commit {meta['commit']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
  if args.out:
    with open(args.out, "w") as f:
      f.write(_markdown(meta, rows))


if __name__ == "__main__":
  main()
