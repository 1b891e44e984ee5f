"""`python -m dml_jax.evaluate` on saved embeddings: the table, JSON names, .npz inputs, degenerate labels,
queries without a positive, and one `error:` line naming the file for every bad input."""

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
  results = evaluate.run(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--json", paths["json"],
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
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is not a readable .npy"),
    ("pickled", "holds pickled objects"),
    ("text_labels", "labels file"),
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
  elif corrupt == "empty":
    open(paths["embeddings"], "wb").close()
  elif corrupt == "truncated":
    data = open(paths["embeddings"], "rb").read()
    with open(paths["embeddings"], "wb") as file:
      file.write(data[:100])
  elif corrupt == "pickled":
    np.save(paths["labels"], np.array([{"a": 1}] * 200, dtype=object), allow_pickle=True)
  elif corrupt == "text_labels":
    with open(paths["labels"], "w", encoding="utf-8") as file:
      file.write("1\n2\n")
  status = evaluate.main(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--json", paths["json"],
                          "--backend", "jax", *extra])
  assert status == 2
  err = capsys.readouterr().err
  assert message in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line, no traceback
  if corrupt not in ("metric", "nan", "bad_mask", "1d_embeddings", "short_labels", "float_labels"):
    assert os.path.basename(paths["labels"] if "labels" in corrupt or corrupt in ("missing", "pickled")
                            else paths["embeddings"]) in lines[0]  # the file is named
  assert not os.path.exists(paths["json"])


def test_table_without_json(saved, capsys):
  paths, _, _ = saved
  results = evaluate.run(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--metrics", "recall@1",
                          "map@r", "--backend", "jax"])
  out = capsys.readouterr().out
  assert ["recall@1", f"{results['recall@1']:.4f}"] in [line.split() for line in out.splitlines()]
  assert "every query has a positive" in out and "200 x 12" in out
  assert not os.path.exists(paths["json"])


def test_npz_with_named_arrays_equals_npy(saved, tmp_path, capsys):
  paths, embeddings, labels = saved
  npy = evaluate.run(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--metrics", "recall@1",
                      "r_precision", "--backend", "jax"])
  bundle = tmp_path / "run.npz"
  np.savez(bundle, embeddings=embeddings, labels=labels)
  assert evaluate.run(["--embeddings", str(bundle), "--metrics", "recall@1", "r_precision", "--backend",
                       "jax"]) == pytest.approx(npy)
  renamed = tmp_path / "renamed.npz"
  np.savez(renamed, emb=embeddings, lab=labels, q=np.arange(200) % 2 == 0)
  assert evaluate.main(["--embeddings", str(renamed), "--backend", "jax"]) == 2
  err = capsys.readouterr().err
  assert "renamed.npz holds no array 'embeddings' (it holds: emb, lab, q)" in err and "--embeddings_key" in err
  masked = evaluate.run(["--embeddings", str(renamed), "--embeddings_key", "emb", "--labels_key", "lab",
                         "--query_mask", str(renamed), "--query_mask_key", "q", "--metrics", "recall@1",
                         "--backend", "jax"])
  direct = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=np.arange(200) % 2 == 0,
                                         metrics=["recall@1"], backend="jax")
  assert masked["recall@1"] == pytest.approx(direct["recall@1"])


@pytest.mark.parametrize("labels, message", [
    (np.zeros(200, np.int64), "have one class (0)"),
    (np.arange(200), "none of the 200 queries has a positive"),
])
def test_degenerate_labels_are_refused(saved, capsys, labels, message):
  paths, _, _ = saved
  np.save(paths["labels"], labels)
  assert evaluate.main(["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--backend", "jax"]) == 2
  err = capsys.readouterr().err
  assert message in err and "labels.npy" in err


def test_queries_without_positive_are_counted_and_the_flag_rescales(saved, capsys):
  paths, embeddings, labels = saved
  labels = labels.copy()
  labels[:30] = 1000 + np.arange(30)  # 30 singleton classes: queries without a positive
  np.save(paths["labels"], labels)
  common = ["--embeddings", paths["embeddings"], "--labels", paths["labels"], "--backend", "jax", "--metrics",
            "recall@1", "r_precision", "map@r", "marp"]
  seeds = evaluate.run(common)
  out = capsys.readouterr().out
  assert "30 of 200 queries have no positive" in out
  assert "recall@1, marp count them as misses; r_precision, map@r leave them out (--no_positive seeds)" in out
  # The default is exactly the library's (pytorch-metric-learning-equal) numbers.
  direct = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["recall@1", "r_precision", "map@r", "marp"],
                                         backend="jax")
  assert seeds == pytest.approx(direct)
  exclude = evaluate.run(common + ["--no_positive", "exclude"])
  miss = evaluate.run(common + ["--no_positive", "miss"])
  assert exclude["recall@1"] == pytest.approx(seeds["recall@1"] * 200 / 170)
  assert exclude["marp"] == pytest.approx(seeds["marp"] * 200 / 170)
  assert exclude["r_precision"] == pytest.approx(seeds["r_precision"])
  assert miss["r_precision"] == pytest.approx(seeds["r_precision"] * 170 / 200)
  assert miss["map@r"] == pytest.approx(seeds["map@r"] * 170 / 200)
  assert miss["recall@1"] == pytest.approx(seeds["recall@1"])
