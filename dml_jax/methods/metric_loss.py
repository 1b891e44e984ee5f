"""The baseline method: backbone -> embedding head -> L2 -> a loss from `dml_jax.losses`.

Covers Proxy-Anchor, Proxy-NCA, NormSoftmax, Margin, Multi-Similarity and Triplet baselines
(specs/proxyisa_dfml.md §1.3–1.5, §2). Heads (`config.model.head`):

  'linear'          Linear(D -> E) on the backbone's pooled features (ViT cls token, ResNet GAP).
  'gap_gmp_linear'  global average pool + global max pool of `forward_features`, summed, then
                    Linear(C -> E): the Proxy-Anchor code's ResNet-50 and BN-Inception heads.
  'none'            the pooled features themselves (E = D), e.g. DeiT in DFML.

The linear layer is initialised as the seeds do: kernel ~ N(0, 2 / E) (torch kaiming_normal_, mode
fan_out), bias 0. Embeddings are L2-normalised, x / sqrt(sum(x^2) + 1e-12), in float32.

BatchNorm (`config.model`): `bn_freeze` runs the backbone's BN with running statistics during training
and never updates them (torch `eval()` on every BatchNorm2d); `bn_affine_trainable` False keeps BN scale
and bias frozen for the whole run (a Proxy-Anchor config with warm-up > 0 sets it True because its code
re-enables them at the end of warm-up, specs §1.5).

`config.compute_dtype = 'bfloat16'` runs backbone and head in bfloat16 on float32 master parameters (the
gradients arrive in float32); embeddings, L2 and the loss stay float32. BatchNorm running statistics are
stored in float32 but, when they are updated (bn_freeze off), computed from bfloat16 activations.

The NNX model is split once in `init`; the update step only merges arrays into the stored graph
definitions while tracing, so a step has no Python cost that grows with the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax import backbones, losses
from dml_jax.methods import Method, StepInfo, cast_floating

HEADS = ("linear", "gap_gmp_linear", "none")
_LINEAR_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # N(0, 2 / out_features)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / sqrt(sum(x^2) + 1e-12) over the last axis (the seeds' `l2_norm`)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


class EmbeddingModel(nnx.Module):
  """Backbone + head: images float32 [B, S, S, 3] -> embeddings [B, E] (not normalised)."""

  def __init__(self, backbone: nnx.Module, head_type: str, head: nnx.Linear | None):
    self.backbone = backbone
    self.head_type = head_type
    self.head = head

  def __call__(self, images: jax.Array) -> jax.Array:
    if self.head_type == "gap_gmp_linear":
      fmap = self.backbone.forward_features(images)  # [B, h, w, C]
      pooled = jnp.mean(fmap, axis=(1, 2)) + jnp.max(fmap, axis=(1, 2))
    else:
      pooled = self.backbone(images)
    return pooled if self.head is None else self.head(pooled)


def _set_batchnorm_frozen(model: nnx.Module, frozen: bool) -> None:
  from dml_jax.backbones.batchnorm import BatchNorm  # the CNN backbones' torch-semantics BN
  model.set_attributes(BatchNorm, use_running_average=frozen, raise_if_not_found=False)
  model.set_attributes(nnx.BatchNorm, use_running_average=frozen, raise_if_not_found=False)


def _batchnorm_affine_paths(model: nnx.Module, prefix: str) -> set[str]:
  from dml_jax.backbones.batchnorm import BatchNorm
  paths = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (BatchNorm, nnx.BatchNorm)):
      base = "/".join(str(p) for p in path)
      for name in ("scale", "bias"):
        if isinstance(getattr(node, name, None), nnx.Param):
          paths.add(f"{prefix}/{base}/{name}")
  return paths


class _SplitModel:
  """An NNX model split once: graph definitions (train / eval) and leaf orders of its two states.

  `merge(params, other, train)` rebuilds the module from pure nested dicts at trace time; `other_of`
  reads the non-parameter state (BatchNorm statistics) back out after a forward pass.
  """

  def __init__(self, model: nnx.Module, bn_freeze: bool):
    _set_batchnorm_frozen(model, bn_freeze)
    self.train_graph, params, other = nnx.split(model, nnx.Param, ...)
    model.eval()  # BN running statistics, deterministic dropout
    self.eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
    self.params_pure = nnx.to_pure_dict(params)
    self.other_pure = nnx.to_pure_dict(other)
    self._param_def = jax.tree.structure(params)
    self._other_def = jax.tree.structure(other)
    self._other_pure_def = jax.tree.structure(self.other_pure)
    # Both flatten in sorted-key order, so leaves correspond one to one; checked once here.
    for state, pure in ((params, self.params_pure), (other, self.other_pure)):
      a = [tuple(str(getattr(k, "key", k)) for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
      b = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
      if a != b:
        raise AssertionError("NNX state and its pure dict flatten in different orders")

  def merge(self, params: Any, other: Any, train: bool) -> nnx.Module:
    p = jax.tree.unflatten(self._param_def, jax.tree.leaves(params))
    o = jax.tree.unflatten(self._other_def, jax.tree.leaves(other))
    return nnx.merge(self.train_graph if train else self.eval_graph, p, o)

  def other_of(self, model: nnx.Module) -> Any:
    _, _, other = nnx.split(model, nnx.Param, ...)
    return jax.tree.unflatten(self._other_pure_def, jax.tree.leaves(other))


class MetricLossMethod(Method):
  """Backbone + head + L2 + `config.loss.name` with its learnable parameters ('loss/<name>')."""

  name = "metric_loss"

  def __init__(self, config: Any, *, num_classes: int):
    m = config.model
    if m.head not in HEADS:
      raise ValueError(f"config.model.head must be one of {HEADS}, got {m.head!r}")
    self.config = config
    self.num_classes = int(num_classes)
    self.head = m.head
    self.bn_freeze = bool(m.bn_freeze)
    self.bn_affine_trainable = bool(m.bn_affine_trainable)
    self.compute_dtype = None if config.compute_dtype in ("float32", None, "") else jnp.dtype(config.compute_dtype)
    self.loss_spec = losses.get_loss_spec(config.loss.name)
    self.loss_hparams = dict(config.loss.hparams)
    self.loss_param_options = dict(config.loss.param_options)
    self.image_size = int(config.dataset.image_size)
    self.pretrained_cfg = backbones.get_entry(m.backbone).pretrained_cfg
    self._split: _SplitModel | None = None
    self._frozen: set[str] = set()

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    m = self.config.model
    backbone_rng, head_rng, loss_rng = jax.random.split(rng, 3)
    overrides = dict(m.backbone_overrides)
    if m.weights:
      backbone = backbones.create(m.backbone, weights=m.weights, **overrides)  # strict; names every bad key
    else:
      backbone = backbones.create(m.backbone, rngs=nnx.Rngs(backbone_rng), **overrides)
    self.pretrained_cfg = backbone.pretrained_cfg
    in_features = self._feature_dim(backbone)
    embedding_dim = in_features if self.head == "none" else int(m.embedding_dim)
    self.embedding_dim = embedding_dim
    head = None
    if self.head != "none":
      head = nnx.Linear(in_features, embedding_dim, kernel_init=_LINEAR_INIT, bias_init=nnx.initializers.zeros,
                        rngs=nnx.Rngs(head_rng))
    model = EmbeddingModel(backbone, self.head, head)
    if not self.bn_affine_trainable:
      self._frozen = _batchnorm_affine_paths(model, "model")
    self._split = _SplitModel(model, self.bn_freeze)
    loss_params = losses.init_loss_params(self.loss_spec.name, loss_rng, num_classes=self.num_classes,
                                          embedding_dim=embedding_dim, **self.loss_param_options)
    params = {"model": self._split.params_pure, "loss": loss_params}
    return params, {"model": self._split.other_pure}

  def _feature_dim(self, backbone: nnx.Module) -> int:
    graph, state = nnx.split(backbone)
    head = self.head

    def features(state, images):
      net = nnx.merge(graph, state)
      if head == "gap_gmp_linear":
        if not hasattr(net, "forward_features"):
          raise ValueError(f"head 'gap_gmp_linear' needs a backbone with forward_features (a CNN feature map); "
                           f"{self.config.model.backbone!r} has none: use head 'linear'")
        return net.forward_features(images)
      return net(images)

    s = self.image_size
    out = jax.eval_shape(features, state, jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
    if head == "gap_gmp_linear" and len(out.shape) != 4:
      raise ValueError(f"head 'gap_gmp_linear' needs forward_features -> [B, h, w, C]; "
                       f"{self.config.model.backbone!r} gives shape {out.shape}: use head 'linear'")
    return int(out.shape[-1])

  def frozen_paths(self, params: dict) -> set[str]:
    del params
    return set(self._frozen)

  def _embed(self, model_params: Any, model_state: Any, images: jax.Array, train: bool) -> tuple[jax.Array, Any]:
    if self._split is None:
      raise RuntimeError("call method.init(rng) before using the method")
    dtype = self.compute_dtype
    model = self._split.merge(cast_floating(model_params, dtype), cast_floating(model_state, dtype), train)
    emb = model(images if dtype is None else images.astype(dtype))
    new_state = self._split.other_of(model)
    if dtype is not None:  # statistics go back to their stored dtype
      new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
    return l2_normalize(emb.astype(jnp.float32)), new_state

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              step_info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    del step_info
    emb, model_state = self._embed(params["model"], method_state["model"], batch["image"], train=True)
    extra = {"rng": rng} if self.loss_spec.needs_rng else {}
    loss = self.loss_spec.fn(emb, batch["label"], **params["loss"], **extra, **self.loss_hparams)
    return loss.astype(jnp.float32), ({}, {**method_state, "model": model_state})

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    emb, _ = self._embed(params["model"], method_state["model"], images, train=False)
    return emb
