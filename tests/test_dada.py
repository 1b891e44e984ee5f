"""DADA against a torch re-creation of the authors' code (tests/dada_torch_reference.py, written from
`Noahsark/DADA` commit 726ee8b). The re-creation never calls dml_jax's method code; it receives the same
parameters, images and random draws (mixing weights, dropout masks) and returns numpy arrays.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dada_torch_reference import TorchCriterion, get_pos_pairs, torch_criterion_call, torch_training  # noqa: E402

from dml_jax import methods  # noqa: E402
from dml_jax import pytree as tree_lib  # noqa: E402
from dml_jax.methods import StepInfo, dada  # noqa: E402
from dml_jax.train import optim  # noqa: E402
from dml_jax.train import step as step_lib  # noqa: E402
from dml_jax.train.config import default_config  # noqa: E402

EMBED, CLASSES = 16, 6
# Class 2 drawn twice (four samples, one mixed row), labels out of order: the mixed rows follow label value.
LABELS = np.array([2, 2, 0, 0, 2, 2, 5, 5], np.int32)
DISC = dict(fd_fc1_dim=12, fc_fc1_dim=10, fc_fc2_dim=9)
SETTINGS = {  # CUB-like (intra-class mixup, BN on both discriminators' logits) and Cars-like
    "cub": dict(pos_class_mix=True, fd2_bn=True, fc2_bn=True, mix_alpha=3.0, mix_beta=0.5, d_dis_ratio=0.005),
    "cars": dict(pos_class_mix=False, fd2_bn=True, fc2_bn=False, mix_alpha=2.0, mix_beta=1.0, d_dis_ratio=0.01),
}
TINY_RESNET = dict(layers=(1, 1), channels=(8, 16), stem_width=8)


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
  samples, of proxies, U's mix, D_c's mix), as float32 weight pairs; torch-style Bernoulli dropout masks."""
  rs = np.random.RandomState(seed)
  m1, m2 = rs.beta(2.0, 2.0), rs.beta(2.0, 2.0)
  mu, md = rs.beta(opts["mix_alpha"], opts["mix_beta"]), rs.beta(opts["mix_alpha"], opts["mix_beta"])
  pairs = [np.array([m1, 1.0 - m1], np.float32), np.array([m2, 1.0 - m2], np.float32),
           np.array([1.0 - mu, mu], np.float32), np.array([1.0 - md, md], np.float32)]
  gen = torch.Generator().manual_seed(seed)
  masks = [torch.bernoulli(torch.full((num_rows, w), 0.5), generator=gen).bool().numpy()
           for w in (opts["fc_fc1_dim"], opts["fc_fc2_dim"]) * 2]
  return pairs, masks


def to_draws(pairs, masks) -> dada.Draws:
  return dada.Draws(*[jnp.asarray(p) for p in pairs], ((jnp.asarray(masks[0]), jnp.asarray(masks[1])),
                                                       (jnp.asarray(masks[2]), jnp.asarray(masks[3]))))


def draws_to_numpy(draws: dada.Draws) -> tuple[list[np.ndarray], list[np.ndarray]]:
  pairs = [np.asarray(v) for v in draws[:4]]
  masks = [np.asarray(m) for call in draws.category_keep for m in call]
  return pairs, masks


# -- helpers -----------------------------------------------------------------------------------------------------


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
  config = dada_config(**SETTINGS[request.param])
  method = methods.build(config, num_classes=CLASSES)
  params, state = method.init(jax.random.key(1))
  rng = np.random.RandomState(3)
  # Non-trivial BN affine parameters and running statistics, so that swapped tensors show.
  disc = jax.tree.map(lambda v: np.asarray(v) + rng.uniform(-0.2, 0.2, np.shape(v)).astype(np.float32),
                      params["discriminators"])
  disc_stats = jax.tree.map(lambda v: np.asarray(v) * 0.5 + 0.25, state["discriminators"])
  params = {**params, "discriminators": disc}
  state = {**state, "discriminators": disc_stats}
  return request.param, method, params, state


# -- tests: pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_positive_pairs_are_the_codes(seed):
  # Random labels with singletons, repeats and gaps; the code's pairs (first index, next index) per label in
  # ascending label order; padding slots invalid.
  labels = np.random.RandomState(seed).randint(0, 7, size=12).astype(np.int32)
  anchors, partners, valid = jax.jit(dada.positive_pairs, static_argnums=1)(jnp.asarray(labels), 6)
  a, p = get_pos_pairs(torch.from_numpy(labels).long())
  n = len(a)
  assert int(np.sum(valid)) == n and np.all(np.asarray(valid)[:n])
  np.testing.assert_array_equal(np.asarray(anchors)[:n], a.numpy())
  np.testing.assert_array_equal(np.asarray(partners)[:n], p.numpy())


def test_intra_class_mixup_with_the_authors_two_draws():
  pairs, masks = numpy_draws(7, len(LABELS) + len(LABELS) // 2, SETTINGS["cub"] | DISC | {"dropout": 0.5})
  x = _features(1)
  proxies = np.random.RandomState(2).randn(CLASSES, EMBED).astype(np.float32) / 8
  aug = dada.augment(jnp.asarray(x), jnp.asarray(LABELS), jnp.asarray(proxies), to_draws(pairs, masks),
                     pos_class_mix=True)
  crit = TorchCriterion(proxies, *_dummy_disc(), dict(pos_class_mix=True, dropout=0.5))
  crit.set_draws(pairs, masks)
  c_batch, c_proxies, c_labels = crit._prepare_pos_mix(torch.from_numpy(x), torch.from_numpy(LABELS).long())
  n = len(c_labels)
  assert n == len(LABELS) + 3 and float(aug.count) == n  # labels 0, 2, 5: class 2 drawn twice gives one row
  assert not np.any(np.asarray(aug.valid)[n:])
  np.testing.assert_array_equal(np.asarray(aug.labels)[:n], c_labels.numpy())
  np.testing.assert_array_equal(np.asarray(aug.labels)[len(LABELS):n], [0, 2, 5])  # by label value
  _close(np.asarray(aug.x)[:n], c_batch.detach().numpy(), rtol=1e-6)
  _close(np.asarray(aug.proxies)[:n], c_proxies.detach().numpy(), rtol=1e-6)
  # The second draw mixes a proxy with itself: the value barely moves, the draw is consumed all the same.
  _close(np.asarray(aug.proxies)[len(LABELS):n], proxies[[0, 2, 5]], rtol=1e-6)


def _dummy_disc():
  config = dada_config()
  method = methods.build(config, num_classes=CLASSES)
  params, state = method.init(jax.random.key(0))
  return jax.tree.map(np.asarray, params["discriminators"]), jax.tree.map(np.asarray, state["discriminators"])


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


def test_discriminator_objective_matches_torch(criterion_setup):
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
  ref = torch_criterion_call(params["discriminators"], state["discriminators"], x, LABELS,
                             np.asarray(params["loss"]["proxies"]), pairs, masks, method.opts, "discriminator")
  _close(loss, ref["loss"], err=name)
  _close(metrics["d_domain"], ref["domain"])
  _close(metrics["d_category"], ref["category"])
  _close(metrics["d_discrepancy"], ref["discrepancy"])
  grads = _flat_np(grads)
  scale = max(np.abs(v).max() for k, v in ref.items() if k.startswith("grad/"))
  for path, g in grads.items():
    if bn_shadowed(path, grads):  # zero up to rounding on both sides
      assert np.abs(g).max() < 1e-5 * scale and np.abs(ref[f"grad/{path}"]).max() < 1e-5 * scale, path
    else:
      _close(g, ref[f"grad/{path}"], err=f"{name} {path}")
  # BN per call, running statistics in call order: U three times, D_c twice.
  for path, v in _flat_np(new_state["discriminators"]).items():
    _close(v, ref[f"stats/{path}"], err=f"{name} {path}")
  assert set(grads) == {k[5:] for k in ref if k.startswith("grad/")}


def test_generator_objective_matches_torch(criterion_setup):
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
  ref = torch_criterion_call(params["discriminators"], state["discriminators"], x, LABELS,
                             np.asarray(params["loss"]["proxies"]), pairs, masks, method.opts, "generator")
  _close(loss, ref["loss"], err=name)
  _close(metrics["proxy_loss"], ref["proxy_loss"])
  _close(metrics["g_domain"], ref["domain"])
  _close(metrics["g_category"], ref["category"])
  _close(metrics["g_discrepancy"], ref["discrepancy"])
  _close(gx, ref["x_grad"], err=f"{name} x")
  _close(gp, ref["proxies_grad"], err=f"{name} proxies")
  for path, v in _flat_np(new_state["discriminators"]).items():
    _close(v, ref[f"stats/{path}"], err=f"{name} {path}")


# -- tests: whole iterations through the update step ----------------------------------------------------------

HP = dict(lr=1e-3, decay=1e-4, proxy_lr=0.04, dis_lr=5e-4, dis_decay=4e-4, warmup=2, step_size=1, gamma=0.5,
          layers=TINY_RESNET["layers"])


def iteration_config(bn_freeze: bool) -> ml_collections.ConfigDict:
  """CUB-like criterion, warm-up 2 (epoch 0: discriminators only; epoch 1: head-only generator step; the
  backbone's Adam starts in epoch 2), StepLR(1, 0.5) on all three optimizers from epoch 2 on."""
  c = dada_config(**SETTINGS["cub"], bn_freeze=bn_freeze, d_warmup=1, d_step=3)
  c.optim.lr, c.optim.weight_decay = HP["lr"], HP["decay"]
  c.optim.schedule.update(dict(name="step", step_size=HP["step_size"], gamma=HP["gamma"], offset=HP["warmup"]))
  c.optim.groups = (("model/backbone/.*", dict(name="backbone", start_epoch=HP["warmup"])),
                    ("loss/proxies", dict(name="proxies", lr=HP["proxy_lr"], weight_decay=0.0)),
                    ("discriminators/.*", dict(name="discriminators", lr=HP["dis_lr"], weight_decay=HP["dis_decay"])))
  return c


def run_update_steps(method, params, method_state, config, epochs, seed_key):
  """One update per epoch through dml_jax.train.step, as the trainer drives it (optimizer groups renewed where
  the plan changes). Returns per epoch: (flat params, flat method state, metrics, the draws of every sub-step
  recomputed from the documented keys: repeat r of phase i uses fold_in(fold_in(fold_in(key, step), i), r))."""
  plan = optim.ParamPlan(config.optim, list(tree_lib.flatten(params)), selectors=method.param_selectors(params))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params), donate=False)
  rows = len(LABELS) + len(LABELS) // 2
  groups, state, out = None, None, []
  for epoch, (images, labels) in enumerate(epochs):
    new_groups = plan.groups(epoch)
    if new_groups != groups:
      current = params if state is None else state["params"]
      opt = optim.init_group_states(new_groups, current, None if state is None else state["opt_state"], groups)
      state = step_lib.init_train_state(current, method_state if state is None else state["method_state"], opt,
                                        seed_key, step=epoch)
      groups = new_groups
    key = jax.random.fold_in(seed_key, epoch)  # one step per epoch: step index = epoch
    phase_keys = [jax.random.fold_in(jax.random.fold_in(key, 0), r) for r in range(method.opts["d_step"])]
    phase_keys.append(jax.random.fold_in(jax.random.fold_in(key, 1), 0))
    draws = [draws_to_numpy(jax.jit(method.sample_draws, static_argnums=1)(k, rows)) for k in phase_keys]
    lrs, ep = step_lib.learning_rate_args(groups, epoch)
    batch = step_lib.shard_batch({"image": images, "label": labels, "index": np.arange(len(labels), dtype=np.int32)},
                                 mesh)
    state, metrics = cache.update_fn(groups, epoch)(state, batch, lrs, ep)
    out.append((_flat_np(state["params"]), _flat_np(state["method_state"]), jax.device_get(metrics), draws))
  return out


GROUP_LR = {"model": HP["lr"], "loss": HP["proxy_lr"], "discriminators": HP["dis_lr"]}


def adam_close(got, expected, lr, *, noise=False, err=""):
  """Parameters after Adam steps: at least 99% of the entries within 1e-5 relative / 1e-6 absolute, every entry
  within a tenth of a step. Adam divides each entry's update by that entry's own gradient scale, so an entry
  whose gradient is at the rounding level of the sum it comes from (a cancellation) takes a step that
  rounding decides, in either implementation. noise: the bias of a layer followed by BatchNorm, whose true
  gradient is zero (only rounding noise and the weight decay drive it): the step bound alone."""
  got, expected = np.asarray(got), np.asarray(expected)
  diff = np.abs(got - expected)
  tight = diff <= 1e-6 + 1e-5 * np.abs(expected)
  if not noise:
    assert tight.mean() >= 0.99 or (~tight).sum() <= 1, f"{err}: {(~tight).sum()} of {tight.size} entries differ"
  assert diff.max() <= 0.1 * lr + 1e-6, f"{err}: max difference {diff.max()} (lr {lr})"


@pytest.mark.parametrize("bn_freeze", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["bn_trainable", "bn_frozen"])
def test_iterations_match_torch_sub_step_by_sub_step(bn_freeze):
  config = iteration_config(bn_freeze)
  method = methods.build(config, num_classes=CLASSES)
  params, state = method.init(jax.random.key(2))
  rng = np.random.RandomState(8)
  # Realistic BN statistics for the backbone (the frozen variant normalises with them).
  state = {**state, "model": jax.tree.map(lambda v: np.asarray(v) * rng.uniform(0.5, 1.5, np.shape(v)).astype(
      np.float32) + rng.uniform(-0.1, 0.1, np.shape(v)).astype(np.float32), state["model"])}
  label_sets = [LABELS, np.array([1, 1, 4, 4, 0, 0, 1, 1]), np.array([3, 3, 5, 5, 2, 2, 0, 0]),
                np.array([5, 5, 5, 5, 1, 1, 3, 3])]
  epochs = [(rng.randn(len(LABELS), 32, 32, 3).astype(np.float32), labels.astype(np.int32)) for labels in label_sets]
  ours = run_update_steps(method, params, state, config, epochs, jax.random.key(5))

  torch_epochs = [(images, labels, draws) for (images, labels), (_, _, _, draws) in zip(epochs, ours)]
  ref = torch_training(_flat_np(params), _flat_np(state), torch_epochs, method.opts,
                       dict(HP, bn_freeze=bn_freeze))
  initial = _flat_np(params)
  bias_gap = {}  # the largest difference so far of each BN-shadowed bias
  for epoch, ((got_params, got_state, metrics, _), expected) in enumerate(zip(ours, ref)):
    where = f"epoch {epoch}"
    _close(metrics["discriminator/loss" if epoch >= 1 else "loss"], expected["d_loss"], err=where)
    if epoch >= 1:
      _close(metrics["generator/loss"], expected["g_loss"], err=where)
    else:
      assert "generator/loss" not in metrics and expected["g_loss"] is None
    for path, value in got_params.items():
      adam_close(value, expected[path], GROUP_LR[path.split("/")[0]], noise=bn_shadowed(path, got_params),
                 err=f"{where} {path}")
      if bn_shadowed(path, got_params):
        bias_gap[path] = max(bias_gap.get(path, 0.0), float(np.abs(value - expected[path]).max()))
    for path, value in got_state.items():
      # A running mean right after such a bias carries it (the mean of W x + b): allow the biases' gap.
      module, _, leaf = path.rpartition("/")
      bias = f"{module.rpartition('/')[0]}/fc{module.rpartition('/')[2][2:]}/bias"
      gap = bias_gap.get(bias, 0.0) if leaf == "mean" else 0.0
      np.testing.assert_allclose(value, expected[f"stats/{path}"], rtol=1e-5, atol=1e-6 + 1.1 * gap,
                                 err_msg=f"{where} {path}")
    # What moved when: epoch 0 trains the discriminators alone, epoch 1 the head and proxies too, the backbone
    # from epoch 2 (with frozen statistics its BN scale and bias still train).
    moved = {p for p in got_params if not np.array_equal(got_params[p], initial[p])}
    assert any(p.startswith("discriminators/") for p in moved)
    assert ("loss/proxies" in moved) == (epoch >= 1) and ("model/embedding/kernel" in moved) == (epoch >= 1)
    assert any(p.startswith("model/backbone/") for p in moved) == (epoch >= 2)
    stats_moved = any(not np.array_equal(got_state[p], _flat_np(state)[p]) for p in got_state
                      if p.startswith("model/"))
    assert stats_moved == (not bn_freeze)


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
