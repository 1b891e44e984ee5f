"""configs/demo.py trains on the embedded digits and its retrieval metrics rise; --eval_only re-evaluates."""

from __future__ import annotations

import json

import pytest
from test_train_fit import demo_config

from dml_jax.train import loop


@pytest.mark.integration
def test_demo_recall_rises_and_checkpoint_evaluates(tmp_path):
  c = demo_config()
  c.num_epochs = 8  # the first half of the demo's 16 epochs (same cosine schedule)
  c.eval.every_epochs = 8
  c.log.progress = False
  summary = loop.fit(c, tmp_path)
  before = next(h for h in summary["history"] if h["epoch"] == "before")
  after = summary["history"][-1]
  assert after["epoch"] == 7
  assert after["recall@1"] >= before["recall@1"] + 0.08, (before, after)
  assert after["map@r"] >= before["map@r"] + 0.05, (before, after)

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["kind"] for r in records} >= {"config", "train", "eval", "summary"}
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

  # --eval_only: the best checkpoint gives back the recall it was selected with.
  results = loop.evaluate_only(c, tmp_path)
  assert abs(results["test"]["recall@1"] - summary["best"]["value"]) < 1e-6
