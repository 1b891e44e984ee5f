"""The XLA compile options of the model steps: applied on CPU only, dropped with a warning when unknown."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dml_jax import pytree as tree_lib
from dml_jax.methods.base import Method, Phase
from dml_jax.train import compile_options, optim
from dml_jax.train import step as step_lib


@pytest.fixture
def fresh_cache():
  compile_options._accepted.cache_clear()
  yield
  compile_options._accepted.cache_clear()


def test_cpu_gets_the_options_other_backends_none(fresh_cache):
  assert compile_options.compiler_options("cpu") == compile_options.CPU_OPTIONS
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert compile_options.compiler_options(platform) is None
  assert compile_options.for_mesh(step_lib.make_mesh()) == compile_options.CPU_OPTIONS


def test_an_option_this_jaxlib_rejects_is_dropped_with_a_warning(fresh_cache, monkeypatch, caplog):
  monkeypatch.setattr(compile_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_dml_jax": True})
  with caplog.at_level(logging.WARNING, logger=compile_options.__name__):
    assert compile_options.compiler_options("cpu") is None
    assert compile_options.compiler_options("cpu") is None  # tried once per process
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 1 and "xla_cpu_no_such_option_for_dml_jax" in warnings[0] and jax.__version__ in warnings[0]


def test_the_options_reach_the_compiled_step(fresh_cache):
  """Without them jaxlib 0.10's CPU compiler emits YNNPACK fusions for dots; with them, none."""
  x = jnp.ones((64, 48))
  default = jax.jit(lambda a: a @ a.T).lower(x).compile().as_text()
  ours = jax.jit(lambda a: a @ a.T, compiler_options=compile_options.compiler_options("cpu")).lower(x).compile()
  assert "ynn" not in ours.as_text()
  if "ynn" not in default:
    pytest.skip(f"this jaxlib ({jax.__version__}) makes no YNNPACK fusions by default")


class _Regression(Method):
  """A least-squares layer: enough for XLA's CPU compiler to emit its dot fusions."""

  name = "regression"

  def init(self, rng):
    return {"w": jax.random.normal(rng, (32, 48))}, {}

  def loss(self, params, method_state, batch, rng, info):
    return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), ({}, method_state)

  def objectives(self):
    return {"loss": self.loss}

  def phases(self, epoch):
    return (Phase("loss", groups=("base",)),)

  def embed_fn(self, params, method_state, images):
    return images @ params["w"]


def test_the_update_step_is_compiled_with_them(fresh_cache):
  method = _Regression()
  params, method_state = method.init(jax.random.key(0))
  config = ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, nesterov=False,
      clip_value=0.0, schedule=dict(name="constant"), groups=()))
  groups = optim.ParamPlan(config, list(tree_lib.flatten(params))).groups(0)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cache = step_lib.StepCache(method, mesh, tree_lib.key_index(params), donate=False)
  assert cache.compiler_options == compile_options.CPU_OPTIONS
  state = step_lib.init_train_state(params, method_state, optim.init_group_states(groups, params), jax.random.key(1))
  batch = step_lib.shard_batch({"x": np.ones((64, 32), np.float32)}, mesh)
  lrs, epoch = step_lib.learning_rate_args(groups, 0)
  text = cache.update_fn(groups, 0).lower(state, batch, lrs, epoch).compile().as_text()
  assert " dot(" in text and "ynn" not in text
