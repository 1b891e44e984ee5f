"""BatchNorm with PyTorch's `nn.BatchNorm2d` semantics, for the CNN backbones (ResNet, BN-Inception).

Why not `nnx.BatchNorm`: flax updates the running variance with the *biased* batch variance and takes
`momentum` as the weight of the old value, while torch updates it with the *unbiased* variance
(n / (n - 1)) and takes `momentum` as the weight of the new value. Over an epoch of training with
unfrozen statistics the two drift apart, so the torch rule is reproduced here.

Two modes, switched per model (the training engine picks one per config):
  * batch statistics (`use_running_average=False`, torch `train()`): normalises with the batch mean and
    biased variance, and updates the running statistics:
        mean <- (1 - momentum) * mean + momentum * batch_mean
        var  <- (1 - momentum) * var  + momentum * batch_var * n / (n - 1)     (n = B * H * W)
  * frozen statistics (`use_running_average=True`, torch `eval()`): normalises with the running
    statistics and never changes them (the Proxy-Anchor family's `bn_freeze`).

Switch with `set_batch_stats_frozen(model, frozen)`, or with NNX's `model.eval()` / `model.train()`
(which also flip `deterministic` on any Dropout), or non-mutating with
`nnx.view(model, only=BatchNorm, use_running_average=True)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
  """Per-channel batch normalisation over the last axis of NHWC (or any [..., C]) inputs.

  Parameters `scale`, `bias` (nnx.Param, torch `weight`, `bias`) and statistics `mean`, `var`
  (nnx.BatchStat, torch `running_mean`, `running_var`), all float32 [C].

  Args:
    num_features: C.
    momentum: torch convention, the weight of the *new* batch statistic (torch default 0.1; flax's
      `momentum` would be 1 - this).
    epsilon: added to the variance (torch default 1e-5).
    use_running_average: start in frozen-statistics mode.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               use_running_average: bool = False):
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(f"BatchNorm momentum (torch convention) must lie in [0, 1], got {momentum}")
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float [..., C] -> same shape and dtype."""
    if x.shape[-1] != self.num_features:
      raise ValueError(f"BatchNorm over {self.num_features} channels got input of shape {x.shape}")
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      n = x.size // x.shape[-1]
      if n < 2:
        # torch raises here too: the unbiased variance of one value is undefined.
        raise ValueError(f"BatchNorm with batch statistics needs more than one value per channel, got input "
                         f"of shape {x.shape}; freeze the statistics (set_batch_stats_frozen) for such inputs")
      mean = jnp.mean(x, axis=reduce_axes)
      # Two-pass variance (as torch), not E[x^2] - E[x]^2, which loses digits for large activations.
      var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient((1.0 - m) * self.mean[...] + m * mean)
      self.var[...] = jax.lax.stop_gradient((1.0 - m) * self.var[...] + m * var * (n / (n - 1)))
    inv = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    return x * inv + (self.bias[...] - mean * inv)

  def set_view(self, use_running_average: bool | None = None):
    """Hook for `nnx.view(model, use_running_average=...)`."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def set_batch_stats_frozen(model: nnx.Module, frozen: bool) -> None:
  """Puts every `BatchNorm` in `model` into frozen-statistics (True) or batch-statistics (False) mode.

  Touches nothing else (unlike `model.eval()`, which also makes Dropout deterministic).
  """
  model.set_attributes(BatchNorm, use_running_average=frozen, raise_if_not_found=False)


def batch_stats_frozen(model: nnx.Module) -> bool:
  """True when every BatchNorm in `model` uses running statistics; raises when modes are mixed or absent."""
  modes = {m.use_running_average for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm)}
  if len(modes) != 1:
    raise ValueError(f"model has BatchNorm modes {sorted(modes)} (expected exactly one)")
  return modes.pop()
