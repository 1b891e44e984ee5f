"""The baseline method: backbone -> embedding head -> L2 -> a loss from `dml_jax.losses`.

Covers the Proxy-Anchor, Proxy-NCA, NormSoftmax, Margin, Multi-Similarity and Triplet baselines
(docs/methods/metric_loss.md). Heads (`config.method.head`):

  'linear'          Linear(D -> E) on the backbone's pooled features (ViT cls token, ResNet GAP).
  'gap_gmp_linear'  global average pool + global max pool of `forward_features`, summed, then
                    Linear(C -> E): the Proxy-Anchor code's ResNet-50 and BN-Inception heads.
  'none'            the pooled features themselves (E = D).

The linear layer is initialised as the seeds do: kernel ~ N(0, 2 / E) (torch kaiming_normal_, mode
fan_out), bias 0. Embeddings are L2-normalised, x / sqrt(sum(x^2) + 1e-12), in float32.

BatchNorm: `config.method.bn_freeze` runs the backbone's BN with running statistics during training and
never updates them (torch `eval()` on every BatchNorm2d). Whether BN scale and bias train is the config's
parameter groups' business: the selector '@batchnorm' names them (a Proxy-Anchor recipe with warm-up
lets them train after it, because the authors' code re-enables them at the end of warm-up).

`config.compute_dtype = 'bfloat16'` runs backbone and head in bfloat16 on float32 master parameters (the
gradients arrive in float32); embeddings, L2 and the loss stay float32. BatchNorm running statistics are
stored in float32 but, when they are updated (bn_freeze off), computed from bfloat16 activations.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dml_jax import losses
from dml_jax.errors import InvalidValueError, unknown_name
from dml_jax.losses.ops import l2_normalize
from dml_jax.methods import modeling
from dml_jax.methods.base import Method, StepInfo

HEADS = ("linear", "gap_gmp_linear", "none")
_LINEAR_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # N(0, 2 / out_features)


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'metric_loss' (defaults: Proxy-Anchor, alpha 32, margin 0.1)."""
  return ml_collections.ConfigDict(dict(
      name="metric_loss",
      head="gap_gmp_linear",  # see HEADS
      bn_freeze=True,  # BatchNorm statistics frozen during training
      loss=ml_collections.ConfigDict(dict(
          name="proxy_anchor",  # dml_jax.losses registry name
          hparams=ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1)),  # keyword arguments of the loss
          param_options=ml_collections.ConfigDict(),  # keyword arguments of its parameter initialisers
      )),
  ))


# Loss keyword arguments that scale logits or distances: 0 or less makes every loss degenerate.
_POSITIVE_HPARAMS = ("alpha", "beta", "scale", "temperature")


def _check_loss_hparams(spec: losses.LossSpec, hparams: dict) -> None:
  """Unknown keyword arguments and non-positive scales of `config.method.loss.hparams`, before any work."""
  accepted = [name for name, p in inspect.signature(spec.fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
  for name, value in hparams.items():
    if name not in accepted:
      raise unknown_name(f"{spec.name} loss argument (config.method.loss.hparams)", name, accepted)
    if name in _POSITIVE_HPARAMS and isinstance(value, (int, float)) and not value > 0:
      raise InvalidValueError(f"config.method.loss.hparams.{name} must be > 0, got {value!r}",
                              f"e.g. --config.method.loss.hparams.{name}=32")


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


def pooled_feature_dim(backbone: nnx.Module, head: str, image_size: int, backbone_name: str) -> int:
  """Channels of what the head sees: forward_features' C for 'gap_gmp_linear', else the pooled D."""
  graph, state = nnx.split(backbone)

  def features(state, images):
    net = nnx.merge(graph, state)
    if head == "gap_gmp_linear":
      if not hasattr(net, "forward_features"):
        raise ValueError(f"head 'gap_gmp_linear' needs a backbone with forward_features (a CNN feature map); "
                         f"{backbone_name!r} has none: use head 'linear'")
      return net.forward_features(images)
    return net(images)

  out = jax.eval_shape(features, state, jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32))
  if head == "gap_gmp_linear" and len(out.shape) != 4:
    raise ValueError(f"head 'gap_gmp_linear' needs forward_features -> [B, h, w, C]; {backbone_name!r} gives "
                     f"shape {out.shape}: use head 'linear'")
  return int(out.shape[-1])


class EmbeddingNet(NamedTuple):
  """What `build_embedding_model` returns: the split model, its output width E, the '/'-joined paths of its
  BatchNorm scales and biases (under 'model/'), and the preprocessing of the backbone's weights."""

  model: modeling.SplitModel
  embedding_dim: int
  batchnorm_paths: set[str]
  pretrained_cfg: Any


def build_embedding_model(config: Any, *, head: str, bn_freeze: bool, backbone_rng: jax.Array,
                          head_rng: jax.Array) -> EmbeddingNet:
  """Backbone of `config.model` + `head` (see HEADS), split for the trainer; shared by the methods that
  train this network with another objective (Proxy-ISA).

  The head's Linear is initialised as the seeds do (kernel ~ N(0, 2 / E), bias 0). With `bn_freeze` the
  backbone's BatchNorm runs on its running statistics in training and never updates them.
  """
  if head not in HEADS:
    raise unknown_name("head (config.method.head)", head, HEADS, cls=InvalidValueError)
  m = config.model
  backbone = modeling.build_backbone(m, backbone_rng, config.dataset.image_size)
  in_features = pooled_feature_dim(backbone, head, int(config.dataset.image_size), m.backbone)
  embedding_dim = in_features if head == "none" else int(m.embedding_dim)
  linear = None
  if head != "none":
    linear = nnx.Linear(in_features, embedding_dim, kernel_init=_LINEAR_INIT, bias_init=nnx.initializers.zeros,
                        rngs=nnx.Rngs(head_rng))
  model = EmbeddingModel(backbone, head, linear)
  batchnorm = modeling.batchnorm_affine_paths(model, "model")
  modeling.set_batchnorm_frozen(model, bn_freeze)
  return EmbeddingNet(modeling.SplitModel(model), embedding_dim, batchnorm, backbone.pretrained_cfg)


def embed_images(model: modeling.SplitModel, dtype: Any, model_params: Any, model_state: Any, images: jax.Array, *,
                 train: bool) -> tuple[jax.Array, Any]:
  """images float32 [B, S, S, 3] -> (L2-normalised embeddings float32 [B, E], the model's new state).

  dtype: `modeling.compute_dtype(config.compute_dtype)` (None: float32). Train mode updates BatchNorm
  statistics unless they are frozen; eval mode uses the running statistics.
  """
  net = model.merge(modeling.cast_floating(model_params, dtype), modeling.cast_floating(model_state, dtype),
                    train=train)
  emb = net(images if dtype is None else images.astype(dtype))
  new_state = model.other_of(net)
  if dtype is not None:  # statistics go back to their stored dtype
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
  return l2_normalize(emb.astype(jnp.float32)), new_state


class MetricLossMethod(Method):
  """Backbone + head + L2 + `config.method.loss.name` with its learnable parameters ('loss/<name>')."""

  name = "metric_loss"

  def __init__(self, config: Any, *, num_classes: int):
    o = config.method
    if o.head not in HEADS:
      raise unknown_name("head (config.method.head)", o.head, HEADS, cls=InvalidValueError)
    self.config = config
    self.num_classes = int(num_classes)
    self.head = o.head
    self.bn_freeze = bool(o.bn_freeze)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.loss_spec = losses.get_loss_spec(o.loss.name)
    self.loss_hparams = dict(o.loss.hparams)
    _check_loss_hparams(self.loss_spec, self.loss_hparams)
    self.loss_param_options = dict(o.loss.param_options)
    self.model: modeling.SplitModel | None = None
    self._batchnorm: set[str] = set()

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    backbone_rng, head_rng, loss_rng = jax.random.split(rng, 3)
    net = build_embedding_model(self.config, head=self.head, bn_freeze=self.bn_freeze, backbone_rng=backbone_rng,
                                head_rng=head_rng)
    self.model, self.embedding_dim = net.model, net.embedding_dim
    self.pretrained_cfg, self._batchnorm = net.pretrained_cfg, net.batchnorm_paths
    loss_params = losses.init_loss_params(self.loss_spec.name, loss_rng, num_classes=self.num_classes,
                                          embedding_dim=self.embedding_dim, **self.loss_param_options)
    return {"model": self.model.params, "loss": loss_params}, {"model": self.model.other}

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    del params
    return {"batchnorm": set(self._batchnorm)}

  def _embed(self, model_params: Any, model_state: Any, images: jax.Array, train: bool) -> tuple[jax.Array, Any]:
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    return embed_images(self.model, self.compute_dtype, model_params, model_state, images, train=train)

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    del info
    emb, model_state = self._embed(params["model"], method_state["model"], batch["image"], train=True)
    extra = {"rng": rng} if self.loss_spec.needs_rng else {}
    loss = self.loss_spec.fn(emb, batch["label"], **params["loss"], **extra, **self.loss_hparams)
    return loss.astype(jnp.float32), ({}, {**method_state, "model": model_state})

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    emb, _ = self._embed(params["model"], method_state["model"], images, train=False)
    return emb


def build(config: Any, num_classes: int) -> MetricLossMethod:
  return MetricLossMethod(config, num_classes=num_classes)
