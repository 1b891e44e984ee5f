"""The XLA compile options of the model steps: applied on CPU only, dropped with a warning when unknown."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import pytest

from dml_jax.train import compile_options
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
