"""DFML (Wang et al., "Deep Factorized Metric Learning", CVPR 2023), as the official code trains it.

Model: a factorized DeiT (dml_jax/backbones/factorized_vit.py): every block's attention split into G = 3
head-group sub-blocks and its MLP into 3 hidden-unit sub-blocks, with two per-token routers per block. Built
from a plain converted DeiT weights directory, re-laid out while loading, so that at the start the full
network is exactly the pretrained DeiT. No embedding layer: the embedding is the pooled token, E = D (384
for DeiT-S); pooling is (cls + dist) / 2 for the distilled DeiT (the cls token for a plain ViT), then L2.

Training forward (FactorizedVisionTransformer.forward_two_stream): the full ("ori") stream, where every
token goes through all sub-blocks (the pretrained network), and the routed stream, where every token goes
through the one attention and the one MLP sub-block its routers pick (straight-through top-1). Per block,
the matching distances sum_tokens ||d - t||_2 compare a routed-stream term with the detached full stream
after attention and after the MLP (the detach points are listed in FactorizedBlock.two_stream).

Objective, per batch (m1 / m2 the L2-normalised embeddings of the full / routed stream):

  L = PA(m1) + 0.5 PA(m2) + 0.5 D
  D = 0.1 sum_b ||m2_b - sg(m1_b)||_2 + (1e-5 / 12) sum_blocks (attn_distance + mlp_distance)

PA = Proxy-Anchor (alpha 32, margin 0.1; positive term over the classes present, negative over all C) with
ONE set of proxies [C, E] for both streams. Sums, not means: D grows with the batch and the token count.
The `12` is the code's literal (DeiT-S's depth), kept whatever the depth (`layer_distill_divisor`).

Evaluation: the full stream only (the routed stream and the routers are not run), i.e. a plain DeiT with
the trained weights.

Parameter paths: 'model/backbone/...' (factorized_vit's names; routers 'blocks/<i>/attn/gate/kernel' and
'blocks/<i>/gate/kernel', selector '@routers'), 'loss/proxies' [C, E] (N(0, 2 / C)). The warm-up (only the
proxies train; on the authors' DataParallel path the routers too) and the optimizer are the config's
parameter groups. docs/methods/dfml.md lists what the released code does and where this port had to choose.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dml_jax import losses
from dml_jax import pytree as tree_lib
from dml_jax.backbones import factorized_vit
from dml_jax.errors import InvalidValueError
from dml_jax.losses.ops import l2_normalize
from dml_jax.methods import modeling
from dml_jax.methods.base import Method, StepInfo


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'dfml' (the official train.py's constants)."""
  return ml_collections.ConfigDict(dict(
      name="dfml",
      num_sub_blocks=3,  # G: attention head groups and MLP hidden-unit groups per block
      routed_loss_weight=0.5,  # PA(m2)
      distill_loss_weight=0.5,  # D
      embedding_distill_weight=0.1,  # inside D: sum_b ||m2 - sg(m1)||
      layer_distill_weight=1e-5,  # inside D: per block and term, divided by layer_distill_divisor
      layer_distill_divisor=12.0,  # the code's literal 12 (DeiT-S's depth), whatever the depth
      loss=ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1)),  # Proxy-Anchor
  ))


class DFMLNet(nnx.Module):
  """Holds the factorized backbone under 'backbone' (parameter paths 'model/backbone/...')."""

  def __init__(self, backbone: factorized_vit.FactorizedVisionTransformer):
    self.backbone = backbone


class DFMLMethod(Method):
  """DFML behind the Method interface; see the module docstring."""

  name = "dfml"

  def __init__(self, config: Any, *, num_classes: int):
    o = config.method
    if o.num_sub_blocks < 1:
      raise InvalidValueError(f"config.method.num_sub_blocks must be >= 1, got {o.num_sub_blocks}",
                              "e.g. --config.method.num_sub_blocks=3")
    if o.layer_distill_divisor <= 0:
      raise InvalidValueError(f"config.method.layer_distill_divisor must be > 0, got {o.layer_distill_divisor}",
                              "e.g. --config.method.layer_distill_divisor=12.0")
    self.config = config
    self.opts = dict(o)
    self.loss_hparams = dict(alpha=float(o.loss.alpha), margin=float(o.loss.margin))
    self.num_classes = int(num_classes)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.model: modeling.SplitModel | None = None
    self._routers: set[str] = set()

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    m = self.config.model
    backbone_rng, loss_rng = jax.random.split(rng)
    backbone = factorized_vit.create(m.backbone, weights=m.weights or None, rng=backbone_rng,
                                     num_sub_blocks=int(self.opts["num_sub_blocks"]), **dict(m.backbone_overrides))
    self.pretrained_cfg = backbone.pretrained_cfg
    self.embedding_dim = backbone.embed_dim
    if int(m.embedding_dim) != self.embedding_dim:
      raise InvalidValueError(f"DFML has no embedding layer: config.model.embedding_dim ({m.embedding_dim}) must "
                              f"equal the backbone's width {self.embedding_dim}",
                              f"--config.model.embedding_dim={self.embedding_dim}")
    self.model = modeling.SplitModel(DFMLNet(backbone))
    self._routers = {f"model/{p}" for p in tree_lib.flatten(self.model.params)
                     if factorized_vit.GATE_PATH.fullmatch(p.removeprefix("backbone/"))}
    proxies = losses.init_loss_params("proxy_anchor", loss_rng, num_classes=self.num_classes,
                                      embedding_dim=self.embedding_dim)
    return {"model": self.model.params, "loss": proxies}, {}

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    del params
    return {"routers": set(self._routers)}

  def _backbone(self, model_params: Any) -> factorized_vit.FactorizedVisionTransformer:
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    return self.model.merge(modeling.cast_floating(model_params, self.compute_dtype), self.model.other,
                            train=True).backbone

  def _embedding(self, backbone, tokens: jax.Array) -> jax.Array:
    return l2_normalize(backbone.pool(tokens).astype(jnp.float32))

  def _images(self, images: jax.Array) -> jax.Array:
    return images if self.compute_dtype is None else images.astype(self.compute_dtype)

  def loss_terms(self, params: dict, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Every term of the objective (float32 scalars; routes int32 [depth, B*N]); 'loss' is the total."""
    o = self.opts
    backbone = self._backbone(params["model"])
    ori, routed, match = backbone.forward_two_stream(self._images(images))
    m1, m2 = self._embedding(backbone, ori), self._embedding(backbone, routed)
    proxies = params["loss"]["proxies"]
    pa_full = losses.proxy_anchor_loss(m1, labels, proxies, **self.loss_hparams)
    pa_routed = losses.proxy_anchor_loss(m2, labels, proxies, **self.loss_hparams)
    distill_embedding = jnp.sum(factorized_vit.safe_norm(m2 - jax.lax.stop_gradient(m1)))
    distill_layers = jnp.sum(match.attn_distance) + jnp.sum(match.mlp_distance)
    distill = (o["embedding_distill_weight"] * distill_embedding
               + o["layer_distill_weight"] / o["layer_distill_divisor"] * distill_layers)
    loss = pa_full + o["routed_loss_weight"] * pa_routed + o["distill_loss_weight"] * distill
    return dict(loss=loss, pa_full=pa_full, pa_routed=pa_routed, distill=distill,
                distill_embedding=distill_embedding, attn_distance=match.attn_distance,
                mlp_distance=match.mlp_distance, attn_route=match.attn_route, mlp_route=match.mlp_route,
                embedding_full=m1, embedding_routed=m2)

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    del rng, info
    terms = self.loss_terms(params, batch["image"], batch["label"])
    metrics = {k: terms[k] for k in ("pa_full", "pa_routed", "distill", "distill_embedding")}
    metrics["distill_layers"] = jnp.sum(terms["attn_distance"]) + jnp.sum(terms["mlp_distance"])
    for kind in ("attn", "mlp"):  # share of the tokens each sub-block receives, over all blocks
      routes = terms[f"{kind}_route"]
      for j in range(int(self.opts["num_sub_blocks"])):
        metrics[f"route_{kind}_{j}"] = jnp.mean((routes == j).astype(jnp.float32))
    return terms["loss"].astype(jnp.float32), (metrics, method_state)

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    """The full stream only (all sub-blocks summed; no routers): L2-normalised float32 [B, E]."""
    del method_state
    backbone = self._backbone(params["model"])
    return self._embedding(backbone, backbone.forward_features(self._images(images)))


def build(config: Any, num_classes: int) -> DFMLMethod:
  return DFMLMethod(config, num_classes=num_classes)
