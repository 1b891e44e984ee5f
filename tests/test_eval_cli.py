"""`python -m dml_jax.evaluate` on saved embeddings: default metrics, JSON names, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dml_jax import evaluate
from dml_jax.eval import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def saved(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 20, 200)
  embeddings = (rng.standard_normal((20, 12))[labels] + rng.standard_normal((200, 12))).astype(np.float32)
  paths = {name: str(tmp_path / f"{name}.npy") for name in ("embeddings", "labels", "query", "json")}
  np.save(paths["embeddings"], embeddings)
  np.save(paths["labels"], labels)
  np.save(paths["query"], np.arange(200) % 2 == 0)
  return paths, embeddings, labels


def test_default_metrics_written_as_json(saved):
  paths, embeddings, labels = saved
  results = evaluate.main(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--json", paths["json"],
                           "--backend", "jax"])
  with open(paths["json"], encoding="utf-8") as file:
    written = json.load(file)
  assert list(written) == ["recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi"]
  assert written == pytest.approx(results)
  direct = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["recall", "r_precision", "map@r"],
                                         backend="jax")
  assert all(written[name] == pytest.approx(value) for name, value in direct.items())


def test_query_mask_and_metric_list_via_module_entry_point(saved):
  paths, embeddings, labels = saved
  command = [sys.executable, "-m", "dml_jax.evaluate", "--embeddings", paths["embeddings"], "--labels",
             paths["labels"], "--query_mask", paths["query"], "--metrics", "recall@1,recall@10", "f1", "marp",
             "--json", paths["json"]]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"})
  assert completed.returncode == 0, completed.stderr
  with open(paths["json"], encoding="utf-8") as file:
    written = json.load(file)
  assert list(written) == ["recall@1", "recall@10", "marp", "f1"]
  query = np.arange(200) % 2 == 0
  direct = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=query, metrics=["recall@1", "recall@10"])
  assert written["recall@1"] == pytest.approx(direct["recall@1"])
  assert written["recall@10"] == pytest.approx(direct["recall@10"])


@pytest.mark.parametrize("corrupt, message", [
    ("nan", "contain NaN or Inf in 1 of 200 rows"),
    ("short_labels", "one label per embedding row (200), got shape (199,)"),
    ("1d_embeddings", "must be a 2-D [N, D] array"),
    ("float_labels", "must be integers"),
    ("bad_mask", "must have shape (200,), one flag per embedding row, got (10,)"),
    ("missing", "does not exist"),
    ("metric", "unknown metric 'mrr'"),
])
def test_bad_input_stops_with_a_clear_message(saved, capsys, corrupt, message):
  paths, embeddings, labels = saved
  extra = []
  if corrupt == "nan":
    embeddings = embeddings.copy()
    embeddings[7, 3] = np.nan
    np.save(paths["embeddings"], embeddings)
  elif corrupt == "short_labels":
    np.save(paths["labels"], labels[:-1])
  elif corrupt == "1d_embeddings":
    np.save(paths["embeddings"], embeddings[:, 0])
  elif corrupt == "float_labels":
    np.save(paths["labels"], labels + 0.5)
  elif corrupt == "bad_mask":
    np.save(paths["query"], np.ones(10, bool))
    extra = ["--query_mask", paths["query"]]
  elif corrupt == "missing":
    paths["labels"] = paths["labels"] + ".gone"
  elif corrupt == "metric":
    extra = ["--metrics", "mrr"]
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--json", paths["json"],
                   "--backend", "jax", *extra])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(paths["json"])
