"""Proxy-ISA (Li et al., "Informative Sample-Aware Proxy for Deep Metric Learning", MMAsia 2022), as the
authors' code runs it (`rioyokotalab/ProxyISA`: code/losses.py, code/memory.py, code/train.py;
docs/methods/proxy_isa.md).

Model: the Proxy-Anchor code base's networks (`metric_loss.build_embedding_model`): BN-Inception with
global average pooling only (`head='linear'`: the backbone's pooled output -> Linear(512)), ResNet-50 with
GAP + GMP summed (`head='gap_gmp_linear'`), then L2. Proxies [C, E] ~ N(0, 2 / C) ('loss/proxies').

Objective: the Proxy-ISA loss (dml_jax/losses/proxy_isa.py) with per-class state that changes without a
gradient, all of it in `method_state` on the device (fixed shapes, checkpointed with the run):

  classes/count       int32 [C]    n_c, samples seen (outliers excluded); E_c is a float64 table of n_c
  classes/similarity  float32 [C]  S_c, init 1.0 (the code stores it in float64, but its values are the
                                   float32 results of a float32 mean, so float32 holds them exactly)
  memory/features     float32 [T, E]  detached embeddings, zeros at first
  memory/labels       int32 [T]       their labels, zeros at first
  memory/pointer      int32 []        the code's write pointer
  memory/size         int32 []        rows written so far, capped at T (the ring buffer's fill)

One step (switches by epoch, `step_variant`: the memory from `start_epoch`, the outlier filter from
`start_epoch + 1`):
  1. loss and gradients from the state before the step (pair weights and normalisers are constants);
  2. with the filter on, a sample whose positive similarity lies below its class's threshold O is an
     outlier: it stays in the loss but is neither counted nor stored;
  3. n_c += the class's kept samples (every step, memory or not);
  4. with the memory on: the kept samples are enqueued (in batch order), then for every class of the batch
     with at least one readable memory row, S_c = h * mean over those rows of cos(p_c, f) with the proxies
     of the start of the step.

Memory queue (the code's `CrossBatchMemory`), T rows: q rows go to [pointer, pointer + q) and the pointer
advances; if pointer + q > T they go to the LAST q rows instead and the pointer returns to 0 (rows between
are left stale). The buffer counts as full when the label in its last row is not 0, and then all T rows are
read; otherwise only the first `pointer` rows. So a full buffer whose last row holds class 0 reads as not
full, and right after a wrap that read is empty. `ring_buffer=True` (an opt-in fix) writes modulo T and
reads the rows written so far.

Where the code crashes, this port defines:
  * every sample of a batch is an outlier (the code indexes with an empty float tensor): the step enqueues
    nothing, counts nothing, and recomputes S from the memory as it stands (an empty enqueue);
  * `torch.exp(-tau)` on a float (a TypeError on the first call): e^-tau in double precision.
The code's quirks kept: S of a class stays 1.0 until it appears in a batch after the memory starts; the
negative weights act from the first step; outliers stay in the loss with weight w; the released `train.py`
cannot run ResNet-50 (it reads `model.embedding`), which is trained here as its network file defines it.

Precision: see dml_jax/losses/proxy_isa.py (float64 where the code keeps E, a local x64 scope for the
thresholds, float32 elsewhere, as the code). S is a float32 mean times float32(h), as the code's
`.mean() * h`, but the memory rows of a class are summed before meeting the proxy (the code averages per-row
dot products), so S agrees with the code to float32 rounding, not bit for bit. Why the state is on the device
and not in a host-side float64 `HostState`: n is an integer and S a float32 value, so int32 / float32 hold them
exactly, and the float64 arithmetic the code does on them is either a function of n alone (tabulated once in
double precision) or the threshold O (a few float64 operations in a local x64 scope inside the step). A host
state would have to wait for every step's new S before it could prepare the next step's weights: a
device-to-host round trip per step that would also keep the next batch's transfer from overlapping the step.

Cost per step beyond Proxy-Anchor: the [B, C] weights, a [T, E] segment sum of the readable memory rows into
[C, E], a dot product per class and a [B, E] scatter into the memory (in place when the state is donated);
nothing loops over classes. On GPUs the segment sum is a scatter-add whose order of summation may vary between
runs (`--xla_gpu_deterministic_ops` fixes it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dml_jax import losses
from dml_jax.errors import InvalidValueError, unknown_name
from dml_jax.losses import proxy_isa as isa_loss
from dml_jax.losses.ops import l2_normalize
from dml_jax.methods import metric_loss, modeling
from dml_jax.methods.base import Method, StepInfo


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'proxy_isa' (the code's defaults; the CLI flag each value comes from in brackets)."""
  return ml_collections.ConfigDict(config_defaults())


def config_defaults() -> dict[str, Any]:
  return dict(
      name="proxy_isa",
      head="linear",  # metric_loss.HEADS: 'linear' = GAP -> Linear on BN-Inception, 'gap_gmp_linear' for ResNet
      bn_freeze=True,  # BN statistics frozen in training [--bn_freeze: type=bool, so 'False' parses as True]
      alpha=32.0,  # scale (the loss's default; train.py never passes --alpha)
      margin=0.1,  # delta (likewise, --mrg is not passed)
      volume=100.0,  # V [--V]: beta = (V - 1) / V
      eta_scale=0.9,  # k [--k]: README sets 0.4 for Cars, 0.1 for In-Shop
      eta_margin=0.1,  # lambda [--lam]
      hardness_scale=0.15,  # h (constructor default)
      tau=1.5,  # (constructor default)
      memory_size=55000,  # T [--T]
      start_epoch=2,  # memory from this epoch, outlier filter from the next [--start_epoch]
      ring_buffer=False,  # True: a true ring buffer (the code writes overflow into the last rows)
  )


# -- the memory queue ------------------------------------------------------------------------------------


def init_memory(capacity: int, dim: int) -> dict[str, jax.Array]:
  """An empty queue: features float32 [T, E] and labels int32 [T] zero, pointer and size int32 0."""
  return {"features": jnp.zeros((capacity, dim), jnp.float32), "labels": jnp.zeros((capacity,), jnp.int32),
          "pointer": jnp.zeros((), jnp.int32), "size": jnp.zeros((), jnp.int32)}


def enqueue(memory: dict, features: jax.Array, labels: jax.Array, keep: jax.Array, *,
            ring_buffer: bool = False) -> dict:
  """Writes the rows of `features` [B, E] / `labels` [B] where `keep` (bool [B]) is True, in batch order.

  The code's semantics (module docstring), or a true ring buffer. Needs B <= T (the code fails otherwise).
  """
  capacity = memory["labels"].shape[0]
  if features.shape[0] > capacity:
    raise InvalidValueError(f"proxy_isa: a batch of {features.shape[0]} does not fit a memory of {capacity} rows",
                            "raise config.method.memory_size")
  pointer = memory["pointer"]
  count = jnp.sum(keep, dtype=jnp.int32)
  rank = jnp.cumsum(keep, dtype=jnp.int32) - 1  # position among the kept rows
  if ring_buffer:
    slots = (pointer + rank) % capacity
    new_pointer = (pointer + count) % capacity
  else:
    overflow = pointer + count > capacity
    slots = jnp.where(overflow, capacity - count, pointer) + rank
    new_pointer = jnp.where(overflow, 0, pointer + count)
  slots = jnp.where(keep, slots, capacity)  # out of range: dropped
  return {"features": memory["features"].at[slots].set(features.astype(jnp.float32), mode="drop"),
          "labels": memory["labels"].at[slots].set(labels.astype(jnp.int32), mode="drop"),
          "pointer": new_pointer.astype(jnp.int32),
          "size": jnp.minimum(memory["size"] + count, capacity).astype(jnp.int32)}


def readable_rows(memory: dict, *, ring_buffer: bool = False) -> jax.Array:
  """bool [T]: the rows a read returns. The code: all if the last row's label is not 0, else [0, pointer)."""
  capacity = memory["labels"].shape[0]
  rows = jnp.arange(capacity, dtype=jnp.int32)
  if ring_buffer:
    return rows < memory["size"]
  return (memory["labels"][capacity - 1] != 0) | (rows < memory["pointer"])


def memory_similarity(memory: dict, readable: jax.Array, normalized_proxies: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """Per class c: mean over readable rows of class c of cos(p_c, f), and their number.

  normalized_proxies: float32 [C, E]. Returns (float32 [C], 0 where a class has no row; int32 [C]).
  The code averages the rows' dot products; here the rows are summed per class first and the sum meets the
  proxy once (equal up to float32 rounding, and a [T, E] segment sum instead of gathering a proxy per row).
  """
  num_classes = normalized_proxies.shape[0]
  segments = jnp.where(readable, memory["labels"], num_classes)  # unreadable rows: out of range, dropped
  sums = jax.ops.segment_sum(memory["features"], segments, num_segments=num_classes)  # [C, E]
  counts = jax.ops.segment_sum(jnp.ones_like(segments), segments, num_segments=num_classes)
  dots = jnp.sum(sums * normalized_proxies, axis=-1)
  return dots / jnp.maximum(counts, 1).astype(jnp.float32), counts


# -- one step of the loss and its state ----------------------------------------------------------------


class ISASettings(NamedTuple):
  """The loss's constants (from config.method) and the count tables built from them."""

  alpha: float
  margin: float
  eta_scale: float
  eta_margin: float
  hardness_scale: float
  ring_buffer: bool
  tables: isa_loss.CountTables

  @classmethod
  def from_config(cls, o: Any) -> ISASettings:
    return cls(alpha=float(o.alpha), margin=float(o.margin), eta_scale=float(o.eta_scale),
               eta_margin=float(o.eta_margin), hardness_scale=float(o.hardness_scale),
               ring_buffer=bool(o.ring_buffer), tables=isa_loss.count_tables(float(o.volume), float(o.tau)))


def isa_step(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, classes: dict, memory: dict,
             settings: ISASettings, *, memory_on: bool, filter_on: bool
             ) -> tuple[jax.Array, tuple[dict, dict, dict]]:
  """The loss of a batch and the per-class state and memory after it (module docstring, steps 1-4).

  Args:
    embeddings: float32 [B, E], the model's L2-normalised output.  labels: int32 [B].
    proxies: float32 [C, E] (raw; normalised here).
    classes: {'count': int32 [C], 'similarity': float32 [C]}.  memory: see `init_memory`.
    memory_on, filter_on: static switches (`ProxyISAMethod.step_variant`).

  Returns:
    (loss float32 [], (metrics {name: float32 []}, new classes, new memory)); only the loss has a gradient.
  """
  weights = isa_loss.class_weights(classes["count"], classes["similarity"], settings.tables,
                                   eta_scale=settings.eta_scale, eta_margin=settings.eta_margin)
  loss, aux = isa_loss.proxy_isa_loss(embeddings, labels, proxies, weights, alpha=settings.alpha,
                                      margin=settings.margin, filter_on=filter_on)
  num_classes = proxies.shape[0]
  keep = ~aux.outlier
  kept_counts = jax.ops.segment_sum(keep.astype(jnp.int32), labels, num_segments=num_classes)
  new_classes = {"count": classes["count"] + kept_counts, "similarity": classes["similarity"]}
  readable_count = jnp.zeros((), jnp.int32)
  if memory_on:
    memory = enqueue(memory, jax.lax.stop_gradient(embeddings), labels, keep, ring_buffer=settings.ring_buffer)
    readable = readable_rows(memory, ring_buffer=settings.ring_buffer)
    # The proxies of the start of the step (the optimizer has not moved them yet), without gradient.
    mean_cos, rows = memory_similarity(memory, readable, jax.lax.stop_gradient(l2_normalize(proxies)))
    learned = mean_cos * np.float32(settings.hardness_scale)  # float32, as the code's `.mean() * h`
    new_classes["similarity"] = jnp.where(aux.present & (rows > 0), learned, classes["similarity"])
    readable_count = jnp.sum(readable, dtype=jnp.int32)
  metrics = {"isa/outliers": jnp.sum(aux.outlier).astype(jnp.float32),
             "isa/memory_rows": readable_count.astype(jnp.float32),
             "isa/pos_weight_sum": aux.pos_weight_sum, "isa/neg_weight_sum": aux.neg_weight_sum}
  return loss, (metrics, new_classes, memory)


# -- the method -----------------------------------------------------------------------------------------


class ProxyISAMethod(Method):
  """Backbone + head + L2, Proxy-ISA loss with its class state and memory; see the module docstring."""

  name = "proxy_isa"

  def __init__(self, config: Any, *, num_classes: int):
    o = config.method
    if o.head not in metric_loss.HEADS:
      raise unknown_name("head (config.method.head)", o.head, metric_loss.HEADS, cls=InvalidValueError)
    if num_classes < 2:
      raise InvalidValueError(f"proxy_isa needs at least 2 training classes (for negatives), got {num_classes}")
    if int(o.memory_size) < int(config.data.batch_size):
      raise InvalidValueError(f"config.method.memory_size={o.memory_size} cannot hold a batch of "
                              f"{config.data.batch_size} (the code's overflow write fails then)",
                              f"e.g. --config.method.memory_size={max(int(config.data.batch_size), 55000)}")
    if int(o.start_epoch) < 0:
      raise InvalidValueError(f"config.method.start_epoch must be >= 0, got {o.start_epoch}",
                              "e.g. --config.method.start_epoch=2")
    for key in ("alpha", "volume", "hardness_scale"):
      if not float(o[key]) > (1.0 if key == "volume" else 0.0):
        raise InvalidValueError(f"config.method.{key} must be > {1 if key == 'volume' else 0}, got {o[key]!r}",
                                f"e.g. --config.method.{key}={config_defaults()[key]}")
    self.config = config
    self.num_classes = int(num_classes)
    self.head = o.head
    self.bn_freeze = bool(o.bn_freeze)
    self.memory_size = int(o.memory_size)
    self.start_epoch = int(o.start_epoch)
    self.settings = ISASettings.from_config(o)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.model: modeling.SplitModel | None = None
    self._batchnorm: set[str] = set()

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    backbone_rng, head_rng, proxy_rng = jax.random.split(rng, 3)
    net = metric_loss.build_embedding_model(self.config, head=self.head, bn_freeze=self.bn_freeze,
                                            backbone_rng=backbone_rng, head_rng=head_rng)
    self.model, self.embedding_dim = net.model, net.embedding_dim
    self.pretrained_cfg, self._batchnorm = net.pretrained_cfg, net.batchnorm_paths
    # Proxy-Anchor's proxies (N(0, 2 / C)), drawn as the baseline draws them: with every pair weight 1 this
    # method is the metric_loss Proxy-Anchor run, initialisation included.
    proxies = losses.init_loss_params("proxy_anchor", proxy_rng, num_classes=self.num_classes,
                                      embedding_dim=self.embedding_dim)["proxies"]
    classes = {"count": jnp.zeros((self.num_classes,), jnp.int32),
               "similarity": jnp.ones((self.num_classes,), jnp.float32)}
    state = {"model": self.model.other, "classes": classes,
             "memory": init_memory(self.memory_size, self.embedding_dim)}
    return {"model": self.model.params, "loss": {"proxies": proxies}}, state

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    del params
    return {"batchnorm": set(self._batchnorm)}

  def step_variant(self, epoch: int) -> tuple[bool, bool]:
    """(memory on, filter on): the code switches them on at `start_epoch` and `start_epoch + 1`."""
    return epoch >= self.start_epoch, epoch >= self.start_epoch + 1

  def _embed(self, params: dict, method_state: dict, images: jax.Array, train: bool) -> tuple[jax.Array, Any]:
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    return metric_loss.embed_images(self.model, self.compute_dtype, params["model"], method_state["model"], images,
                                    train=train)

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    del rng
    memory_on, filter_on = info.variant if info.variant is not None else (False, False)
    emb, model_state = self._embed(params, method_state, batch["image"], train=True)
    loss, (metrics, classes, memory) = isa_step(
        emb, batch["label"], params["loss"]["proxies"], method_state["classes"], method_state["memory"],
        self.settings, memory_on=memory_on, filter_on=filter_on)
    new_state = {**method_state, "model": model_state, "classes": classes, "memory": memory}
    return loss.astype(jnp.float32), (metrics, new_state)

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    emb, _ = self._embed(params, method_state, images, train=False)
    return emb


def build(config: Any, num_classes: int) -> ProxyISAMethod:
  return ProxyISAMethod(config, num_classes=num_classes)
