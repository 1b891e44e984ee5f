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

Each implementation runs in its own subprocess. Reported per row: min / median / max seconds per iteration over
--steps timed iterations after --warmup untimed ones, process CPU seconds per iteration, the untimed iterations'
time (torch: its allocator warm-up) and ours' compilation (ahead of time, reported apart: the timed and untimed
iterations run the compiled executable). The section is stamped by benchmarks/common.py (date, commit, machine,
load average before and after, versions, the exact command).

  python benchmarks/dada_step.py --batch 8 --steps 5 --warmup 1 --out docs/benchmarks/dada.md   # the docs section
  python benchmarks/dada_step.py --batch 90 --steps 20 --warmup 3      # the recipe's batch, on a GPU
  python benchmarks/dada_step.py --quick      # tiny sizes: checks that it runs (CI); its figures mean nothing

--quick: a two-stage ResNet (one bottleneck per stage, 8 / 16 channels) on 32 px images, batch 4, 1 untimed + 2
timed iterations; torch's row only when torch is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
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

  convolutions, compiled = {}, {}
  for name, epoch in (("discriminator_only", 0), ("full", 1)):
    groups, state = state_for(epoch)
    lrs, ep = step_lib.learning_rate_args(groups, epoch)
    t = time.perf_counter()
    compiled[name] = cache.update_fn(groups, epoch).lower(state, data, lrs, ep).compile()
    if name == "full":
      compile_s = time.perf_counter() - t
    convolutions[name] = len(re.findall(r"= \S+ convolution\(", compiled[name].as_text()))

  epoch = 1  # after CUB's warm-up: every group trains
  groups, state = state_for(epoch)
  lrs, ep = step_lib.learning_rate_args(groups, epoch)
  update = compiled["full"]  # the executable compiled above: no compilation in the timed or untimed iterations
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
              loss=float(metrics["loss"]), convolutions=convolutions, compile_s=compile_s, d_step=method.opts["d_step"],
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


def _torch_installed() -> bool:
  try:
    import torch  # noqa: F401  (the re-creation is torch)
  except ImportError:
    return False
  return True


def _section(args, doc_stamp: dict, load_after: float, rows: list[dict]) -> list[str]:
  from benchmarks import common

  model = "a two-stage ResNet (--tiny)" if args.tiny else "ResNet-50"
  d_step = next((r["d_step"] for r in rows if "d_step" in r), "d_step")
  body = common.stamp_lines(doc_stamp, load_after) + [
      "",
      f"Setting: configs/dada_cub_resnet50.py after its warm-up (every group trains) with {model}, random weights "
      f"and images, {args.image_size} px, batch {args.batch} ({args.batch // 2} classes x 2, one drawn twice), "
      f"{NUM_CLASSES} classes. One iteration = the no-grad forward, {d_step} discriminator steps, the "
      f"generator step. Seconds per iteration, min / median / max over {args.steps} timed iterations after "
      f"{args.warmup} untimed; ours is compiled ahead of time (its compilation apart), torch's untimed iterations "
      f"hold its allocator warm-up." + (" --quick: the figures only show that it runs." if args.quick else ""),
      "",
      *common.table(["impl", "device", "s/iteration min / median / max", "CPU s/iteration", "untimed iterations s",
                     "compilation s"],
                    [(r["impl"], r["device"], common.fmt_spread(r["times"]), f"{r['cpu_s_per_step']:.2f}",
                      f"{r['warmup_s']:.1f}", "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}")
                     for r in rows], "llrrrr"),
  ]
  ours = next((r for r in rows if r["impl"] == "ours"), None)
  theirs = next((r for r in rows if r["impl"] == "torch"), None)
  if ours and theirs:
    a, b = (common.spread(r["times"])[1] for r in (ours, theirs))
    body += ["", f"Median: ours {a:.3f} s, the torch re-creation {b:.3f} s per iteration: ours is "
             + (f"{b / a:.2f}x faster." if a <= b else f"{a / b:.2f}x slower (ours is the slower one here).")]
  if ours and ours.get("convolutions"):
    conv = ours["convolutions"]
    body += ["", f"Backbone forwards: the optimised program of a discriminator-only iteration (epoch 0: one backbone "
             f"forward, no backward) holds {conv['discriminator_only']} convolutions, that of a full iteration "
             f"{conv['full']} ({conv['full'] / max(conv['discriminator_only'], 1):.2f}x; one forward plus its "
             f"backward is about 3x, two forwards plus a backward about 4x). The authors' loop runs the backbone "
             f"forward twice per iteration (a no-grad pass, then the generator's); in dml_jax both passes are "
             f"written as in the code, and XLA computes the shared forward once."]
  body += ["", "Not measured here: the recipe's batch of 90, a GPU, bfloat16."]
  return body


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impls", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
  p.add_argument("--batch", type=int, default=8, help="global batch (images per iteration), even")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--steps", type=int, default=5, help="timed iterations")
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (torch's allocator warm-up)")
  p.add_argument("--tiny", action="store_true", help="a two-stage ResNet instead of ResNet-50 (smoke test)")
  p.add_argument("--json", default="", help="also write the results to this file")
  p.add_argument("--out", default="", help="write the markdown section (stamp, table) here")
  p.add_argument("--quick", action="store_true", help="tiny ResNet, 32 px, batch 4, 1 + 2 iterations (CI)")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick and not args.child:
    args.tiny, args.image_size, args.batch, args.steps, args.warmup = True, 32, 4, 2, 1
    if not _torch_installed():
      args.impls = [i for i in args.impls if i != "torch"]
  if args.batch % 2 or args.batch < 4:
    raise SystemExit("--batch must be even and at least 4 (classes x 2 images)")
  if args.child:
    result = (run_ours if args.child == "ours" else run_torch)(args)
    print("RESULT " + json.dumps(result))
    return

  from benchmarks import common

  doc_stamp = common.stamp()
  rows, failed = [], []
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for impl in args.impls:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--batch", str(args.batch), "--image_size",
           str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
               ["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
      failed.append(impl)
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    rows.append(dict(impl=impl, **r))
    lo, mid, hi = common.spread(r["times"])
    print(f"{impl:6s} batch {args.batch}: {mid:.3f} s/iteration median (min {lo:.3f}, max {hi:.3f}; untimed "
          f"{r['warmup_s']:.1f} s; CPU {r['cpu_per_step']:.2f} s/iteration) on {r['device']}"
          + (f"; convolutions {r['convolutions']}" if r.get("convolutions") else ""), flush=True)
  for row in rows:
    row["cpu_s_per_step"] = row.pop("cpu_per_step")
  load_after = common.load_average()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(stamp=doc_stamp, load_after=load_after, rows=rows), f, indent=2)
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)}")
  common.write_section(args.out or None, "DADA iteration: dml_jax vs a torch re-creation of the authors' loop",
                       _section(args, doc_stamp, load_after, rows))


if __name__ == "__main__":
  main()
