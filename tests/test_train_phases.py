"""Several phases in one update step, against the same sequence written by hand with optax; per-epoch
learning-rate cycles and stop epochs against torch.optim; method selectors in group rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dml_jax import pytree as tree_lib
from dml_jax.methods import Method, Phase
from dml_jax.train import optim
from dml_jax.train import step as step_lib

DIM = 4


class TwoPlayers(Method):
  """A toy minimax: a discriminator w_d takes 3 steps on fresh random mixes, then the generator w_g takes one
  step against the updated discriminator. `prepare` computes the generator's features once per step."""

  name = "two_players"

  def init(self, rng):
    kg, kd = jax.random.split(rng)
    params = {"gen": {"w": jax.random.normal(kg, (DIM,))}, "disc": {"w": jax.random.normal(kd, (DIM,))}}
    return params, {"d_calls": jnp.zeros((), jnp.int32), "prepared_calls": jnp.zeros((), jnp.int32)}

  def prepare(self, params, method_state, batch, rng, info):
    features = jnp.tanh(batch["x"] * params["gen"]["w"])  # [B, DIM], no gradient
    return features, {**method_state, "prepared_calls": method_state["prepared_calls"] + 1}

  def disc_loss(self, params, method_state, batch, rng, info):
    m = jax.random.beta(rng, 2.0, 2.0)  # a fresh mixing weight per repeat
    mixed = m * info.prepared + (1 - m) * batch["x"]
    loss = jnp.mean(jax.nn.softplus(-mixed @ params["disc"]["w"])) + 0.1 * jnp.sum(params["disc"]["w"] ** 2)
    return loss, ({"m": m}, {**method_state, "d_calls": method_state["d_calls"] + 1})

  def gen_loss(self, params, method_state, batch, rng, info):
    features = jnp.tanh(batch["x"] * params["gen"]["w"])
    return jnp.mean(jax.nn.softplus(features @ params["disc"]["w"])), ({}, method_state)

  def objectives(self):
    return {"disc": self.disc_loss, "gen": self.gen_loss}

  def phases(self, epoch):
    return (Phase("disc", groups=("disc",), repeats=3), Phase("gen", groups=("base",)))

  def embed_fn(self, params, method_state, images):
    raise NotImplementedError


def _config():
  return ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.05, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
      clip_value=0.0, schedule=dict(name="constant"),
      groups=(("disc/.*", dict(name="disc", optimizer="adam", lr=0.01)),)))


def test_two_phase_step_equals_the_hand_written_optax_sequence():
  method = TwoPlayers()
  params, mstate = method.init(jax.random.key(3))
  plan = optim.ParamPlan(_config(), list(tree_lib.flatten(params)))
  groups = plan.groups(0)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params), donate=False)
  seed_key = jax.random.key(11)
  state = step_lib.init_train_state(params, mstate, optim.init_group_states(groups, params), seed_key)
  batches = [{"x": jnp.asarray(np.random.default_rng(s).normal(size=(6, DIM)), jnp.float32)} for s in range(3)]
  lrs, ep = step_lib.learning_rate_args(groups, 0)
  for batch in batches:
    state, metrics = cache.update_fn(groups, 0)(state, step_lib.shard_batch(batch, mesh), lrs, ep)

  # The same by hand: Adam for the discriminator (torch's bias correction, itself tested against torch in
  # test_train_optim.py), optax.sgd (momentum) for the generator; repeat r of phase i uses
  # fold_in(fold_in(fold_in(key, step), i), r).
  w_g, w_d = params["gen"]["w"], params["disc"]["w"]
  adam, sgd = optax.chain(optim.scale_by_torch_adam(), optax.scale(-0.01)), optax.sgd(0.05, momentum=0.9)
  s_d, s_g = adam.init(w_d), sgd.init(w_g)
  for step, batch in enumerate(batches):
    x = batch["x"]
    key = jax.random.fold_in(seed_key, step)
    features = jnp.tanh(x * w_g)
    for r in range(3):
      m = jax.random.beta(jax.random.fold_in(jax.random.fold_in(key, 0), r), 2.0, 2.0)
      mixed = m * features + (1 - m) * x
      g = jax.grad(lambda w: jnp.mean(jax.nn.softplus(-mixed @ w)) + 0.1 * jnp.sum(w ** 2))(w_d)
      u, s_d = adam.update(g, s_d, w_d)
      w_d = optax.apply_updates(w_d, u)
    g = jax.grad(lambda w: jnp.mean(jax.nn.softplus(jnp.tanh(x * w) @ w_d)))(w_g)
    u, s_g = sgd.update(g, s_g, w_g)
    w_g = optax.apply_updates(w_g, u)

  np.testing.assert_allclose(state["params"]["disc"]["w"], w_d, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state["params"]["gen"]["w"], w_g, rtol=1e-6, atol=1e-7)
  # Method state threads through the phases; prepare ran once per step, the discriminator 3 times.
  assert int(state["method_state"]["d_calls"]) == 9 and int(state["method_state"]["prepared_calls"]) == 3
  assert {"disc/loss", "gen/loss", "loss", "m"} <= set(metrics)


SHAPES = {"model/backbone/w": (3,), "model/head/w": (2,), "model/mask/w": (2,)}


class LinearProbe(Method):
  """loss = sum_p <p, G_p>: every parameter's gradient is the G fed in the batch."""

  def __init__(self, selectors=None):
    self.selectors = selectors or {}

  def init(self, rng):
    rng = np.random.default_rng(0)
    flat = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in SHAPES.items()}
    return tree_lib.nest(flat, {p: tuple(p.split("/")) for p in SHAPES}), {}

  def loss_fn(self, params, method_state, batch, rng, info):
    flat = tree_lib.flatten(params)
    return sum(jnp.sum(flat[p] * batch[p.replace("/", "__")][0]) for p in flat), ({}, method_state)

  def param_selectors(self, params):
    return self.selectors

  def embed_fn(self, params, method_state, images):
    raise NotImplementedError


def _run_linear_probe(cfg, grads, steps_per_epoch, selectors=None):
  method = LinearProbe(selectors)
  params, mstate = method.init(None)
  plan = optim.ParamPlan(cfg, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params), donate=False)
  groups, state, history = None, None, []
  for t, g in enumerate(grads):
    epoch = t // steps_per_epoch
    new_groups = plan.groups(epoch)
    if new_groups != groups:
      current = params if state is None else state["params"]
      opt = optim.init_group_states(new_groups, current, None if state is None else state["opt_state"], groups)
      state = step_lib.init_train_state(current, mstate, opt, jax.random.key(0),
                                        step=0 if state is None else int(state["step"]))
      groups = new_groups
    lrs, ep = step_lib.learning_rate_args(groups, epoch)
    batch = step_lib.shard_batch({p.replace("/", "__"): v[None] for p, v in g.items()}, mesh)
    state, _ = cache.update_fn(groups, epoch)(state, batch, lrs, ep)
    history.append({p: np.asarray(v) for p, v in tree_lib.flatten(state["params"]).items()})
  return history, state, params


def _torch_lr_cycle_history(flat0, grads):
  """torch.optim.Adam per group, the backbone's lr set to 0 on even epochs and the mask group dropped from
  epoch 2, as D&C's code does; returns every parameter after every step as {"step{t}/{path}": array}."""
  import torch
  tp = {p: torch.nn.Parameter(torch.tensor(v)) for p, v in flat0.items()}
  backbone = torch.optim.Adam([tp["model/backbone/w"]], lr=1e-2, weight_decay=1e-3)
  head = torch.optim.Adam([tp["model/head/w"]], lr=1e-2, weight_decay=1e-3)
  mask = torch.optim.Adam([tp["model/mask/w"]], lr=1e-1, weight_decay=1e-3)
  history = {}
  for t, g in enumerate(grads):
    epoch = t // 2
    backbone.param_groups[0]["lr"] = 0.0 if epoch % 2 == 0 else 1e-2
    active = [backbone, head] + ([mask] if epoch < 2 else [])
    for opt in active:
      opt.zero_grad()
    for p, v in tp.items():
      if p != "model/mask/w" or epoch < 2:
        v.grad = torch.tensor(g[p])
    for opt in active:
      opt.step()
    history.update({f"step{t}/{p}": v.detach().numpy().copy() for p, v in tp.items()})
  return history


def test_lr_cycle_keeps_adam_moments_running_like_torch_lr_zero(ref):
  # D&C freezes the backbone on even epochs by setting its torch Adam lr to 0: the parameters stay put but
  # the moments and the step count still advance, so the odd epochs' steps differ from a masked freeze.
  rng = np.random.default_rng(5)
  grads = [{p: rng.normal(size=s).astype(np.float32) for p, s in SHAPES.items()} for _ in range(8)]
  cfg = ml_collections.ConfigDict(dict(
      optimizer="adam", lr=1e-2, weight_decay=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, nesterov=False,
      clip_value=0.0, schedule=dict(name="constant"),
      groups=(("model/backbone/.*", dict(name="backbone", lr_cycle=(0.0, 1.0))),
              ("model/mask/.*", dict(name="mask", lr=1e-1, stop_epoch=2)))))
  ours, state, params0 = _run_linear_probe(cfg, grads, steps_per_epoch=2)

  flat0 = {p: np.asarray(v) for p, v in tree_lib.flatten(params0).items()}
  expected = ref("train_phases/lr_cycle_torch_adam", lambda: _torch_lr_cycle_history(flat0, grads))
  for t in range(len(grads)):
    for p in flat0:
      np.testing.assert_allclose(ours[t][p], expected[f"step{t}/{p}"], rtol=2e-5, atol=2e-6, err_msg=f"step {t} {p}")
  # Epoch 0 (lr 0): the backbone is bit-identical although its moments moved.
  assert ours[1]["model/backbone/w"].tobytes() == flat0["model/backbone/w"].tobytes()
  # The mask group stopped at epoch 2: no optimizer state left, values unchanged since.
  assert "mask" not in state["opt_state"]
  np.testing.assert_array_equal(ours[-1]["model/mask/w"], ours[3]["model/mask/w"])


def test_method_selectors_in_group_rules():
  cfg = ml_collections.ConfigDict(dict(optimizer="adamw", lr=1e-2, groups=(("@masks", dict(name="m", lr=0.5)),)))
  plan = optim.ParamPlan(cfg, list(SHAPES), selectors={"masks": {"model/mask/w"}})
  assert plan.group_of == {"model/backbone/w": "base", "model/head/w": "base", "model/mask/w": "m"}
  with pytest.raises(ValueError, match="@masks"):
    optim.ParamPlan(ml_collections.ConfigDict(dict(optimizer="adamw", lr=1e-2, groups=(("@mask", {}),))),
                    list(SHAPES), selectors={"masks": {"model/mask/w"}})
