"""The epoch loop end to end on the embedded digits: resume, frozen parameters, NaN guard, CLI errors."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dml_jax import pytree as tree_lib
from dml_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(**changes):
  """The demo on 3 steps of 16 images per epoch, without evaluation."""
  c = demo_config()
  c.num_epochs = 2
  c.data.batch_size = 16
  c.data.steps_per_epoch = 3
  c.data.num_threads = 2
  c.eval.every_epochs = 0
  c.eval.before_training = False
  c.log.every_steps = 1
  c.log.progress = False
  c.log.plots = False
  c.update_from_flattened_dict(changes)  # dotted keys, e.g. {"optim.lr": 0.1}
  return c


def train_losses(workdir):
  records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def restore_state(workdir, step):
  path = pathlib.Path(workdir).absolute() / "checkpoints" / "steps" / str(step) / "state"
  return ocp.StandardCheckpointer().restore(path)


def test_resume_after_an_epoch_gives_identical_losses_and_frozen_stays_bit_identical(tmp_path, monkeypatch):
  # Block 0 frozen for good; a warm-up epoch trains only the head and the proxies, so the resume also
  # crosses the change of the trainable set (fresh optimizer state for the backbone from epoch 1).
  frozen = "model/backbone/blocks/0/.*"
  changes = {"optim.groups": ((frozen, dict(name="frozen_block", frozen=True)),
                              ("model/backbone/.*", dict(name="backbone", start_epoch=1)),
                              ("loss/.*", dict(name="proxies", lr_mult=100.0)))}
  cfg = tiny_config(**changes)
  loop.fit(cfg, tmp_path / "full")

  loop.fit(tiny_config(**changes, num_epochs=1), tmp_path / "resumed")
  assert train_losses(tmp_path / "resumed")[-1][0] == 3
  loop.fit(cfg, tmp_path / "resumed")  # picks up the epoch-1 checkpoint

  full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
  assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
  assert full == resumed  # exactly: same batches, same RNG, same optimizer state

  # Frozen parameters: bit-identical to the initial ones, and no optimizer state anywhere for them.
  trainer = loop.Trainer(cfg, tmp_path / "init_only")
  initial = tree_lib.flatten(trainer.initial_params)
  trainer.close()
  state = restore_state(tmp_path / "full", 6)
  final = tree_lib.flatten(state["params"])
  frozen_paths = [p for p in initial if p.startswith("model/backbone/blocks/0/")]
  assert frozen_paths
  for p in frozen_paths:
    assert np.asarray(final[p]).tobytes() == np.asarray(initial[p]).tobytes(), p
  trained = [p for p in initial if p.startswith("model/backbone/blocks/1/")]
  assert any(not np.array_equal(final[p], initial[p]) for p in trained)
  opt_paths = [p for p in tree_lib.flatten(state["opt_state"])]
  assert opt_paths and not any("blocks/0/" in p for p in opt_paths)
  assert sorted(state["opt_state"]) == ["backbone_from_epoch1", "base", "proxies"]

  # NaN guard: a diverging step (simulated: NaN learning rates from epoch 2, which the config check would
  # refuse) poisons the parameters in the first step of epoch 2; the next loss is NaN, training stops naming
  # that step, and the last checkpoint on disk stays the good one (step 6).
  real_rates = loop.step_lib.learning_rate_args

  def diverging(groups, epoch):
    lrs, ep = real_rates(groups, epoch)
    return ({k: np.float32("nan") for k in lrs} if epoch >= 2 else lrs), ep

  monkeypatch.setattr(loop.step_lib, "learning_rate_args", diverging)
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 7 \(epoch 2\).*last good checkpoint is step 6"):
    loop.fit(tiny_config(**changes, num_epochs=3), tmp_path / "full")
  manifest = json.loads((tmp_path / "full" / "checkpoints" / "manifest.json").read_text())
  assert manifest["last"] == [6]


def test_unknown_config_key_names_close_match(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path),
                         "--config.optim.lrr=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: unknown config key 'optim.lrr'") and "did you mean 'optim.lr'?" in proc.stderr
  assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]  # one line, no traceback


def test_validation_split_is_carved_from_training_classes():
  from dml_jax.data import load_dataset
  splits = load_dataset("digits")
  train, val = loop.carve_validation(splits.train, 0.4, seed=0)
  assert train.num_classes == 3 and val.num_classes == 2
  assert len(train) + len(val) == len(splits.train)
  assert set(np.unique(val.roles)) == {"test"}
  assert set(train.class_names).isdisjoint(val.class_names)
