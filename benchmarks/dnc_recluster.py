"""Divide & Conquer re-clustering time on an SOP-sized training set: dml_jax (faiss / JAX k-means) vs a re-creation
of the authors' procedure (faiss `Clustering` + their torch cost matrix for the Hungarian relabelling).

Features: 59,551 x 2048 (the SOP training set's penultimate ResNet-50 features), synthetic and L2-normalised:
11,318 classes of 2..12 images (SOP's class sizes) around 12 super-classes (Gaussian centres and noise).
Two division steps of the reference run (mod_epoch 2, K_final 32):
  flat   epoch >= 12: 32-means (<= 30 trials until every cluster holds 2 classes of >= 2 images), Hungarian
         relabelling to the previous assignment, cleanup of single-image classes
  split  epoch 10: 16-means + relabelling, then every cluster split by 2-means (trials), cleanup
The previous assignment is a noisy, permuted copy of a first clustering (so the relabelling has work to do).
Implementations (all k-means: niter 100, nredo 1, seed 1234 + trial, no subsampling):
  ours_faiss  dml_jax.methods.divide_and_conquer.recluster(backend='faiss')   (faiss-cpu here)
  ours_jax    the same with backend='jax' (the JAX k-means: the path on GPU hosts without faiss-gpu)
  reference   faiss.Clustering + IndexFlatL2 as the authors' faissext, their cost matrix in torch (L1 norms of
              membership rows), scipy's Hungarian, their per-cluster loops (2-means splits, cleanup)
The embedding pass that precedes every re-clustering (ResNet-50 over the training set) is not timed here.

  python benchmarks/dnc_recluster.py                       # both cases, all implementations, 3 repeats
  python benchmarks/dnc_recluster.py --cases flat --impls ours_jax --repeats 1 --num_items 20000
  python benchmarks/dnc_recluster.py --out docs/benchmarks/dnc_recluster.md   # the docs section
  python benchmarks/dnc_recluster.py --quick               # tiny sizes: checks that it runs (CI)

Prints one JSON line per run and a markdown table (min / median / max seconds), stamped with the date, the git
commit, the machine, the load average before and after, the library versions and the command.
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

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def sop_like(num_items: int, num_classes: int, dim: int, seed: int = 0):
  """L2-normalised features [N, dim] and labels [N]: 12 super-classes (as SOP's), classes of 2..12 images around
  their super-class, images around their class, so that clusters follow classes as trained features do."""
  rng = np.random.default_rng(seed)
  values = np.arange(2, 13)
  probabilities = 0.72 ** values
  sizes = rng.choice(values, num_classes, p=probabilities / probabilities.sum())
  while sizes.sum() != num_items:  # nudge random classes until the total is exact
    step = 1 if sizes.sum() < num_items else -1
    ok = np.flatnonzero((sizes + step >= 2) & (sizes + step <= 12))
    sizes[rng.choice(ok, min(len(ok), abs(num_items - int(sizes.sum()))), replace=False)] += step
  labels = np.repeat(np.arange(num_classes), sizes)
  supers = rng.standard_normal((12, dim), dtype=np.float32)[rng.integers(0, 12, num_classes)]
  centres = supers + 0.8 * rng.standard_normal((num_classes, dim), dtype=np.float32)
  features = centres[labels] + 0.5 * rng.standard_normal((num_items, dim), dtype=np.float32)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  return features, labels


def previous_assignment(features, labels, k, seed=1):
  """A previous clustering: faiss k-means, ids permuted, 10% of the records moved, cleanup applied."""
  import faiss

  from dml_jax.methods import divide_and_conquer as dnc
  km = faiss.Kmeans(features.shape[1], k, niter=20, seed=seed, max_points_per_centroid=10_000_000)
  km.train(features)
  assign = km.index.search(features, 1)[1][:, 0].astype(np.int64)
  rng = np.random.default_rng(seed)
  assign = rng.permutation(k)[assign]
  moved = rng.random(len(assign)) < 0.1
  assign[moved] = rng.integers(0, k, moved.sum())
  return dnc.drop_single_image_classes(assign, labels, k)


# ------------------------------------------------------------------------- the authors' procedure, re-created


def reference_recluster(x, t, c_prev, k, split, ntrials=30):
  import faiss
  import torch
  from scipy.optimize import linear_sum_assignment

  def kmeans(points, num, seed):
    clus = faiss.Clustering(points.shape[1], num)
    clus.niter, clus.nredo, clus.seed, clus.max_points_per_centroid = 100, 1, seed, 10000000
    clus.train(points, faiss.IndexFlatL2(points.shape[1]))
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(faiss.vector_float_to_array(clus.centroids).reshape(num, -1))
    return index.search(points, 1)[1].ravel()

  def with_trials(points, labels, num):
    for trial in range(ntrials):
      c = kmeans(points, num, 1234 + trial)
      if all(np.sum(np.unique(labels[c == j], return_counts=True)[1] >= 2) >= 2 for j in range(num)):
        break
    return c

  times = {}
  start = time.perf_counter()
  c = with_trials(x, t, k)
  times["kmeans_s"] = time.perf_counter() - start
  start = time.perf_counter()
  n = int(c_prev.max()) + 1
  members = {"prev": torch.zeros(n, len(t)), "curr": torch.zeros(n, len(t))}
  for name, assign in (("prev", c_prev), ("curr", c)):
    for j in range(n):
      members[name][j, torch.from_numpy(np.flatnonzero(assign == j))] = 1
  costs = torch.zeros(n, n)
  for i in range(n):
    for j in range(n):
      costs[i, j] = torch.norm(members["curr"][i] - members["prev"][j], p=1)
  rows, cols = linear_sum_assignment(costs.numpy())
  renamed = c.copy()
  for a, b in zip(rows, cols):
    renamed[c == b] = a
  c = renamed
  times["relabel_s"] = time.perf_counter() - start
  if split:
    start = time.perf_counter()
    divided = np.full_like(c, -1)
    for j in np.unique(c):
      rows = np.flatnonzero(c == j)
      divided[rows] = 2 * j + with_trials(x[rows], t[rows], 2)
    c, k = divided, 2 * k
    times["split_s"] = time.perf_counter() - start
  start = time.perf_counter()
  for j in range(k):
    for cls in np.unique(t[c == j]):
      if np.sum(t[c == j] == cls) == 1:
        c[(t == cls) & (c == j)] = -1
  times["cleanup_s"] = time.perf_counter() - start
  return c, times


def ours_recluster(x, t, c_prev, k, split, backend):
  from dml_jax.methods import divide_and_conquer as dnc
  times = {}
  start = time.perf_counter()
  c, trials = dnc.kmeans_with_trials(x, t, k, backend=backend)
  times["kmeans_s"] = time.perf_counter() - start
  start = time.perf_counter()
  c = dnc.relabel_to_previous(c, c_prev)
  times["relabel_s"] = time.perf_counter() - start
  if split:
    start = time.perf_counter()
    c = dnc.split_clusters(x, t, c, backend=backend)
    k *= 2
    times["split_s"] = time.perf_counter() - start
  start = time.perf_counter()
  c = dnc.drop_single_image_classes(c, t, k)
  times["cleanup_s"] = time.perf_counter() - start
  return c, {**times, "trials": trials}


def stamp(args) -> dict:
  import faiss
  import jax
  import scipy
  import torch
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "commit": commit.stdout.strip() + ("+dirty" if dirty else ""),
          "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.default_backend()}",
          "versions": {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
                       "faiss": faiss.__version__, "torch": torch.__version__, "scipy": scipy.__version__},
          "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", nargs="+", default=["flat", "split"], choices=("flat", "split"))
  parser.add_argument("--impls", nargs="+", default=["ours_faiss", "ours_jax", "reference"],
                      choices=("ours_faiss", "ours_jax", "reference"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--num_items", type=int, default=59551)
  parser.add_argument("--num_classes", type=int, default=11318)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--json", help="append the JSON lines to this file")
  parser.add_argument("--out", help="write the markdown section (stamp, table) here")
  parser.add_argument("--quick", action="store_true", help="2,000 x 32 features, 400 classes, 1 repeat (CI)")
  args = parser.parse_args()
  if args.quick:
    args.num_items, args.num_classes, args.dim, args.repeats = 2000, 400, 32, 1
    try:
      import torch  # noqa: F401  (the reference's cost matrix is torch)
    except ImportError:
      args.impls = [i for i in args.impls if i != "reference"]
  from benchmarks import common

  doc_stamp = common.stamp()

  info = stamp(args)
  info["load_before"] = os.getloadavg()
  print("# " + json.dumps(info), flush=True)
  x, t = sop_like(args.num_items, min(args.num_classes, args.num_items // 2), args.dim)
  previous = {"flat": previous_assignment(x, t, 32), "split": previous_assignment(x, t, 16)}
  rows, checks = [], []
  for case in args.cases:
    k, split = (32, False) if case == "flat" else (16, True)
    results = {}
    for impl in args.impls:
      for repeat in range(args.repeats):
        start = time.perf_counter()
        if impl == "reference":
          c, times = reference_recluster(x, t, previous[case], k, split)
        else:
          c, times = ours_recluster(x, t, previous[case], k, split, impl.split("_")[1])
        total = time.perf_counter() - start
        row = {"case": case, "impl": impl, "repeat": repeat, "total_s": total, **times,
               "unused": int(np.sum(c < 0)), "clusters": int(c.max()) + 1, "N": len(t), "D": x.shape[1]}
        results.setdefault(impl, []).append((total, c))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
          with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, **info}) + "\n")
    if "reference" in results and "ours_faiss" in results:  # same faiss, same seeds: the same partition
      same = np.array_equal(results["reference"][0][1], results["ours_faiss"][0][1])
      checks.append(f"# {case}: ours_faiss {'==' if same else '!='} reference assignments")
      print(checks[-1], flush=True)
  info["load_after"] = os.getloadavg()
  print("# load average after: " + ", ".join(f"{v:.2f}" for v in info["load_after"]))

  table = ["| case | impl | total | k-means (with trials) | relabel | split | cleanup | first k-means trials |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for case in args.cases:
    for impl in args.impls:
      mine = [r for r in rows if r["case"] == case and r["impl"] == impl]

      def cell(key, mine=mine):
        values = [r[key] for r in mine if key in r]
        if not values:
          return "-"
        return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"

      trials = mine[0].get("trials", "-")
      table.append(f"| {case} | {impl} | {cell('total_s')} | {cell('kmeans_s')} | {cell('relabel_s')} | "
                   f"{cell('split_s')} | {cell('cleanup_s')} | {trials} |")
  body = common.stamp_lines(doc_stamp) + [
      "",
      f"Synthetic L2-normalised features of SOP's training-set shape: {args.num_items:,} x {args.dim}, "
      f"{min(args.num_classes, args.num_items // 2):,} classes of 2-12 images under 12 super-classes; the previous "
      f"assignment is a noisy, permuted earlier clustering. flat = 32-means with trials + Hungarian relabelling + "
      f"cleanup (every 2 epochs from epoch 12); split = 16-means + relabelling, then a 2-means split of every "
      f"cluster (epoch 10). k-means niter 100, nredo 1, seeds 1234 + trial, no subsampling. ours_faiss / ours_jax = "
      f"dml_jax.methods.divide_and_conquer.recluster with faiss / the JAX k-means; reference = the authors' "
      f"procedure re-created (faiss.Clustering, their torch cost matrix, scipy's Hungarian, their per-cluster "
      f"loops). Seconds, min / median / max over {args.repeats} repeat(s); the JAX k-means compiles in its first "
      f"repeat (one shape per cluster size in the split).",
      "",
      *table,
  ]
  same = [line[2:] for line in checks]
  if same:
    body += ["", "Same faiss, same seeds: " + "; ".join(same) + "."]
  words = []
  for case in args.cases:
    ref = [r["total_s"] for r in rows if r["case"] == case and r["impl"] == "reference"]
    for impl in args.impls:
      mine = [r["total_s"] for r in rows if r["case"] == case and r["impl"] == impl]
      if impl == "reference" or not ref or not mine:
        continue
      ratio = statistics.median(mine) / statistics.median(ref)
      verdict = "**slower**" if ratio > 1.05 else ("faster" if ratio < 0.95 else "as fast")
      words.append(f"- {case}: {impl} is {verdict}: {ratio:.2f}x the reference's median total.")
  if words:
    body += ["", "In words:", "", *words]
  common.write_section(args.out, "Divide & Conquer re-clustering: dml_jax (faiss, JAX k-means) vs the authors' "
                       "procedure", body)


if __name__ == "__main__":
  main()
