"""Host row tables (VPTSP's prompt memory bank): lazy row-sparse updates through the engine's update step.

References, written here from the official code's prompt memory bank and not calling dml_jax's optimizer code:
  * torch: the official mechanism itself, a CPU table and CPU moment bank, a small buffer Parameter that
    receives the batch's rows and moments before `AdamW.step()` / `SGD.step()` and gives them back after
    (its results come from tests/references, `ref` fixture);
  * optax.adamw on the whole table when every row is in every batch (then lazy == dense).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dml_jax import pytree as tree_lib
from dml_jax.methods import HostBatch, Method
from dml_jax.methods.row_sparse import HostRowTable, RowSparseTables
from dml_jax.train import optim
from dml_jax.train import step as step_lib

NUM_ROWS, ROW_SHAPE, BATCH_ROWS = 6, (2, 3), 3
BUFFER = "model/bank_rows"
DENSE = "model/dense"
# Row 5 first appears at the third step: its bias correction must use the global step (3), not 1.
ROW_SCHEDULE = [[0, 1, 2], [3, 0, 4], [5, 2, 1], [4, 3, 0], [1, 5, 3]]
LRS = [1e-2, 1e-2, 5e-3, 5e-3, 2e-3]


def _table_init(rng: np.random.Generator) -> np.ndarray:
  return rng.normal(size=(NUM_ROWS,) + ROW_SHAPE).astype(np.float32)


class LinearProbe(Method):
  """loss = sum_p <p, G_p>: each parameter's gradient is the G_p fed in the batch."""

  def __init__(self, buffer_rows):
    self.buffer_rows = buffer_rows

  def init(self, rng):
    del rng
    params = {"model": {"dense": jnp.asarray(np.random.default_rng(3).normal(size=(4,)), jnp.float32),
                        "bank_rows": jnp.zeros((self.buffer_rows,) + ROW_SHAPE, jnp.float32)}}
    return params, {}

  def loss_fn(self, params, method_state, batch, rng, info):
    model = params["model"]
    loss = jnp.sum(model["dense"] * batch["g_dense"]) + jnp.sum(model["bank_rows"] * batch["g_rows"])
    return loss, ({}, method_state)

  def embed_fn(self, params, method_state, images):
    raise NotImplementedError


def _grads(num_steps, buffer_rows, seed=5):
  rng = np.random.default_rng(seed)
  return [dict(g_dense=rng.normal(size=(4,)).astype(np.float32),
               g_rows=rng.normal(size=(buffer_rows,) + ROW_SHAPE).astype(np.float32)) for _ in range(num_steps)]


def _engine_run(optimizer, weight_decay, row_schedule, lrs, grads, buffer_rows):
  method = LinearProbe(buffer_rows)
  params, method_state = method.init(None)
  keys = tree_lib.key_index(params)
  cfg = ml_collections.ConfigDict(dict(optimizer=optimizer, lr=lrs[0], weight_decay=weight_decay, momentum=0.9,
                                       schedule=dict(name="constant")))
  groups = optim.ParamPlan(cfg, list(keys)).groups(0)
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(groups, params),
                                    jax.random.key(0))
  update = jax.jit(step_lib.build_update_fn(method, groups, method.phases(0), keys))
  table = HostRowTable(BUFFER, NUM_ROWS, ROW_SHAPE, _table_init)
  # The batch's "labels" are the table rows themselves here.
  bank = RowSparseTables({"rows": table}, params, lambda batch: np.asarray(batch.label), seed=0)
  # The table's start from seeded numpy here, not from the bank's own seeding: it is the torch reference's input.
  bank.values["rows"][...] = _table_init(np.random.default_rng(100))
  initial = bank.values["rows"].copy()
  for rows, lr, g in zip(row_schedule, lrs, grads):
    batch = HostBatch(label=np.asarray(rows), index=np.arange(len(rows)))
    state = bank.before_step(state, batch)
    state, _ = update(state, {k: jnp.asarray(v) for k, v in g.items()}, {"base": np.float32(lr)}, np.int32(0))
    bank.after_step(state, batch)
  return initial, bank, np.asarray(state["params"]["model"]["dense"])


def _torch_memory_bank(optimizer, weight_decay, initial, dense0, row_schedule, lrs, grads, buffer_rows):
  """The official bank: table and moments on the CPU, a buffer Parameter swapped in and out per step."""
  import torch

  table = torch.tensor(initial)
  dense = torch.nn.Parameter(torch.tensor(dense0))
  buffer = torch.nn.Parameter(torch.zeros((buffer_rows,) + ROW_SHAPE))
  if optimizer == "adamw":
    opt = torch.optim.AdamW([dense, buffer], lr=lrs[0], weight_decay=weight_decay)
    keys = ["exp_avg", "exp_avg_sq"]
  else:
    opt = torch.optim.SGD([dense, buffer], lr=lrs[0], momentum=0.9, weight_decay=weight_decay)
    keys = ["momentum_buffer"]
  bank = {k: torch.zeros_like(table) for k in keys}
  bank_step = None
  for rows, lr, g in zip(row_schedule, lrs, grads):
    rows = torch.as_tensor(rows)
    for group in opt.param_groups:
      group["lr"] = lr
    with torch.no_grad():
      buffer.copy_(table[rows])
      state = opt.state[buffer]
      if state:  # the official code loads moments (and Adam's step) once the state exists
        for k in keys:
          state[k].copy_(bank[k][rows])
        if "step" in state:
          state["step"].copy_(bank_step)
    dense.grad = torch.tensor(g["g_dense"])
    buffer.grad = torch.tensor(g["g_rows"])
    opt.step()
    with torch.no_grad():
      state = opt.state[buffer]
      for k in keys:
        bank[k][rows] = state[k]
      if "step" in state:
        bank_step = state["step"].clone()
      table[rows] = buffer.detach()
  return table.numpy(), {k: v.numpy() for k, v in bank.items()}, dense.detach().numpy()


@pytest.mark.parametrize("optimizer,weight_decay", [("adamw", 1e-2), ("sgd", 1e-3)])
def test_lazy_rows_match_the_official_memory_bank(ref, optimizer, weight_decay):
  grads = _grads(len(ROW_SCHEDULE), BATCH_ROWS)
  initial, bank, dense = _engine_run(optimizer, weight_decay, ROW_SCHEDULE, LRS, grads, BATCH_ROWS)
  dense0 = np.asarray(LinearProbe(BATCH_ROWS).init(None)[0]["model"]["dense"])

  def compute():
    table, moments, dense = _torch_memory_bank(optimizer, weight_decay, initial, dense0, ROW_SCHEDULE, LRS, grads,
                                               BATCH_ROWS)
    return {"table": table, "dense": dense, **{f"moment/{k}": v for k, v in moments.items()}}

  expected = ref(f"row_sparse/official_memory_bank_{optimizer}", compute)
  ref_table, ref_dense = expected["table"], expected["dense"]
  ref_moments = {k[len("moment/"):]: v for k, v in expected.items() if k.startswith("moment/")}
  np.testing.assert_allclose(bank.values["rows"], ref_table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dense, ref_dense, rtol=1e-5, atol=1e-6)
  ours = bank.moments["rows"]
  if optimizer == "adamw":
    assert sorted(ours) == ["base/0/mu", "base/0/nu"]
    np.testing.assert_allclose(ours["base/0/mu"], ref_moments["exp_avg"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours["base/0/nu"], ref_moments["exp_avg_sq"], rtol=1e-5, atol=1e-9)
  else:
    (key,) = ours
    np.testing.assert_allclose(ours[key], ref_moments["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_absent_rows_stay_bit_identical():
  schedule = [[0, 1, 2], [2, 1, 0], [1, 0, 2]]  # rows 3, 4, 5 never appear
  grads = _grads(len(schedule), BATCH_ROWS)
  initial, bank, _ = _engine_run("adamw", 1e-2, schedule, LRS[:3], grads, BATCH_ROWS)
  np.testing.assert_array_equal(bank.values["rows"][3:], initial[3:])
  assert not np.array_equal(bank.values["rows"][:3], initial[:3])
  for moment in bank.moments["rows"].values():
    np.testing.assert_array_equal(moment[3:], 0.0)


def test_all_rows_every_step_equals_dense_adamw():
  # Every row in every batch (in shuffled order): the lazy update must be the dense one.
  rng = np.random.default_rng(9)
  schedule = [rng.permutation(NUM_ROWS) for _ in range(4)]
  grads = _grads(len(schedule), NUM_ROWS)
  initial, bank, _ = _engine_run("adamw", 1e-2, schedule, [1e-2] * 4, grads, NUM_ROWS)
  dense_opt = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
  table = jnp.asarray(initial)
  opt_state = dense_opt.init(table)
  for rows, g in zip(schedule, grads):
    full_grad = np.zeros_like(initial)
    full_grad[rows] = g["g_rows"]
    updates, opt_state = dense_opt.update(jnp.asarray(full_grad), opt_state, table)
    table = optax.apply_updates(table, updates)
  np.testing.assert_allclose(bank.values["rows"], np.asarray(table), rtol=1e-5, atol=1e-6)


def test_repeated_rows_and_checkpoint_round_trip():
  params = {"model": {"bank_rows": np.zeros((3,) + ROW_SHAPE), "dense": np.zeros(4)}}
  rows_of = lambda batch: batch.label  # noqa: E731
  bank = RowSparseTables({"rows": HostRowTable(BUFFER, NUM_ROWS, ROW_SHAPE, _table_init)}, params, rows_of, seed=1)
  with pytest.raises(ValueError, match="twice"):
    bank._check_rows("rows", np.array([1, 1, 2]), 3)
  bank.moments["rows"]["base/0/mu"] = np.ones((NUM_ROWS,) + ROW_SHAPE, np.float32)
  saved = bank.state_dict()
  other = RowSparseTables({"rows": HostRowTable(BUFFER, NUM_ROWS, ROW_SHAPE, _table_init)}, params, rows_of, seed=2)
  assert not np.array_equal(other.values["rows"], bank.values["rows"])
  other.load_state_dict(saved)
  np.testing.assert_array_equal(other.values["rows"], bank.values["rows"])
  np.testing.assert_array_equal(other.moments["rows"]["base/0/mu"], 1.0)
