"""DADA against a torch re-creation of the authors' code (tests/dada_torch_reference.py, written from
`Noahsark/DADA` commit 726ee8b). The re-creation never calls dml_jax's method code; it receives the same
parameters, images and random draws (mixing weights, dropout masks), all seeded numpy, and returns numpy
arrays. Its results come from tests/references/dada (`ref` fixture, tests/reference.py): the default run needs
no torch; `pytest -m parity` recomputes them.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.methods import StepInfo, dada
from dml_jax.train import optim
from dml_jax.train import step as step_lib
from dml_jax.train.config import default_config

EMBED, CLASSES = 16, 6
# Class 2 drawn twice (four samples, one mixed row), labels out of order: the mixed rows follow label value.
LABELS = np.array([2, 2, 0, 0, 2, 2, 5, 5], np.int32)
DISC = dict(fd_fc1_dim=12, fc_fc1_dim=10, fc_fc2_dim=9)
SETTINGS = {  # CUB-like (intra-class mixup, BN on both discriminators' logits) and Cars-like
    "cub": dict(pos_class_mix=True, fd2_bn=True, fc2_bn=True, mix_alpha=3.0, mix_beta=0.5, d_dis_ratio=0.005),
    "cars": dict(pos_class_mix=False, fd2_bn=True, fc2_bn=False, mix_alpha=2.0, mix_beta=1.0, d_dis_ratio=0.01),
}
TINY_RESNET = dict(layers=(1, 1), channels=(4, 8), stem_width=4)  # small: the references hold its parameters


def dada_config(**method) -> ml_collections.ConfigDict:
  c = default_config()
  c.method = methods.method_config("dada")
  c.method.update(dict(DISC, loss=dict(pos_alpha=40.0, neg_alpha=100.0, pos_delta=0.1, neg_delta=-0.1)))
  c.method.update(method)
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_RESNET)
  c.model.embedding_dim = EMBED
  c.dataset.image_size = 32
  c.data.sampler = "m_per_class_replace"
  c.data.batch_size = len(LABELS)
  c.optim.optimizer = "adam"
  c.optim.groups = (("model/backbone/.*", dict(name="backbone", start_epoch=2)),
                    ("loss/proxies", dict(name="proxies", lr=0.04, weight_decay=0.0)),
                    ("discriminators/.*", dict(name="discriminators", lr=5e-4, weight_decay=4e-4)))
  return c


def numpy_draws(seed: int, num_rows: int, opts: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The authors' draws of one criterion call: numpy's global Beta stream in the code's order (class mixup of
  samples, of proxies, U's mix, D_c's mix; np.random.seed(s) + np.random.beta is this stream), as float32
  weight pairs (f32(m), f32(1 - m) with 1 - m in float64); Bernoulli(1/2) dropout keep masks from seeded numpy
  (the code's come from torch's generator; any fixed masks do, since both sides get the same)."""
  rs = np.random.RandomState(seed)
  m1, m2 = rs.beta(2.0, 2.0), rs.beta(2.0, 2.0)
  mu, md = rs.beta(opts["mix_alpha"], opts["mix_beta"]), rs.beta(opts["mix_alpha"], opts["mix_beta"])
  pairs = [np.array([m1, 1.0 - m1], np.float32), np.array([m2, 1.0 - m2], np.float32),
           np.array([1.0 - mu, mu], np.float32), np.array([1.0 - md, md], np.float32)]
  rng = np.random.default_rng(seed)
  masks = [rng.random((num_rows, w)) < 1.0 - opts["dropout"] for w in (opts["fc_fc1_dim"], opts["fc_fc2_dim"]) * 2]
  return pairs, masks


def to_draws(pairs, masks) -> dada.Draws:
  return dada.Draws(*[jnp.asarray(p) for p in pairs], ((jnp.asarray(masks[0]), jnp.asarray(masks[1])),
                                                       (jnp.asarray(masks[2]), jnp.asarray(masks[3]))))


# -- seeded inputs (never dml_jax's initialisers) -------------------------------------------------------------


def seeded_params(params: dict, seed: int) -> dict:
  """Seeded numpy values for every parameter, in the shapes of `params`: convolutions He-normal, Linear
  kernels and biases U(+-1/sqrt(fan_in)), BatchNorm scales in [0.8, 1.2) and biases in [-0.2, 0.2), proxies
  N(0, 1) / 8. Flat {path: float32 array}."""
  rng = np.random.default_rng(seed)
  flat = tree_lib.flatten(params)
  out = {}
  for path in sorted(flat):
    shape = tuple(flat[path].shape)
    module, _, leaf = path.rpartition("/")
    if path == "loss/proxies":
      value = rng.standard_normal(shape) / 8
    elif leaf == "kernel" and len(shape) == 4:
      value = np.sqrt(2.0 / np.prod(shape[:3])) * rng.standard_normal(shape)
    elif leaf == "kernel":
      value = rng.uniform(-1, 1, shape) / np.sqrt(shape[0])
    elif leaf == "scale":
      value = 0.8 + 0.4 * rng.random(shape)
    elif leaf == "bias" and module.rpartition("/")[2].startswith("bn") or "downsample/1" in module:
      value = 0.4 * rng.random(shape) - 0.2
    else:  # a Linear layer's bias
      value = rng.uniform(-1, 1, shape) / np.sqrt(flat[f"{module}/kernel"].shape[0])
    out[path] = value.astype(np.float32)
  return out


def seeded_stats(state: dict, seed: int) -> dict:
  """Seeded BatchNorm running statistics in the shapes of `state`: means in [-0.2, 0.2), variances [0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  flat = tree_lib.flatten(state)
  return {path: (0.4 * rng.random(v.shape) - 0.2 if path.endswith("/mean") else 0.5 + rng.random(v.shape)).astype(
      np.float32) for path, v in sorted(flat.items())}


def nest_like(flat: dict, tree) -> dict:
  return tree_lib.nest({k: jnp.asarray(v) for k, v in flat.items()}, tree_lib.key_index(tree))


def sub_dict(flat: dict, prefix: str) -> dict:
  """The nested dict under `prefix` of a flat numpy dict (discriminators' parameters for the torch side)."""
  out = {}
  for path, value in flat.items():
    if path.startswith(prefix + "/"):
      node = out
      *parents, leaf = path[len(prefix) + 1:].split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = value
  return out


def _features(seed: int = 0) -> np.ndarray:
  """Raw features like LayerNorm outputs (norm ~ sqrt(E)) for the criterion tests."""
  return np.random.RandomState(seed).randn(len(LABELS), EMBED).astype(np.float32)


@contextlib.contextmanager
def replaced(obj, **attrs):
  """Sets instance attributes for the duration of a block (the method's injectable `draws`, its `forward`)."""
  saved = {k: obj.__dict__[k] for k in attrs if k in obj.__dict__}
  obj.__dict__.update(attrs)
  try:
    yield obj
  finally:
    for k in attrs:
      obj.__dict__.pop(k)
    obj.__dict__.update(saved)


def bn_shadowed(path: str, flat: dict) -> bool:
  """The bias of a Linear layer whose output goes into a BatchNorm: the batch mean removes it, so its gradient
  is zero and both implementations return rounding noise (~1e-8) instead."""
  module, _, leaf = path.rpartition("/")
  head, _, layer = module.rpartition("/")
  return leaf == "bias" and layer.startswith("fc") and f"{head}/bn{layer[2:]}/scale" in flat


def _flat_np(tree) -> dict:
  return {k: np.asarray(v) for k, v in tree_lib.flatten(tree).items()}


def _close(got, expected, *, scale=None, rtol=1e-5, err=""):
  expected = np.asarray(expected)
  scale = np.abs(expected).max() if scale is None else scale
  np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=rtol * max(scale, 1e-12), err_msg=err)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def criterion_setup(request):
  """(setting name, method, params and state holding seeded numpy values)."""
  config = dada_config(**SETTINGS[request.param])
  method = methods.build(config, num_classes=CLASSES)
  params, state = method.init(jax.random.key(1))
  params = nest_like(seeded_params(params, seed=3), params)
  state = {**state, "discriminators": nest_like(seeded_stats(state["discriminators"], seed=4),
                                                state["discriminators"])}
  return request.param, method, params, state


# -- tests: pieces ---------------------------------------------------------------------------------------------

PAIR_LABELS = [np.random.RandomState(seed).randint(0, 7, size=12).astype(np.int32) for seed in range(6)]


def test_positive_pairs_are_the_codes(ref):
  # Random labels with singletons, repeats and gaps; the code's pairs (first index, next index) per label in
  # ascending label order; padding slots invalid.
  def compute():
    import torch
    from dada_torch_reference import get_pos_pairs

    out = {}
    for i, labels in enumerate(PAIR_LABELS):
      a, p = get_pos_pairs(torch.from_numpy(labels).long())
      out[f"{i}/anchors"], out[f"{i}/partners"] = a.numpy(), p.numpy()
    return out

  expected = ref("dada/positive_pairs", compute)
  pairs = jax.jit(dada.positive_pairs, static_argnums=1)
  for i, labels in enumerate(PAIR_LABELS):
    anchors, partners, valid = pairs(jnp.asarray(labels), 6)
    a, p = expected[f"{i}/anchors"], expected[f"{i}/partners"]
    n = len(a)
    assert int(np.sum(valid)) == n and np.all(np.asarray(valid)[:n])
    np.testing.assert_array_equal(np.asarray(anchors)[:n], a)
    np.testing.assert_array_equal(np.asarray(partners)[:n], p)


def test_intra_class_mixup_with_the_authors_two_draws(ref):
  opts = SETTINGS["cub"] | DISC | {"dropout": 0.5}
  pairs, masks = numpy_draws(7, len(LABELS) + len(LABELS) // 2, opts)
  x = _features(1)
  proxies = (np.random.RandomState(2).randn(CLASSES, EMBED) / 8).astype(np.float32)

  def compute():
    import torch
    from dada_torch_reference import TorchCriterion

    method = methods.build(dada_config(**SETTINGS["cub"]), num_classes=CLASSES)
    shapes, stats = method.init(jax.random.key(0))  # shapes only: the values are seeded numpy
    disc = sub_dict(seeded_params(shapes, seed=5), "discriminators")
    crit = TorchCriterion(proxies, disc, sub_dict(seeded_stats(stats, seed=6), "discriminators"), opts)
    crit.set_draws(pairs, masks)
    c_batch, c_proxies, c_labels = crit._prepare_pos_mix(torch.from_numpy(x), torch.from_numpy(LABELS).long())
    return {"x": c_batch.detach().numpy(), "proxies": c_proxies.detach().numpy(), "labels": c_labels.numpy()}

  expected = ref("dada/intra_class_mixup", compute)
  aug = dada.augment(jnp.asarray(x), jnp.asarray(LABELS), jnp.asarray(proxies), to_draws(pairs, masks),
                     pos_class_mix=True)
  n = len(expected["labels"])
  assert n == len(LABELS) + 3 and float(aug.count) == n  # labels 0, 2, 5: class 2 drawn twice gives one row
  assert not np.any(np.asarray(aug.valid)[n:])
  np.testing.assert_array_equal(np.asarray(aug.labels)[:n], expected["labels"])
  np.testing.assert_array_equal(np.asarray(aug.labels)[len(LABELS):n], [0, 2, 5])  # by label value
  _close(np.asarray(aug.x)[:n], expected["x"], rtol=1e-6)
  _close(np.asarray(aug.proxies)[:n], expected["proxies"], rtol=1e-6)
  # The second draw mixes a proxy with itself: the value barely moves, the draw is consumed all the same.
  _close(np.asarray(aug.proxies)[len(LABELS):n], proxies[[0, 2, 5]], rtol=1e-6)


def test_sample_draws_have_the_shapes_and_laws_of_the_code():
  opts = dict(methods.method_config("dada"), mix_alpha=2.0, mix_beta=5.0, fc_fc1_dim=7, fc_fc2_dim=5, dropout=0.5)
  draws = jax.vmap(lambda k: dada.sample_draws(k, 11, opts))(jax.random.split(jax.random.key(0), 4000))
  class_m = np.asarray(draws.class_samples)[:, 0]
  mix_m = np.asarray(draws.domain_mix)[:, 1]
  np.testing.assert_allclose(np.asarray(draws.class_samples).sum(1), 1.0, atol=1e-6)
  assert abs(class_m.mean() - 0.5) < 0.02 and abs(class_m.var() - 0.05) < 0.005  # Beta(2, 2)
  assert abs(mix_m.mean() - 2 / 7) < 0.02  # Beta(2, 5)
  assert np.corrcoef(np.asarray(draws.domain_mix)[:, 1], np.asarray(draws.category_mix)[:, 1])[0, 1] < 0.05
  keep = np.asarray(draws.category_keep[0][0])
  assert keep.shape == (4000, 11, 7) and abs(keep.mean() - 0.5) < 0.01
  assert not np.array_equal(np.asarray(draws.category_keep[0][1]), np.asarray(draws.category_keep[1][1]))


# -- tests: the criterion, one call -------------------------------------------------------------------------------


def _criterion_reference(ref, name, method, params, state, x, pairs, masks, mode):
  def compute():
    from dada_torch_reference import torch_criterion_call

    flat = _flat_np(params)
    return torch_criterion_call(sub_dict(flat, "discriminators"), sub_dict(_flat_np(state), "discriminators"), x,
                                LABELS, flat["loss/proxies"], pairs, masks, method.opts, mode)

  return ref(f"dada/criterion_{name}_{mode}", compute)


def test_discriminator_objective_matches_torch(criterion_setup, ref):
  name, method, params, state = criterion_setup
  n_rows = len(LABELS) + (len(LABELS) // 2 if method.opts["pos_class_mix"] else 0)
  pairs, masks = numpy_draws(11, n_rows, method.opts)
  x = _features(4)
  batch = {"image": jnp.zeros((len(LABELS), 32, 32, 3)), "label": jnp.asarray(LABELS)}

  def loss_fn(disc):
    p = {**params, "discriminators": disc}
    info = StepInfo(jnp.int32(0), jnp.int32(0), prepared={"features": jnp.asarray(x)})
    return method.discriminator_loss(p, state, batch, jax.random.key(0), info)

  with replaced(method, draws=lambda rng, rows: to_draws(pairs, masks)):
    (loss, (metrics, new_state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params["discriminators"])
  expected = _criterion_reference(ref, name, method, params, state, x, pairs, masks, "discriminator")
  _close(loss, expected["loss"], err=name)
  _close(metrics["d_domain"], expected["domain"])
  _close(metrics["d_category"], expected["category"])
  _close(metrics["d_discrepancy"], expected["discrepancy"])
  grads = _flat_np(grads)
  scale = max(np.abs(v).max() for k, v in expected.items() if k.startswith("grad/"))
  for path, g in grads.items():
    if bn_shadowed(path, grads):  # zero up to rounding on both sides
      assert np.abs(g).max() < 1e-5 * scale and np.abs(expected[f"grad/{path}"]).max() < 1e-5 * scale, path
    else:
      _close(g, expected[f"grad/{path}"], err=f"{name} {path}")
  # BN per call, running statistics in call order: U three times, D_c twice.
  for path, v in _flat_np(new_state["discriminators"]).items():
    _close(v, expected[f"stats/{path}"], err=f"{name} {path}")
  assert set(grads) == {k[5:] for k in expected if k.startswith("grad/")}


def test_generator_objective_matches_torch(criterion_setup, ref):
  name, method, params, state = criterion_setup
  n_rows = len(LABELS) + (len(LABELS) // 2 if method.opts["pos_class_mix"] else 0)
  pairs, masks = numpy_draws(12, n_rows, method.opts)
  x = _features(5)

  def loss_fn(x, proxies):
    p = {**params, "loss": {"proxies": proxies}}
    batch = {"image": x, "label": jnp.asarray(LABELS)}
    return method.generator_loss(p, state, batch, jax.random.key(0), StepInfo(jnp.int32(0), jnp.int32(1)))

  # The features go straight in as the "images" (the network is the identity here), so x is differentiable.
  identity = lambda p, s, images, train: (images, s)  # noqa: E731
  with replaced(method, draws=lambda rng, rows: to_draws(pairs, masks), forward=identity):
    (loss, (metrics, new_state)), (gx, gp) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x), params["loss"]["proxies"])
  expected = _criterion_reference(ref, name, method, params, state, x, pairs, masks, "generator")
  _close(loss, expected["loss"], err=name)
  _close(metrics["proxy_loss"], expected["proxy_loss"])
  _close(metrics["g_domain"], expected["domain"])
  _close(metrics["g_category"], expected["category"])
  _close(metrics["g_discrepancy"], expected["discrepancy"])
  _close(gx, expected["x_grad"], err=f"{name} x")
  _close(gp, expected["proxies_grad"], err=f"{name} proxies")
  for path, v in _flat_np(new_state["discriminators"]).items():
    _close(v, expected[f"stats/{path}"], err=f"{name} {path}")


# -- tests: whole iterations through the update step ----------------------------------------------------------

# bn_trainable: the SOP / In-Shop arch with the Cars / In-Shop warm-up shape (epoch 0 discriminators only, epoch 1
# head-only generator steps, the backbone's Adam from epoch 2); bn_frozen: CUB's (frozen statistics, warm-up 1).
VARIANTS = {"bn_trainable": dict(bn_freeze=False, warmup=2, epochs=4), "bn_frozen": dict(bn_freeze=True, warmup=1,
                                                                                          epochs=3)}
HP = dict(lr=1e-3, decay=1e-4, proxy_lr=0.04, dis_lr=5e-4, dis_decay=4e-4, step_size=1, gamma=0.5,
          layers=TINY_RESNET["layers"])
EPOCH_LABELS = [LABELS, np.array([1, 1, 4, 4, 0, 0, 1, 1]), np.array([3, 3, 5, 5, 2, 2, 0, 0]),
                np.array([5, 5, 5, 5, 1, 1, 3, 3])]


def iteration_config(bn_freeze: bool, warmup: int) -> ml_collections.ConfigDict:
  """The CUB-like criterion; StepLR(1, 0.5) on all three optimizers once the warm-up is over."""
  c = dada_config(**SETTINGS["cub"], bn_freeze=bn_freeze, d_warmup=1, d_step=3)
  c.optim.lr, c.optim.weight_decay = HP["lr"], HP["decay"]
  c.optim.schedule.update(dict(name="step", step_size=HP["step_size"], gamma=HP["gamma"], offset=warmup))
  c.optim.groups = (("model/backbone/.*", dict(name="backbone", start_epoch=warmup)),
                    ("loss/proxies", dict(name="proxies", lr=HP["proxy_lr"], weight_decay=0.0)),
                    ("discriminators/.*", dict(name="discriminators", lr=HP["dis_lr"], weight_decay=HP["dis_decay"])))
  return c


def phase_keys(seed_key, step: int, d_step: int) -> list:
  """The keys the update step gives its sub-steps (dml_jax/methods/base.py): repeat r of phase i of step t uses
  fold_in(fold_in(fold_in(key, t), i), r); the discriminator phase is 0, the generator phase 1."""
  key = jax.random.fold_in(seed_key, step)
  return ([jax.random.fold_in(jax.random.fold_in(key, 0), r) for r in range(d_step)]
          + [jax.random.fold_in(jax.random.fold_in(key, 1), 0)])


def injected_draws(keys: list, draws: list):
  """A `draws` function that returns draws[i] when called with keys[i] (the sub-step's key, looked up inside
  the jitted step), so that the update step replays given draws."""
  table = jnp.stack([jax.random.key_data(k) for k in keys])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *draws)

  def fn(rng, rows):
    index = jnp.argmax(jnp.all(table == jax.random.key_data(rng), axis=-1))
    return jax.tree.map(lambda x: x[index], stacked)

  return fn


def run_update_steps(method, params, method_state, config, epochs, seed_key):
  """One update per epoch through dml_jax.train.step, as the trainer drives it (optimizer groups renewed where
  the plan changes). Returns per epoch: (flat params, flat method state, metrics)."""
  plan = optim.ParamPlan(config.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params), donate=False)
  groups, state, out = None, None, []
  for epoch, (images, labels) in enumerate(epochs):
    new_groups = plan.groups(epoch)
    if new_groups != groups:
      current = params if state is None else state["params"]
      opt = optim.init_group_states(new_groups, current, None if state is None else state["opt_state"], groups)
      state = step_lib.init_train_state(current, method_state if state is None else state["method_state"], opt,
                                        seed_key, step=epoch)
      groups = new_groups
    lrs, ep = step_lib.learning_rate_args(groups, epoch)
    batch = step_lib.shard_batch({"image": images, "label": labels, "index": np.arange(len(labels), dtype=np.int32)},
                                 mesh)
    state, metrics = cache.update_fn(groups, epoch)(state, batch, lrs, ep)
    out.append((_flat_np(state["params"]), _flat_np(state["method_state"]), jax.device_get(metrics)))
  return out


def adam_close(got, expected, lr, *, steps, noise=False, err=""):
  """Parameters after Adam steps: at least 99% of the entries within 1e-5 relative / 1e-6 absolute, every entry
  within a tenth of a step. Adam divides each entry's update by that entry's own gradient scale, so an entry
  whose gradient is at the rounding level of the sum it comes from (a cancellation) takes a step that
  rounding decides, in either implementation. noise: the bias of a layer followed by BatchNorm, whose true
  gradient is zero (rounding noise and the weight decay drive it; where the decay term is below the noise, each
  of the `steps` Adam steps may go either way by up to lr): that bound alone."""
  got, expected = np.asarray(got), np.asarray(expected)
  diff = np.abs(got - expected)
  if noise:
    assert diff.max() <= 2 * lr * steps + 1e-6, f"{err}: max difference {diff.max()} (lr {lr}, {steps} steps)"
    return
  tight = diff <= 1e-6 + 1e-5 * np.abs(expected)
  assert tight.mean() >= 0.99 or (~tight).sum() <= 1, f"{err}: {(~tight).sum()} of {tight.size} entries differ"
  assert diff.max() <= 0.1 * lr + 1e-6, f"{err}: max difference {diff.max()} (lr {lr})"


GROUP_LR = {"model": HP["lr"], "loss": HP["proxy_lr"], "discriminators": HP["dis_lr"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_iterations_match_torch_sub_step_by_sub_step(variant, ref):
  v = VARIANTS[variant]
  config = iteration_config(v["bn_freeze"], v["warmup"])
  method = methods.build(config, num_classes=CLASSES)
  shapes, state_shapes = method.init(jax.random.key(2))
  params_np, stats_np = seeded_params(shapes, seed=20), seeded_stats(state_shapes, seed=21)
  rng = np.random.default_rng(22)
  epochs = [(rng.standard_normal((len(LABELS), 32, 32, 3)).astype(np.float32), labels.astype(np.int32))
            for labels in EPOCH_LABELS[:v["epochs"]]]
  d_step, rows = method.opts["d_step"], len(LABELS) + len(LABELS) // 2
  draws = [[numpy_draws(100 * epoch + r, rows, method.opts) for r in range(d_step + 1)] for epoch in range(len(epochs))]

  seed_key = jax.random.key(5)
  keys = [k for epoch in range(len(epochs)) for k in phase_keys(seed_key, epoch, d_step)]
  with replaced(method, draws=injected_draws(keys, [to_draws(*d) for epoch_draws in draws for d in epoch_draws])):
    ours = run_update_steps(method, nest_like(params_np, shapes), nest_like(stats_np, state_shapes), config, epochs,
                            seed_key)

  def compute():
    from dada_torch_reference import torch_training

    history = torch_training(params_np, stats_np, [(images, labels, d) for (images, labels), d in zip(epochs, draws)],
                             method.opts, dict(HP, warmup=v["warmup"], bn_freeze=v["bn_freeze"]))
    out = {}
    for epoch, snapshot in enumerate(history):
      out.update({f"{epoch}/{k}": np.asarray(np.nan if value is None else value, np.float32) if k in (
          "d_loss", "g_loss") else value for k, value in snapshot.items()})
    return out

  expected_all = ref(f"dada/iterations_{variant}", compute)
  bias_gap = {}  # the largest difference so far of each BN-shadowed bias
  for epoch, (got_params, got_state, metrics) in enumerate(ours):
    where = f"epoch {epoch}"
    expected = {k.split("/", 1)[1]: value for k, value in expected_all.items() if k.split("/", 1)[0] == str(epoch)}
    _close(metrics["discriminator/loss" if epoch >= 1 else "loss"], expected["d_loss"], err=where)
    if epoch >= 1:
      _close(metrics["generator/loss"], expected["g_loss"], err=where)
    else:
      assert "generator/loss" not in metrics and np.isnan(expected["g_loss"])
    for path, value in got_params.items():
      adam_close(value, expected[path], GROUP_LR[path.split("/")[0]], steps=(d_step + 1) * (epoch + 1),
                 noise=bn_shadowed(path, got_params), err=f"{where} {path}")
      if bn_shadowed(path, got_params):
        bias_gap[path] = max(bias_gap.get(path, 0.0), float(np.abs(value - expected[path]).max()))
    for path, value in got_state.items():
      # A running mean right after such a bias carries it (the mean of W x + b): allow the biases' gap.
      module, _, leaf = path.rpartition("/")
      bias = f"{module.rpartition('/')[0]}/fc{module.rpartition('/')[2][2:]}/bias"
      gap = bias_gap.get(bias, 0.0) if leaf == "mean" else 0.0
      np.testing.assert_allclose(value, expected[f"stats/{path}"], rtol=1e-5, atol=1e-6 + 1.1 * gap,
                                 err_msg=f"{where} {path}")
    # What moved when: epoch 0 trains the discriminators alone, then the head and proxies too, the backbone from
    # the end of the warm-up (with frozen statistics its BN scale and bias still train).
    moved = {p for p in got_params if not np.array_equal(got_params[p], params_np[p])}
    assert any(p.startswith("discriminators/") for p in moved)
    assert ("loss/proxies" in moved) == (epoch >= 1) and ("model/embedding/kernel" in moved) == (epoch >= 1)
    assert any(p.startswith("model/backbone/") for p in moved) == (epoch >= v["warmup"])
    if v["bn_freeze"]:
      assert "model/backbone/bn1/scale" in moved or epoch < v["warmup"]
    stats_moved = any(not np.array_equal(got_state[p], stats_np[p]) for p in got_state if p.startswith("model/"))
    assert stats_moved == (not v["bn_freeze"])


def test_opt_in_fixes_change_only_what_they_say():
  x = jnp.asarray(_features(6))
  proxies = jnp.asarray(np.random.RandomState(7).randn(CLASSES, EMBED).astype(np.float32) / 8)
  rows = len(LABELS) + len(LABELS) // 2
  draws = to_draws(*numpy_draws(13, rows, SETTINGS["cub"] | DISC | {"dropout": 0.5}))
  # proxy_pair_mix=False: the mixed rows take their class's proxy itself.
  aug = dada.augment(x, jnp.asarray(LABELS), proxies, draws, pos_class_mix=True, proxy_pair_mix=False)
  np.testing.assert_array_equal(np.asarray(aug.proxies)[len(LABELS):len(LABELS) + 3], np.asarray(proxies)[[0, 2, 5]])
  config = dada_config(**SETTINGS["cub"])
  method = methods.build(config, num_classes=CLASSES)
  params, state = method.init(jax.random.key(3))
  aug = dada.augment(x, jnp.asarray(LABELS), proxies, draws, pos_class_mix=True)

  def terms(opts, draws, dropout):
    return dada.adversarial_terms(params["discriminators"], state["discriminators"], aug, draws, opts,
                                  dropout=dropout)[0]

  # Without dropout (generator_dropout=False in the generator step) the keep masks do not matter.
  other_masks = draws._replace(category_keep=jax.tree.map(lambda m: ~m, draws.category_keep))
  assert terms(method.opts, draws, False) == terms(method.opts, other_masks, False)
  assert terms(method.opts, draws, True).category != terms(method.opts, other_masks, True).category
  # mix_unit_vectors=True: only the mixtures change (U's mixture CE, D_c's discrepancy), not D_c on the samples.
  unit = terms(dict(method.opts, mix_unit_vectors=True), draws, True)
  raw = terms(method.opts, draws, True)
  assert unit.domain != raw.domain and unit.discrepancy != raw.discrepancy and unit.category == raw.category
  # The code's switch values are the defaults.
  defaults = methods.method_config("dada")
  assert (defaults.generator_dropout, defaults.proxy_pair_mix, defaults.mix_unit_vectors) == (True, True, False)


def test_phases_and_generator_groups():
  method = methods.build(dada_config(d_step=3, g_step=1, d_warmup=1), num_classes=CLASSES)
  assert method.phases(0) == (dada.Phase("discriminator", ("discriminators",), 3),)
  assert method.phases(1) == (dada.Phase("discriminator", ("discriminators",), 3),
                              dada.Phase("generator", ("backbone", "base", "proxies"), 1))
  bad = dada_config()
  bad.optim.groups = bad.optim.groups[:2]
  with pytest.raises(ValueError, match="discriminators"):
    methods.build(bad, num_classes=CLASSES)
  with pytest.raises(ValueError, match="dis_mode"):
    methods.build(dada_config(dis_mode="kl"), num_classes=CLASSES)


def test_initialisation_is_torchs_default():
  # nn.Linear: kernel and bias ~ U(+-1/sqrt(fan_in)); BatchNorm1d: scale 1, bias 0, mean 0, var 1; proxies
  # N(0, 1) / 8; the embedding layer U(+-1/sqrt(C_features)); LayerNorm without parameters.
  method = methods.build(dada_config(**SETTINGS["cub"], fd_fc1_dim=300, fc_fc1_dim=200, fc_fc2_dim=100),
                         num_classes=400)
  params, state = method.init(jax.random.key(9))
  flat = _flat_np(params)
  for path, value in flat.items():
    if path.startswith("discriminators/") and "/fc" in path or path.startswith("model/embedding/"):
      fan_in = flat[path.rpartition("/")[0] + "/kernel"].shape[0]
      bound = 1 / np.sqrt(fan_in)
      assert np.abs(value).max() <= bound, path
      if value.size > 1000:  # uniform: the bound reached, variance bound^2 / 3
        assert np.abs(value).max() > 0.99 * bound, path
        assert abs(value.var() / (bound ** 2 / 3) - 1) < 0.1, path
    elif path.startswith("discriminators/"):
      assert np.all(value == (1.0 if path.endswith("scale") else 0.0)), path
  assert flat["discriminators/category/fc3/kernel"].shape == (100, 400)
  assert flat["discriminators/domain/fc2/kernel"].shape == (300, 3) and "discriminators/domain/bn2/scale" in flat
  assert abs(flat["loss/proxies"].std() * 8 - 1) < 0.05 and abs(flat["loss/proxies"].mean()) < 0.01
  for path, value in _flat_np(state["discriminators"]).items():
    assert np.all(value == (0.0 if path.endswith("mean") else 1.0)), path
  assert not any("layer_norm" in p for p in flat)  # LayerNorm without affine parameters
