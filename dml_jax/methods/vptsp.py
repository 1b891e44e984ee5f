"""VPTSP-G (Ren et al., ICLR 2024): visual prompt tuning of a frozen ViT with semantic proxies.

As the official code does (`Noahsark/ParameterEfficient-DML`; docs/methods/vptsp.md):

Sample tower (also the inference path), images [B, S, S, 3] -> e [B, E]:
  ViT with deep task prompts shared by all samples (block i gets the first max(N - i*step, 0) of its own
  prompts, their outputs are dropped after the block) -> final LayerNorm -> CLS -> fc_norm (LayerNorm,
  eps 1e-5) -> head (Linear D -> E, xavier-uniform) -> L2.
Proxy tower (training only), the same ViT on the same augmented images:
  class-specific prompts instead (sample b gets the first max(m - l*p_step, 0) prompts of its class y_b in
  block l < p_depth; no task prompts) -> final LN -> CLS -> its own fc_norm and head -> L2 -> p [B, E].
Semantic proxies: a persistent, gradient-free container S [C, E] (unit rows, method state). Per step, for
  the B/k classes U of the batch (k consecutive samples each), h = S[U] runs k steps of a GRU cell over
  the class's k proxy embeddings, S[U] <- h (with gradient inside the step), all rows L2-normalised; the
  loss uses all C proxies alpha*O + (1 - alpha)*S with O [C, E] a trainable bias (xavier/8, its own
  optimizer group, e.g. lr_proxy). -M (`semantic_mix='mix'`): S[U] <- lambda*S[U] + (1 - lambda)*mean_k(p).
Loss: Proxy-Anchor (alpha 32, delta 0.1) with the positive term divided by C, all classes
  (`pos_normalizer='all'`, the code's `both_all` mode; the paper's Eq. 2 divides by the classes present).
Trainable: prompts, both heads and LayerNorms, the GRU, O, and with BitFit every ViT bias (the code's
  `'bias' in name`). Every other ViT weight is frozen by the recipe's parameter groups (the rule
  'model/backbone/(?!.*bias$).*' frozen): the update step never forms its gradient.

The GRU cell is the code's `Simple_GRUCell` (`gru_relu`): one bias per gate and
  z = sigmoid(x W_iz + h W_hz + b_iz),  r = sigmoid(x W_ir + h W_hr + b_ir),
  n = relu(x W_in + r * (h W_hn) + b_in),  h' = (1 - z) * n + z * h,  then dropout(rnn_dropout) on h'.
(z keeps the old state, the reverse of the paper's Eq. 4-7; `semantic_mix='gru'` uses tanh for n. The
code's unused `W_ia` [E, 1] is left out.)

Class-prompt memory bank (`memory_bank=True`, SOP / In-Shop / iNaturalist): the C x n_l x D tables stay in
host memory with their optimizer moments (`host_state`, dml_jax/methods/row_sparse.py); params hold
per-layer buffers [B/k, n_l, D] filled with the batch's classes before each step and written back after
it, i.e. lazy row-sparse AdamW. Without it the tables are ordinary dense parameters (CUB, Cars), as in
the code.

Parameter paths (config.optim regexes): 'model/backbone/...' (timm names), 'model/task_prompts/<i>'
[n_i, D], 'model/fc_norm/{scale,bias}', 'model/head/{kernel,bias}', 'model/proxy_net/class_prompts/<l>'
[C, n_l, D] (or 'model/proxy_net/class_prompt_rows/<l>' [B/k, n_l, D] with the bank),
'model/proxy_net/{fc_norm,head}/...', 'model/proxy_net/gru/{W_iz,...,b_in}', 'model/proxy_bias' [C, E].
Prompt tables hold only the rows some block uses (the code allocates m per layer; the unused rows never
act); their init is the code's xavier-normal of the full (length, m, D) tensor, std sqrt(2 / ((m + length) D)).

Batches must come from the 'm_per_class' sampler: B/k distinct classes, each class's k images contiguous.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dml_jax import losses
from dml_jax.errors import InvalidValueError
from dml_jax.losses.ops import l2_normalize
from dml_jax.methods import modeling
from dml_jax.methods.base import HostBatch, Method, StepInfo
from dml_jax.methods.row_sparse import HostRowTable, RowSparseTables

SEMANTIC_MIX_TYPES = ("gru_relu", "gru", "mix")


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'vptsp' (the official params.py defaults where it has them)."""
  return ml_collections.ConfigDict(dict(
      name="vptsp",
      num_prompts=10,  # N, task prompts per block
      prompt_depth=12,  # blocks with task prompts
      prompt_block_step=0,  # block i gets max(N - i * step, 0)
      num_class_prompts=3,  # m, class prompts per block
      class_prompt_depth=12,
      class_prompt_block_step=0,
      semantic_mix="gru_relu",  # 'gru_relu' (VPTSP-G), 'gru' (tanh candidate), 'mix' (EMA, VPTSP-M)
      mix_keep_ratio=0.8,  # lambda of the EMA variant
      proxy_bias_ratio=0.5,  # alpha: proxies = alpha * O + (1 - alpha) * S
      rnn_dropout=0.0,
      memory_bank=False,  # class-prompt tables in host memory, lazy row updates
      # Proxy-Anchor as the code's `both_all` mode: the positive term divided by all C classes;
      # pos_normalizer='present' is the paper's Eq. 2 (an opt-in fix).
      loss=ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1, pos_normalizer="all")),
  ))
_LN_EPS = 1e-5  # torch nn.LayerNorm default, the new fc_norm / p_fc_norm
_XAVIER = nnx.initializers.xavier_uniform()


def normalize(x: jax.Array) -> jax.Array:
  """torch F.normalize over the last axis, as the code: x / max(|x|, 1e-12)."""
  return l2_normalize(x, clamp_norm=True)


def prompt_counts(num_prompts: int, depth: int, block_step: int, num_blocks: int) -> list[int]:
  """Prompts per block, max(N - i * step, 0) for i < depth, trailing zeros dropped (n is non-increasing)."""
  if depth > num_blocks or depth < 0:
    raise ValueError(f"prompt depth {depth} must lie in [0, {num_blocks}] (the ViT's blocks)")
  counts = [max(num_prompts - i * block_step, 0) for i in range(depth)]
  while counts and counts[-1] == 0:
    counts.pop()
  return counts


def prompt_init_std(length: int, num_prompts: int, dim: int) -> float:
  """torch xavier_normal_ on a (length, num_prompts, dim) tensor: fan_in = num*dim, fan_out = length*dim."""
  return math.sqrt(2.0 / ((num_prompts + length) * dim))


class SimpleGRUCell(nnx.Module):
  """The code's GRU cell (one bias per gate, xavier-uniform kernels, zero biases); see the module doc.

  Call: x float [R, E], h float [R, E] -> h' [R, E] (no dropout here).
  """

  def __init__(self, dim: int, *, candidate: str = "relu", rngs: nnx.Rngs):
    if candidate not in ("relu", "tanh"):
      raise ValueError(f"GRU candidate must be 'relu' or 'tanh', got {candidate!r}")
    self.candidate = candidate
    for gate in ("r", "z", "n"):
      setattr(self, f"W_i{gate}", nnx.Param(_XAVIER(rngs.params(), (dim, dim))))
      setattr(self, f"W_h{gate}", nnx.Param(_XAVIER(rngs.params(), (dim, dim))))
      setattr(self, f"b_i{gate}", nnx.Param(jnp.zeros((dim,))))

  def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    z = jax.nn.sigmoid(jnp.dot(x, self.W_iz[...], precision=hp) + jnp.dot(h, self.W_hz[...], precision=hp)
                       + self.b_iz[...])
    r = jax.nn.sigmoid(jnp.dot(x, self.W_ir[...], precision=hp) + jnp.dot(h, self.W_hr[...], precision=hp)
                       + self.b_ir[...])
    pre = jnp.dot(x, self.W_in[...], precision=hp) + r * jnp.dot(h, self.W_hn[...], precision=hp) + self.b_in[...]
    n = jax.nn.relu(pre) if self.candidate == "relu" else jnp.tanh(pre)
    return (1.0 - z) * n + z * h


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_fast_variance=False, rngs=rngs)


def _head(dim: int, embedding_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(dim, embedding_dim, kernel_init=_XAVIER, bias_init=nnx.initializers.zeros, rngs=rngs)


def _prompt_params(key: jax.Array, length: int, counts: list[int], num_prompts: int, dim: int) -> nnx.List:
  std = prompt_init_std(length, num_prompts, dim)
  keys = jax.random.split(key, max(len(counts), 1))
  shape = (lambda n: (n, dim)) if length == 1 else (lambda n: (length, n, dim))
  return nnx.List([nnx.Param(std * jax.random.normal(k, shape(n), jnp.float32)) for k, n in zip(keys, counts)])


class ProxyNet(nnx.Module):
  """Class prompts (dense tables [C, n_l, D], or per-batch buffers [R, n_l, D] with the bank), p_fc_norm,
  p_head and the GRU (absent for the EMA variant)."""

  def __init__(self, *, dim: int, embedding_dim: int, num_classes: int, counts: list[int], num_prompts: int,
               batch_rows: int | None, semantic_mix: str, rngs: nnx.Rngs):
    if batch_rows is None:
      self.class_prompts = _prompt_params(rngs.params(), num_classes, counts, num_prompts, dim)
    else:  # filled from the host tables before every step
      self.class_prompt_rows = nnx.List([nnx.Param(jnp.zeros((batch_rows, n, dim))) for n in counts])
    self.fc_norm = _layer_norm(dim, rngs)
    self.head = _head(dim, embedding_dim, rngs)
    self.gru = (SimpleGRUCell(embedding_dim, candidate="relu" if semantic_mix == "gru_relu" else "tanh", rngs=rngs)
                if semantic_mix != "mix" else None)


class VPTSPNet(nnx.Module):
  """Task prompts + fc_norm + head (sample tower), ProxyNet (proxy tower), proxy bias O; `backbone` (the
  frozen ViT) is attached after construction, so that the rest can be built in one compiled call."""

  def __init__(self, *, dim: int, embedding_dim: int, num_classes: int, task_counts: list[int], num_prompts: int,
               class_counts: list[int], num_class_prompts: int, batch_rows: int | None, semantic_mix: str,
               rngs: nnx.Rngs):
    self.task_prompts = _prompt_params(rngs.params(), 1, task_counts, num_prompts, dim)
    self.fc_norm = _layer_norm(dim, rngs)
    self.head = _head(dim, embedding_dim, rngs)
    self.proxy_net = ProxyNet(dim=dim, embedding_dim=embedding_dim, num_classes=num_classes, counts=class_counts,
                              num_prompts=num_class_prompts, batch_rows=batch_rows, semantic_mix=semantic_mix,
                              rngs=rngs)
    # xavier_uniform(C x E) / 8: bound sqrt(6 / (C + E)) / 8, rows of norm ~0.1-0.2 at the start.
    self.proxy_bias = nnx.Param(_XAVIER(rngs.params(), (num_classes, embedding_dim)) / 8.0)


# The prompt/head init runs as one compiled call (eagerly every parameter shape compiles on its own),
# cached so that methods built again with the same shapes (tests, a second run in a process) reuse it.
@functools.cache
def _net_fn(**kwargs):
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
  return nnx.jit(lambda key: VPTSPNet(**kwargs, rngs=nnx.Rngs(key)))


@functools.partial(jax.jit, static_argnums=1)
def _semantic_init(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """S: xavier-uniform rows, L2-normalised (the code's proxies_container)."""
  return normalize(_XAVIER(key, shape))


def _check_options(o: Any) -> None:
  if o.semantic_mix not in SEMANTIC_MIX_TYPES:
    raise InvalidValueError(f"config.method.semantic_mix must be one of {SEMANTIC_MIX_TYPES}, got {o.semantic_mix!r}")
  if not 0.0 <= o.rnn_dropout < 1.0:
    raise InvalidValueError(f"config.method.rnn_dropout must lie in [0, 1), got {o.rnn_dropout}")


class VPTSPMethod(Method):
  """VPTSP-G / -M behind the Method interface; see the module docstring."""

  name = "vptsp"

  def __init__(self, config: Any, *, num_classes: int):
    self.config = config
    _check_options(config.method)
    self.opts = dict(config.method)
    self.num_classes = int(num_classes)
    m, d = config.model, config.data
    if d.sampler != "m_per_class":
      raise ValueError(f"vptsp needs config.data.sampler='m_per_class' (B/k distinct classes, each class's k "
                       f"images contiguous; the GRU and the memory bank rely on it), got {d.sampler!r}")
    self.samples_per_class = int(d.samples_per_class)
    if d.batch_size % self.samples_per_class:
      raise ValueError(f"config.data.batch_size {d.batch_size} is not a multiple of samples_per_class "
                       f"{self.samples_per_class}")
    self.rows_per_batch = d.batch_size // self.samples_per_class
    self.loss_hparams = dict(config.method.loss)
    self.embedding_dim = int(m.embedding_dim)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.task_counts: list[int] = []
    self.class_counts: list[int] = []
    self.model: modeling.SplitModel | None = None
    self._host: RowSparseTables | None = None

  # -- model ------------------------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    m, o = self.config.model, self.opts
    backbone_rng, net_rng, state_rng = jax.random.split(rng, 3)
    backbone = modeling.build_backbone(m, backbone_rng, self.config.dataset.image_size)
    self.pretrained_cfg = backbone.pretrained_cfg
    blocks = len(backbone.blocks)
    self.task_counts = prompt_counts(o["num_prompts"], o["prompt_depth"], o["prompt_block_step"], blocks)
    self.class_counts = prompt_counts(o["num_class_prompts"], o["class_prompt_depth"],
                                      o["class_prompt_block_step"], blocks)
    self.dim = backbone.embed_dim
    net = _net_fn(dim=self.dim, embedding_dim=self.embedding_dim, num_classes=self.num_classes,
                  task_counts=tuple(self.task_counts), num_prompts=o["num_prompts"],
                  class_counts=tuple(self.class_counts), num_class_prompts=o["num_class_prompts"],
                  batch_rows=self.rows_per_batch if o["memory_bank"] else None,
                  semantic_mix=o["semantic_mix"])(net_rng)
    net.backbone = backbone
    self.model = modeling.SplitModel(net)
    params = {"model": self.model.params}
    if o["memory_bank"]:
      self._host = RowSparseTables(self._host_tables(), params, self.batch_rows, seed=self.config.seed)
    semantic = _semantic_init(state_rng, (self.num_classes, self.embedding_dim))
    return params, {"semantic_proxies": semantic}

  def _net(self, model_params: Any) -> VPTSPNet:
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    dtype = self.compute_dtype
    if dtype is not None:  # the ViT and its prompts in the compute dtype; heads, GRU and proxies in float32
      proxy_net = dict(model_params["proxy_net"])
      for key in ("class_prompts", "class_prompt_rows"):
        if key in proxy_net:
          proxy_net[key] = modeling.cast_floating(proxy_net[key], dtype)
      model_params = {**model_params, "backbone": modeling.cast_floating(model_params["backbone"], dtype),
                      "task_prompts": modeling.cast_floating(model_params["task_prompts"], dtype),
                      "proxy_net": proxy_net}
    return self.model.merge(model_params, self.model.other, train=True)

  def _cls_features(self, net: VPTSPNet, tokens: jax.Array, prompts: dict[int, jax.Array]) -> jax.Array:
    vit = net.backbone
    return vit.pool(vit.norm(vit.forward_blocks(tokens, prompts))).astype(jnp.float32)

  def sample_embeddings(self, net: VPTSPNet, tokens: jax.Array) -> jax.Array:
    """Sample tower from embedded tokens [B, N, D] -> unit embeddings float32 [B, E]."""
    prompts = {i: p[...] for i, p in enumerate(net.task_prompts)}  # [n_i, D], shared by the batch
    return normalize(net.head(net.fc_norm(self._cls_features(net, tokens, prompts))))

  def proxy_embeddings(self, net: VPTSPNet, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    """Proxy tower: class prompts of each sample's class -> unit embeddings float32 [B, E]."""
    pn = net.proxy_net
    if self.opts["memory_bank"]:
      # Buffer row j holds class U[j]; sample b is the (b // k)-th class of the batch.
      prompts = {i: jnp.repeat(p[...], self.samples_per_class, axis=0) for i, p in enumerate(pn.class_prompt_rows)}
    else:
      prompts = {i: p[...][labels] for i, p in enumerate(pn.class_prompts)}
    return normalize(pn.head(pn.fc_norm(self._cls_features(net, tokens, prompts))))

  def update_semantic_proxies(self, net: VPTSPNet, semantic: jax.Array, proxy_emb: jax.Array, labels: jax.Array,
                              rng: jax.Array) -> jax.Array:
    """New S [C, E] (unit rows): S[U] replaced by the GRU (or EMA) output with gradient, then normalised.

    semantic: float32 [C, E], the stored container (constant).  proxy_emb: float32 [B, E].
    """
    k = self.samples_per_class
    rows = labels.shape[0] // k
    per_class = proxy_emb.reshape(rows, k, -1)  # class j's samples are rows j*k .. j*k + k - 1
    classes = labels[::k]
    h = jax.lax.stop_gradient(semantic)[classes]
    if self.opts["semantic_mix"] == "mix":
      # The code averages `stack([p[i::k] for i in range(k)])` over i: with k consecutive samples per
      # class that is each class's mean (a bug for other layouts, not for this one).
      keep = self.opts["mix_keep_ratio"]
      h = keep * h + (1.0 - keep) * jnp.mean(per_class, axis=1)
    else:
      drop = self.opts["rnn_dropout"]
      for j, key in enumerate(jax.random.split(rng, k)):
        h = net.proxy_net.gru(per_class[:, j], h)
        if drop > 0:  # torch nn.Dropout in training mode: inverted scaling
          h = jnp.where(jax.random.bernoulli(key, 1.0 - drop, h.shape), h / (1.0 - drop), 0.0)
    return normalize(jax.lax.stop_gradient(semantic).at[classes].set(h))

  # -- Method interface -----------------------------------------------------------------------------

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    del info
    labels = batch["label"]
    if labels.shape[0] != self.rows_per_batch * self.samples_per_class:
      raise ValueError(f"vptsp was built for batches of {self.rows_per_batch * self.samples_per_class}, got "
                       f"{labels.shape[0]}")
    net = self._net(params["model"])
    tokens = net.backbone.embed(batch["image"])  # the patch embedding is shared by both towers
    emb = self.sample_embeddings(net, tokens)
    proxy_emb = self.proxy_embeddings(net, tokens, labels)
    semantic = self.update_semantic_proxies(net, method_state["semantic_proxies"], proxy_emb, labels, rng)
    alpha = self.opts["proxy_bias_ratio"]
    bias = net.proxy_bias[...]
    proxies = alpha * bias + (1.0 - alpha) * semantic
    loss = losses.proxy_anchor_loss(emb, labels, proxies, **self.loss_hparams)
    metrics = {"proxy_bias_norm": jnp.mean(jnp.linalg.norm(bias, axis=-1))}
    return loss.astype(jnp.float32), (metrics, {**method_state, "semantic_proxies": jax.lax.stop_gradient(semantic)})

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    del method_state
    net = self._net(params["model"])
    return self.sample_embeddings(net, net.backbone.embed(images))

  def host_state(self) -> RowSparseTables | None:
    return self._host

  def _host_tables(self) -> dict[str, HostRowTable]:
    """With the memory bank: one host table [C, n_l, D] per class-prompt layer."""
    std = prompt_init_std(self.num_classes, self.opts["num_class_prompts"], self.dim)
    shape_of = {layer: (n, self.dim) for layer, n in enumerate(self.class_counts)}

    def init(rng: np.random.Generator, shape):
      return (std * rng.standard_normal((self.num_classes,) + shape, dtype=np.float32)).astype(np.float32)

    return {f"class_prompts_{layer:02d}": HostRowTable(f"model/proxy_net/class_prompt_rows/{layer}",
                                                       self.num_classes, shape, functools.partial(init, shape=shape))
            for layer, shape in shape_of.items()}

  def batch_rows(self, batch: HostBatch) -> np.ndarray:
    """The batch's classes in order (int [B/k]); checks the sampler's layout (k contiguous per class)."""
    labels = np.asarray(batch.label)
    k = self.samples_per_class
    if labels.ndim != 1 or labels.shape[0] % k:
      raise ValueError(f"labels of shape {labels.shape} do not form groups of samples_per_class={k}")
    groups = labels.reshape(-1, k)
    if not np.all(groups == groups[:, :1]):
      raise ValueError(f"batch labels are not {k} contiguous samples per class (got {labels.tolist()}); VPTSP "
                       f"needs config.data.sampler='m_per_class'")
    return groups[:, 0].copy()


def build(config: Any, num_classes: int) -> VPTSPMethod:
  return VPTSPMethod(config, num_classes=num_classes)
