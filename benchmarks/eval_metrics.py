"""Time and peak memory of the evaluation metric suite, dml_jax vs pytorch-metric-learning.

Synthetic L2-normalised embeddings shaped like the test sets:
  sop   60,502 x 512, 11,316 classes of 2..12 images (SOP test)
  inat  136,093 x 512, 2,452 classes, long-tailed sizes (iNaturalist-2018 test, Brown et al. split)
Implementations, each in a fresh subprocess (so its peak RSS is its own):
  ours_auto  dml_jax.eval, backend 'auto' (FAISS for kNN and k-means on a CPU machine)
  ours_jax   dml_jax.eval, backend 'jax' (chunked JAX kNN, JAX k-means: the GPU path without faiss-gpu)
  pml        pytorch-metric-learning AccuracyCalculator(k='max_bin_count') on CPU: precision_at_1,
             r_precision, mean_average_precision_at_r, NMI (faiss IndexFlatL2 + faiss.Kmeans(niter=20))
Ours computes the dataset protocol's Recall@K (SOP 1, 10, 100, 1000; iNat 1, 4, 16, 32), precision@1,
R-Precision, MAP@R, NMI and F1 (k-means niter 20, as PML).

  python benchmarks/eval_metrics.py --cases sop --impls ours_auto pml
  python benchmarks/eval_metrics.py --cases inat --num_items 34023 --num_classes 613 --impls ours_auto pml

Times: wall seconds and process CPU seconds (all threads); on a machine shared with other jobs the CPU
seconds are the steadier figure. Peak RSS is the process's maximum resident set (getrusage), data included; "growth" is that peak minus
the resident set after the embeddings were generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CASES = {
    "sop": dict(num_items=60502, num_classes=11316, dim=512, sizes="sop", recall_ks=(1, 10, 100, 1000)),
    "inat": dict(num_items=136093, num_classes=2452, dim=512, sizes="longtail", recall_ks=(1, 4, 16, 32)),
}


def class_sizes(num_items: int, num_classes: int, kind: str, rng: np.random.Generator) -> np.ndarray:
  """Class sizes summing to num_items: 'sop' = 2..12 (geometric-like, mean ~5.3), 'longtail' = lognormal(sigma 0.8), >= 2."""
  if kind == "sop":
    values = np.arange(2, 13)
    probabilities = 0.72 ** values
    sizes = rng.choice(values, num_classes, p=probabilities / probabilities.sum())
    low, high = 2, 12
  else:
    sizes = np.maximum(2, np.round(rng.lognormal(0.0, 0.8, num_classes) * num_items / num_classes / np.exp(0.32)))
    sizes = sizes.astype(int)
    low, high = 2, None
  while sizes.sum() != num_items:  # nudge random classes until the total is exact
    step = 1 if sizes.sum() < num_items else -1
    candidates = np.flatnonzero((sizes + step >= low) & ((high is None) | (sizes + step <= (high or 0))))
    chosen = rng.choice(candidates, min(len(candidates), abs(num_items - int(sizes.sum()))), replace=False)
    sizes[chosen] += step
  return sizes


def synthetic(num_items: int, num_classes: int, dim: int, sizes_kind: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  sizes = class_sizes(num_items, num_classes, sizes_kind, rng)
  labels = np.repeat(np.arange(num_classes), sizes)
  rng.shuffle(labels)
  embeddings = rng.standard_normal((num_classes, dim), dtype=np.float32)[labels] * 0.45
  embeddings += rng.standard_normal((num_items, dim), dtype=np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  return embeddings, labels.astype(np.int64), sizes


def _rss() -> int:
  with open("/proc/self/status", encoding="utf-8") as status:
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def worker(impl: str, case: dict, niter: int, skip_clustering: bool) -> dict:
  embeddings, labels, sizes = synthetic(case["num_items"], case["num_classes"], case["dim"], case["sizes"])
  if impl == "pml":
    import torch  # pylint: disable=import-outside-toplevel
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # pylint: disable=import-outside-toplevel
  else:
    from dml_jax.eval import metrics  # pylint: disable=import-outside-toplevel
  baseline = _rss()
  result = {"max_class_size": int(sizes.max()), "mean_class_size": float(sizes.mean())}
  start, start_cpu = time.perf_counter(), time.process_time()
  if impl == "pml":
    calculator = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                    k="max_bin_count", device=torch.device("cpu"))
    values = calculator.get_accuracy(embeddings, labels)
    result.update({"precision@1": values["precision_at_1"], "r_precision": values["r_precision"],
                   "map@r": values["mean_average_precision_at_r"]})
  else:
    backend = impl.split("_", 1)[1]
    result.update(metrics.retrieval_metrics(embeddings, labels, metrics=["recall", "precision@1", "r_precision", "map@r"],
                                            recall_ks=case["recall_ks"], backend=backend))
  result["retrieval_s"] = time.perf_counter() - start
  result["retrieval_cpu_s"] = time.process_time() - start_cpu
  if not skip_clustering:
    start, start_cpu = time.perf_counter(), time.process_time()
    if impl == "pml":
      if niter != 20:
        raise SystemExit("PML's AccuracyCalculator fixes niter=20")
      calculator = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
      result["nmi"] = calculator.get_accuracy(embeddings, labels)["NMI"]
    else:
      result.update(metrics.clustering_metrics(embeddings, labels, niter=niter, backend=backend))
    result["clustering_s"] = time.perf_counter() - start
    result["clustering_cpu_s"] = time.process_time() - start_cpu
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  result["growth_mb"] = result["peak_rss_mb"] - baseline / 2**20
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", nargs="+", default=["sop"], choices=sorted(CASES))
  parser.add_argument("--impls", nargs="+", default=["ours_auto", "pml"], choices=("ours_auto", "ours_jax", "pml"))
  parser.add_argument("--num_items", type=int, help="override the case's number of embeddings")
  parser.add_argument("--num_classes", type=int, help="override the case's number of classes")
  parser.add_argument("--dim", type=int, help="override the embedding dimension (512)")
  parser.add_argument("--recall_ks", type=int, nargs="+", help="override the case's Recall@K values (ours)")
  parser.add_argument("--niter", type=int, default=20, help="k-means iterations (PML: 20, fixed)")
  parser.add_argument("--skip_clustering", action="store_true", help="retrieval metrics only")
  parser.add_argument("--json", help="append one JSON line per run to this file")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()

  overrides = {key: value for key, value in (("num_items", args.num_items), ("num_classes", args.num_classes),
                                             ("dim", args.dim), ("recall_ks", args.recall_ks)) if value}
  if args.worker:
    case = {**CASES[args.cases[0]], **overrides}
    print(json.dumps(worker(args.worker, case, args.niter, args.skip_clustering)))
    return

  print(f"# {platform.node()}  python {platform.python_version()}  cpus {os.cpu_count()}")
  rows = []
  for case_name in args.cases:
    case = {**CASES[case_name], **overrides}
    for impl in args.impls:
      command = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--cases", case_name,
                 "--niter", str(args.niter)]
      for key in ("num_items", "num_classes", "dim"):
        if key in overrides:
          command += [f"--{key}", str(overrides[key])]
      if "recall_ks" in overrides:
        command += ["--recall_ks", *map(str, overrides["recall_ks"])]
      if args.skip_clustering:
        command.append("--skip_clustering")
      start = time.perf_counter()
      completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": REPO})
      wall = time.perf_counter() - start
      if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{impl} on {case_name} failed")
      result = {"case": case_name, "impl": impl, "num_items": case["num_items"], "num_classes": case["num_classes"],
                "dim": case["dim"], "process_wall_s": wall, **json.loads(completed.stdout.strip().splitlines()[-1])}
      rows.append(result)
      print(json.dumps(result), flush=True)
      if args.json:
        with open(args.json, "a", encoding="utf-8") as file:
          file.write(json.dumps(result) + "\n")

  print("\n| case | impl | N x D, classes | retrieval s (CPU s) | clustering s (CPU s) | peak RSS MB | growth MB | "
        "recall@1 / P@1 | R-Prec | MAP@R | NMI |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    def fmt(key, digits=4):
      return f"{row[key]:.{digits}f}" if key in row else "-"
    first = row.get("recall@1", row.get("precision@1"))
    print(f"| {row['case']} | {row['impl']} | {row['num_items']} x {row['dim']}, {row['num_classes']} | "
          f"{fmt('retrieval_s', 1)} ({fmt('retrieval_cpu_s', 1)}) | {fmt('clustering_s', 1)} ({fmt('clustering_cpu_s', 1)}) | "
          f"{fmt('peak_rss_mb', 0)} | {fmt('growth_mb', 0)} | "
          f"{first:.4f} | {fmt('r_precision')} | {fmt('map@r')} | {fmt('nmi')} |")


if __name__ == "__main__":
  main()
