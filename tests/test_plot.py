"""Pictures of a run from its files: metrics.jsonl and the saved test embeddings -> PNGs; the embeddings file."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from dml_jax import plot
from dml_jax.data import synthetic
from dml_jax.eval import metrics as metrics_lib
from dml_jax.eval import saved as saved_lib

CLASSES = ["apple", "bicycle", "cat", "door", "eagle"]


def _rows():
  """A run's log as the trainer writes it: config, evaluation before training, three epochs of two logged steps,
  a resume that logged epoch 1's steps again (the later rows count), a line cut short, the summary."""
  rows = [{"kind": "config", "step": 0, "epoch": 0, "config": {"eval": {"select_on": "test",
                                                                        "select_metric": "recall@1"}}},
          {"kind": "eval", "step": 0, "epoch": -1, "split": "test", "recall@1": 0.4, "map@r": 0.1}]
  for epoch in range(3):
    for i in (1, 2):
      step = 2 * epoch + i
      rows.append({"kind": "train", "step": step, "epoch": epoch, "loss": 5.0 - step * 0.5, "lr/base": 1e-4,
                   "lr/proxies": 1e-2})
    rows.append({"kind": "eval", "step": 2 * epoch + 2, "epoch": epoch, "split": "test",
                 "recall@1": [0.5, 0.7, 0.6][epoch], "map@r": [0.2, 0.3, 0.35][epoch]})
  rows.append({"kind": "train", "step": 3, "epoch": 1, "loss": 1.5, "lr/base": 1e-4, "lr/proxies": 1e-2})
  rows.append({"kind": "eval", "step": 4, "epoch": 1, "split": "test", "recall@1": 0.7, "checkpoint": "best"})
  return rows


def _write_run(workdir, embeddings=True):
  workdir.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps(r) for r in _rows()] + ['{"kind": "train", "st']
  lines.append(json.dumps({"kind": "summary", "step": 4, "epoch": 3,
                           "best": {"value": 0.7, "epoch": 1, "step": 4, "split": "test", "metric": "recall@1"}}))
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  if not embeddings:
    return None
  files = synthetic.picture_folder(str(workdir.parent / "photos"), CLASSES, 6, size=(40, 32))
  paths = [p for c in CLASSES for p in files[c]]
  labels = np.repeat(np.arange(len(CLASSES)), 6)
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(len(CLASSES), 16))[labels] + rng.normal(scale=0.9, size=(len(labels), 16))
  return saved_lib.save_embeddings(saved_lib.best_test_path(workdir), emb, labels, paths, ["test"] * len(labels),
                                   protocol="folder", class_names=CLASSES, step=4, epoch=1)


def test_read_run_log_keeps_the_later_rows_and_skips_cut_lines(tmp_path, caplog):
  _write_run(tmp_path / "run", embeddings=False)
  with caplog.at_level(logging.WARNING, logger="dml_jax.plot"):
    run = plot.read_run_log(tmp_path / "run")
  assert "not JSON" in caplog.text
  assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5, 6]
  assert run.train[2]["loss"] == 1.5  # the resumed run's row
  assert [(r["epoch"], r["recall@1"]) for r in run.eval] == [(-1, 0.4), (0, 0.5), (1, 0.7), (2, 0.6)]
  assert run.best()["epoch"] == 1 and run.select == ("test", "recall@1")
  x = plot._epoch_positions(run.train)
  assert np.allclose(x, [-0.5, 0, 0.5, 1, 1.5, 2])  # epoch e's steps end where its evaluation is plotted


def test_plot_run_writes_every_png(tmp_path, capsys):
  _write_run(tmp_path / "run")
  assert plot.main(["--workdir", str(tmp_path / "run")]) == 0
  written = capsys.readouterr().out.split()
  names = ["curves.png", "recall_at_k.png", "retrieval.png", "embedding_map.png"]
  assert [p.rsplit("/", 1)[1] for p in written] == names
  for path in written:
    with Image.open(path) as img:
      assert img.format == "PNG" and min(img.size) > 300
      assert np.asarray(img.convert("L")).std() > 10  # something was drawn
  with Image.open(written[2]) as img:  # 10 rows (4 fixed, 3 best, 3 worst) of query + 8 results, 110 dpi
    assert img.size == (int((0.3 + 9 * 1.53 + 0.18) * 110), int((0.5 + 10 * 1.81 + 0.08) * 110))


def test_plot_run_without_embeddings_draws_the_curves_and_says_why(tmp_path, caplog):
  _write_run(tmp_path / "run", embeddings=False)
  with caplog.at_level(logging.WARNING, logger="dml_jax.plot"):
    written = plot.plot_run(tmp_path / "run", out_dir=tmp_path / "out")
  assert [p.name for p in written] == ["curves.png"]
  assert "best_test.npz does not exist" in caplog.text and "retrieval.png" in caplog.text
  assert plot.main(["--workdir", str(tmp_path / "nothing")]) == 1


@pytest.mark.parametrize("query_gallery", [False, True])
def test_recall_curve_agrees_with_the_metrics(tmp_path, query_gallery):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 6, 60)
  emb = rng.normal(size=(6, 8))[labels] + rng.normal(scale=1.2, size=(60, 8))
  roles = np.where(np.arange(60) % 3 == 0, "query", "gallery") if query_gallery else np.full(60, "test")
  path = saved_lib.save_embeddings(tmp_path / "e.npz", emb, labels, [f"{i}.jpg" for i in range(60)], roles,
                                   protocol="inshop" if query_gallery else "cub200")
  saved = saved_lib.load_embeddings(path)
  recall, chance = plot.recall_curve(saved, 16)
  mask = roles == "query" if query_gallery else None
  expected = metrics_lib.retrieval_metrics(emb, labels, query_mask=mask, metrics=["recall"],
                                           recall_ks=(1, 2, 4, 8, 16), backend="jax")
  for k in (1, 2, 4, 8, 16):
    assert recall[k - 1] == pytest.approx(expected[f"recall@{k}"])
  assert np.all(np.diff(chance) >= 0) and chance[0] < recall[0]


def test_embeddings_file_round_trip_and_errors(tmp_path):
  path = saved_lib.save_embeddings(tmp_path / "sub" / "e.npz", np.ones((3, 4)), [0, 1, 1], ["a", "b", "c"],
                                   ["test"] * 3, protocol="folder", class_names=["x", "y"], step=7, epoch=2)
  e = saved_lib.load_embeddings(path)
  assert e.embeddings.dtype == np.float32 and list(e.class_names) == ["x", "y"] and (e.step, e.epoch) == (7, 2)
  assert e.protocol == "folder" and e.split == "test" and list(e.paths) == ["a", "b", "c"]
  with pytest.raises(ValueError, match=r"paths must have shape \(3,\)"):
    saved_lib.save_embeddings(tmp_path / "x.npz", np.ones((3, 4)), [0, 1, 1], ["a"], ["test"] * 3, protocol="x")
  np.savez(tmp_path / "foreign.npz", embeddings=np.ones((2, 2)))
  with pytest.raises(ValueError, match="lacks"):
    saved_lib.load_embeddings(tmp_path / "foreign.npz")
  with pytest.raises(FileNotFoundError, match="save_embeddings"):
    saved_lib.load_embeddings(tmp_path / "missing.npz")
