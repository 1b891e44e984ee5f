"""The contract every registered method keeps with the engine, checked on its tiny config
(tests/method_configs.py) through the trainer's own pieces: init, the epoch-start hooks and sampler, the jitted
step, embedding shapes, the frozen set, the state's structure, a checkpoint round trip, and the same step on 1
and on 8 devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from method_configs import TINY_CONFIGS

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.train import loop
from dml_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_registered_method_has_a_tiny_config():
  assert sorted(TINY_CONFIGS) == methods.list_methods()


def _first_step(trainer: loop.Trainer):
  """The trainer's fresh state after epoch 0's hooks, its first batch, and the state after one update."""
  state0 = trainer._start()[0]
  state0 = trainer._begin_epoch(0, state0, mid_epoch=False)
  initial = jax.device_get(state0)  # the update donates its input
  iterator = trainer.train_loader.epoch(0)
  batch = next(iterator)
  host_batch = trainer._host_batch(iterator)
  iterator.close()
  state = state0
  if trainer.host is not None:
    state = trainer.host.before_step(state, host_batch)
  update = trainer.steps.update_fn(trainer.groups, 0)
  lrs, epoch = step_lib.learning_rate_args(trainer.groups, 0)
  state, metrics = update(state, step_lib.shard_batch(batch, trainer.mesh), lrs, epoch)
  if trainer.host is not None:
    trainer.host.after_step(state, host_batch)
  return initial, batch, state, metrics


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_method_contract(name, tmp_path):
  config = TINY_CONFIGS[name]()
  trainer = loop.Trainer(config, tmp_path / "run")
  try:
    initial, batch, state, metrics = _first_step(trainer)
    assert set(batch) >= {"image", "label", "index"}
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["nonfinite"])

    # The state keeps its structure (shapes and dtypes) through a step.
    assert jax.tree.structure(initial) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(state)):
      assert (np.shape(a), np.asarray(a).dtype) == (np.shape(b), np.asarray(b).dtype)

    # Frozen parameters leave the step bit-identical and hold no optimizer state; trainable ones move.
    groups = trainer.groups
    before, after = tree_lib.flatten(initial["params"]), tree_lib.flatten(state["params"])
    for path in groups.frozen:
      assert np.asarray(after[path]).tobytes() == np.asarray(before[path]).tobytes(), path
    opt_paths = set(tree_lib.flatten(state["opt_state"]))
    assert not any(p.endswith("/" + f) for p in opt_paths for f in groups.frozen)
    host_buffers = set(trainer.host.parameter_counts()) if trainer.host is not None else set()
    moved = [p for p in groups.trainable if p not in host_buffers and not np.array_equal(after[p], before[p])]
    assert moved, "no trainable parameter changed in a step"

    # Evaluation embeddings: [B, E], float32, unit rows.
    images = step_lib.shard_batch({"image": batch["image"]}, trainer.mesh)["image"]
    emb = np.asarray(trainer.steps.embed(state["params"], state["method_state"], images))
    assert emb.shape == (config.data.batch_size, trainer.method.embedding_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    # Checkpoint round trip: the state (and the host state) come back exactly.
    trainer._save(state, loop._Progress(epoch=1), step=1, phase_epoch=0)
    host_saved = trainer.host.state_dict() if trainer.host is not None else None
    restored, _ = trainer._start()
    for (path, a), b in zip(tree_lib.flatten(state).items(), tree_lib.flatten(restored).values()):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    if host_saved is not None:
      now = tree_lib.flatten(trainer.host.state_dict()).values()
      for (path, a), b in zip(tree_lib.flatten(host_saved).items(), now):
        np.testing.assert_array_equal(a, b, err_msg=path)
  finally:
    trainer.close()


# One process per device count (run concurrently): each method's first step with SGD, whose update is linear
# in the gradient, so sharding differences show at rounding level (Adam would turn a zero-gradient entry's
# rounding noise into a full +-lr step).
_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from dml_jax import pytree as tree_lib
    from dml_jax.train import loop
    from method_configs import TINY_CONFIGS
    from test_methods_contract import _first_step

    out = sys.argv[1]
    for name, make in sorted(TINY_CONFIGS.items()):
      c = make()
      c.optim.optimizer = "sgd"
      trainer = loop.Trainer(c, f"{out}/{name}")
      _, _, state, metrics = _first_step(trainer)
      trainer.close()
      flat = tree_lib.flatten({"params": state["params"], "method_state": state["method_state"]})
      np.savez(f"{out}/{name}.npz", loss=np.asarray(metrics["loss"]),
               **{k.replace("/", "|"): np.asarray(v) for k, v in flat.items()})
    print("RESULT " + json.dumps({"devices": jax.device_count(), "torch_loaded": "torch" in sys.modules}))
""")


@pytest.mark.integration
def test_one_and_eight_devices_take_the_same_step(tmp_path):
  procs = {}
  for n in (1, 8):
    (tmp_path / str(n)).mkdir()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs[n] = subprocess.Popen([sys.executable, "-c", _DEVICES_SCRIPT, str(tmp_path / str(n))], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for n, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result == {"devices": n, "torch_loaded": False}  # training never imports torch
  for name in TINY_CONFIGS:
    one, eight = np.load(tmp_path / "1" / f"{name}.npz"), np.load(tmp_path / "8" / f"{name}.npz")
    assert sorted(one.files) == sorted(eight.files)
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5, err_msg=name)
    for key in one.files:
      np.testing.assert_allclose(eight[key], one[key], rtol=0, atol=1e-5, err_msg=f"{name} {key}")
