"""The metric suite never holds an N x N matrix: peak RSS growth stays far below N^2 floats.

Scaled-down version of the SOP-shaped bound (60,502 x 512 in < 4 GB, measured in
benchmarks/eval_metrics.py): 16,000 rows, for which one N x N float32 matrix is 977 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_memory_of_the_metric_suite_is_bounded_by_chunks():
  script = textwrap.dedent("""
      import json
      import numpy as np
      from dml_jax.eval import metrics

      def status(key):  # bytes
        with open("/proc/self/status") as lines:
          return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))

      def sop_like(num, rng):  # SOP-like classes of 2..12 images
        sizes = rng.integers(2, 13, num // 5 + 1)
        labels = np.repeat(np.arange(len(sizes)), sizes)[:num]
        centers = rng.standard_normal((labels.max() + 1, 32))
        return (centers[labels] + rng.standard_normal((num, 32))).astype(np.float32), labels

      names = ["recall@1", "recall@10", "recall@100", "r_precision", "map@r", "marp"]
      options = dict(backend="jax", chunk_size=256, gallery_chunk_size=4096)
      rng = np.random.default_rng(0)
      small = sop_like(600, rng)  # compile-time allocations happen before the baseline
      metrics.retrieval_metrics(*small, metrics=names, **options)
      metrics.clustering_metrics(*small, niter=1, backend="jax")
      embeddings, labels = sop_like(16000, rng)
      # Restart the peak (VmHWM) here, so imports and warm-up compiles do not count (Linux clear_refs).
      warmup_peak = status("VmHWM")
      with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
      baseline = status("VmRSS")
      retrieval = metrics.retrieval_metrics(embeddings, labels, metrics=names, **options)
      clustering = metrics.clustering_metrics(embeddings, labels, niter=2, backend="jax")
      peak = status("VmHWM")
      print(json.dumps({"growth": peak - baseline, "warmup_peak": warmup_peak, "recall@1": retrieval["recall@1"],
                        "nmi": clustering["nmi"]}))
  """)
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  full_matrix = 16000 * 16000 * 4
  assert 0.0 < result["recall@1"] <= 1.0 and 0.0 < result["nmi"] <= 1.0
  assert result["growth"] < full_matrix / 8, (
      f"peak RSS grew by {result['growth'] / 2**20:.0f} MB (warm-up peak {result['warmup_peak'] / 2**20:.0f} MB)")
