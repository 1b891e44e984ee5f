"""embed_dataset: padded rows dropped, loader order kept, batches sharded over the 'data' axis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax.eval.embed import embed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loader(num_images, batch_size, size=4):
  """Fixed-shape batches; the last one padded with valid=False rows."""
  images = np.random.default_rng(0).standard_normal((num_images, size, size, 3)).astype(np.float32)
  batches = []
  for start in range(0, num_images, batch_size):
    count = min(batch_size, num_images - start)
    batch = {"image": np.zeros((batch_size, size, size, 3), np.float32),
             "label": np.full(batch_size, -1, np.int32), "index": np.full(batch_size, -1, np.int32),
             "valid": np.arange(batch_size) < count}
    batch["image"][:count] = images[start:start + count]
    batch["label"][:count] = np.arange(start, start + count) % 3
    batch["index"][:count] = np.arange(start, start + count) + 100
    batches.append(batch)
  return images, batches


@jax.jit
def _embed(images):
  return jnp.mean(images, axis=(1, 2)) * 2.0  # [B, 3]


def test_single_device_drops_padding_and_keeps_order():
  images, batches = _loader(21, 8)
  embeddings, labels, indices = embed_dataset(_embed, batches, desc="test")
  np.testing.assert_allclose(embeddings, images.mean(axis=(1, 2)) * 2.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, np.arange(21) % 3)
  np.testing.assert_array_equal(indices, np.arange(21) + 100)
  assert embeddings.dtype == np.float32 and labels.dtype == np.int64 and indices.dtype == np.int64


def test_progress_false_prints_no_bar(capsys):
  _, batches = _loader(21, 8)
  embed_dataset(_embed, batches, desc="quiet", progress=False)
  assert "quiet" not in capsys.readouterr().err  # the trainer's log.progress=False reaches the embedding bar
  embed_dataset(_embed, batches, desc="loud")
  assert "loud" in capsys.readouterr().err


def test_bad_batches_are_rejected():
  _, batches = _loader(8, 8)
  del batches[0]["valid"]
  with pytest.raises(KeyError, match="lacks keys \\['valid'\\]"):
    embed_dataset(_embed, batches)
  _, batches = _loader(8, 8)
  with pytest.raises(ValueError, match="must return \\[B, D\\]"):
    embed_dataset(jax.jit(lambda x: x), batches)


def test_batches_are_sharded_over_four_devices():
  script = textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import PartitionSpec as P
      from dml_jax.eval.embed import embed_dataset
      from tests.test_eval_embed import _loader
      mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      jitted = jax.jit(lambda x: jnp.mean(x, axis=(1, 2)))
      seen = []
      def embed_fn(images):
        spec = images.sharding.spec if hasattr(images.sharding, "spec") else None
        seen.append((len(images.sharding.device_set), spec))
        return jitted(images)
      for batch_size, expect_devices in ((8, 4), (6, 1)):  # 6 rows do not split over 4 devices
        seen.clear()
        images, batches = _loader(19, batch_size)
        embeddings, labels, indices = embed_dataset(embed_fn, batches, mesh=mesh)
        np.testing.assert_allclose(embeddings, images.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(indices, np.arange(19) + 100)
        assert all(devices == expect_devices for devices, _ in seen), seen
        if expect_devices == 4:
          assert all(spec == P("data") for _, spec in seen), seen
      print("ok")
  """)
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
  assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]
