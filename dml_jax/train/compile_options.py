"""XLA compile options for the jitted model steps (update and embedding), by backend.

CPU: jaxlib 0.10 hands dots and convolutions to YNNPACK fusions by default. In our training steps on a 2-core
AVX2 CPU they were slower than XLA's Eigen kernels for ResNet-50 (22.0 s against 10.3 s per step at batch 16)
and about even for the ViT steps (docs/benchmarks.md, "Training step", the rows `ours_xla_defaults`).
`xla_cpu_experimental_ynn_fusion_type=''` turns those fusions off for our steps only. Both paths are float32
dots, so the results agree up to rounding (the parity tests run with the option). Options go to
`jax.jit(..., compiler_options=...)`, so nothing else in the process (the user's own jitted code, XLA_FLAGS)
is touched.

An option a future jaxlib no longer knows is dropped with one warning, not an error: `compiler_options`
tries the options once per process on a trivial function first.

GPU / TPU: no options (cuBLAS / cuDNN already).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

_logger = logging.getLogger(__name__)

CPU_OPTIONS: dict[str, Any] = {
    # YNNPACK dot/convolution fusions off: the Eigen path is faster on the CPUs we measured (module docstring).
    "xla_cpu_experimental_ynn_fusion_type": "",
}


@functools.cache
def _accepted(items: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this jaxlib's CPU compiler takes the options (a trivial compile, once per process)."""
  try:
    x = jax.device_put(jnp.ones((2, 2)), jax.devices("cpu")[0])
    jax.jit(lambda x: x @ x, compiler_options=dict(items)).lower(x).compile()
  except Exception as e:  # jax raises JaxRuntimeError('No such compile option ...') or 'not a valid ...'
    _logger.warning("XLA CPU compile options %s not used: this jaxlib (%s) rejects them (%s)", dict(items),
                    jax.__version__, str(e).splitlines()[0])
    return False
  return True


def compiler_options(platform: str) -> dict[str, Any] | None:
  """The options for a step compiled for `platform` ('cpu', 'gpu', 'cuda', 'tpu', ...), or None."""
  if platform != "cpu" or not CPU_OPTIONS or not _accepted(tuple(sorted(CPU_OPTIONS.items()))):
    return None
  return dict(CPU_OPTIONS)


def for_mesh(mesh: jax.sharding.Mesh) -> dict[str, Any] | None:
  """`compiler_options` for the platform of the mesh's devices."""
  return compiler_options(mesh.devices.flat[0].platform)
