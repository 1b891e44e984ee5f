"""Factorized ViT / DeiT with per-token routers (DFML, Wang et al., CVPR 2023), timm semantics.

Every block of a ViT is split into G sub-blocks (G = 3 for DFML) that share the block's LayerNorms:

  attention sub-block j = heads [j*H/G, (j+1)*H/G) with their own q/k/v and their own output projection
                          (the rows of the full projection that read those heads); full attention = sum_j.
  MLP sub-block j       = hidden units [j*M/G, (j+1)*M/G): fc1 rows -> exact GELU -> fc2 columns; full MLP = sum_j.

The output biases of the projection and of fc2 are split evenly (b / G per sub-block), so the sum of all
sub-blocks is the original block: a factorized pretrained DeiT *is* the pretrained DeiT. Patch embedding,
tokens, position embedding, the block norms and the final norm are shared.

Two routers per block, Linear(D -> G) without bias, applied to every token:
  `attn/gate` reads the normalised tokens norm1(x) and picks the attention sub-block;
  `gate` reads the un-normalised residual stream after attention and picks the MLP sub-block.
Routing is straight-through top-1: r = stop_grad(one_hot(argmax p) - p) + p with p = softmax(logits), so the
forward value is one-hot and the gradient is the softmax's (no noise, no temperature, no capacity limit).
Routers are initialised N(0, 0.02^2) (timm's trunc_normal_ with its absolute +-2 bounds, i.e. ~100 std).

Parameter paths keep timm's names with a leading sub-block axis on the factorized tensors:
  blocks/i/attn/qkv/{kernel [G, D, 3*D/G], bias [G, 3*D/G]}   per sub-block [q; k; v], head-major
  blocks/i/attn/proj/{kernel [G, D/G, D], bias [G, D]}
  blocks/i/attn/gate/kernel [D, G]
  blocks/i/mlp/fc1/{kernel [G, D, M/G], bias [G, M/G]},  blocks/i/mlp/fc2/{kernel [G, M/G, D], bias [G, D]}
  blocks/i/gate/kernel [D, G]
and everything else exactly as dml_jax.backbones.vit (patch_embed, cls_token, dist_token, pos_embed,
blocks/i/norm1, blocks/i/norm2, norm). `factorize_vit_params` turns a converted plain ViT / DeiT weights
directory into these tensors (the authors' `convert.py` re-layout); `create` does it when loading.

Token streams are kept as [B*N, D] between the matmuls of a block (only attention reshapes to [B, N, H, hd]),
and all G sub-blocks are computed densely, as one matmul each for qkv, proj, fc1 and fc2: a routed token
multiplies the sub-block outputs by its one-hot weights instead of gathering per-token weights.

Forward passes:
  model(images) / forward_features     the full network (all sub-blocks summed): evaluation.
  model.forward_two_stream(images)     DFML's training forward: the full ("ori") stream and the routed stream
                                       side by side, plus the per-layer matching distances (see the method).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.backbones import vit
from dml_jax.backbones.registry import get_entry, get_pretrained_cfg
from dml_jax.backbones.weights import model_shapes, read_weights_dir, strict_update
from dml_jax.errors import InvalidValueError
from dml_jax.preprocessing import PretrainedCfg

ROUTER_INIT_STD = 0.02
_FACTORIZED = re.compile(r"blocks/(\d+)/(attn/qkv|attn/proj|mlp/fc1|mlp/fc2)/(kernel|bias)")
GATE_PATH = re.compile(r"blocks/\d+/(attn/)?gate/kernel")


def straight_through_top1(logits: jax.Array) -> jax.Array:
  """One-hot forward, softmax backward: stop_grad(one_hot(argmax p) - p) + p, p = softmax(logits).

  Args:
    logits: float [..., G].
  Returns:
    float [..., G] (logits' dtype): exactly one-hot up to the rounding of (1 - p) + p, as the authors' torch
    expression; d out / d logits = the softmax Jacobian. Ties pick the first sub-block (torch and jnp argmax).
  """
  soft = jax.nn.softmax(logits, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return jax.lax.stop_gradient(hard - soft) + soft


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm over `axis` whose gradient is 0 (not NaN, as torch's sqrt) where x is exactly 0.

  The value equals sqrt(sum(x^2)) everywhere: nothing is added inside the square root.
  """
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def split_input(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """One input to every sub-block: x [T, I] -> [T, G, O] with kernel [G, I, O], bias [G, O] (one matmul)."""
  y = jnp.einsum("ti,gio->tgo", x, kernel.astype(x.dtype))
  return y if bias is None else y + bias.astype(x.dtype)


def merge_outputs(x: jax.Array, kernel: jax.Array, bias: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Sub-block outputs, weighted per token and summed: sum_g w[t, g] (x[t, g] @ kernel[g] + bias[g]).

  Written as (x * w) @ kernel + w @ bias, one matmul whatever the routing (w one-hot: the chosen sub-block;
  w None: all sub-blocks summed, the full layer).

  Args:
    x: [T, G, I].  kernel: [G, I, O].  bias: [G, O].  weights: float [T, G] or None.
  Returns:
    [T, O] in x's dtype.
  """
  kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
  if weights is None:
    return jnp.einsum("tgi,gio->to", x, kernel) + jnp.sum(bias, axis=0)
  weights = weights.astype(x.dtype)
  return jnp.einsum("tgi,gio->to", x * weights[:, :, None], kernel) + weights @ bias


def _trunc_init(key, shape, dtype):
  return nnx.initializers.truncated_normal(vit._INIT_STD)(key, shape, dtype)  # as vit.py's Linear kernels


class SubBlockLinear(nnx.Module):
  """G Linear layers of one shape: kernel [G, in, out], bias [G, out] (timm Linear init per sub-block)."""

  def __init__(self, groups: int, in_features: int, out_features: int, *, use_bias: bool = True, param_dtype,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(_trunc_init(rngs.params(), (groups, in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((groups, out_features), param_dtype)) if use_bias else None

  def split(self, x: jax.Array) -> jax.Array:
    """[T, in] -> [T, G, out]: the same input through every sub-block."""
    return split_input(x, self.kernel[...], None if self.bias is None else self.bias[...])

  def merge(self, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """[T, G, in] -> [T, out]: sub-block outputs weighted by `weights` [T, G] (None: summed)."""
    return merge_outputs(x, self.kernel[...], self.bias[...], weights)


class Router(nnx.Module):
  """Linear(D -> G), no bias, N(0, 0.02^2) init; logits always in float32 (routing decisions are argmaxes)."""

  def __init__(self, dim: int, groups: int, *, param_dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(ROUTER_INIT_STD)(rngs.params(), (dim, groups), param_dtype))

  def __call__(self, x: jax.Array, *, detach_input: bool = False) -> jax.Array:
    """Straight-through top-1 weights float32 [T, G] of tokens x [T, D]."""
    x = x.astype(jnp.float32)
    if detach_input:
      x = jax.lax.stop_gradient(x)
    return straight_through_top1(x @ self.kernel[...].astype(jnp.float32))


class FactorizedAttention(nnx.Module):
  """G head-group sub-blocks (`qkv`, `proj`) and the attention router `gate`."""

  def __init__(self, dim: int, num_heads: int, groups: int, *, qkv_bias: bool, param_dtype, rngs: nnx.Rngs):
    if dim % num_heads or num_heads % groups:
      raise InvalidValueError(f"a factorized attention needs embed_dim {dim} divisible by num_heads {num_heads} and "
                              f"num_heads divisible by the {groups} sub-blocks",
                              "choose num_heads as a multiple of method.num_sub_blocks (DeiT-S: 6 heads, 3 sub-blocks)")
    self.num_heads, self.groups = num_heads, groups
    self.head_dim = dim // num_heads
    self.qkv = SubBlockLinear(groups, dim, 3 * dim // groups, use_bias=qkv_bias, param_dtype=param_dtype, rngs=rngs)
    self.proj = SubBlockLinear(groups, dim // groups, dim, param_dtype=param_dtype, rngs=rngs)
    self.gate = Router(dim, groups, param_dtype=param_dtype, rngs=rngs)

  def heads(self, u: jax.Array, num_tokens: int) -> jax.Array:
    """Normalised tokens u [T, D] (T = B*N) -> every sub-block's attention output before `proj`, [T, G, D/G]."""
    t = u.shape[0]
    g, hg = self.groups, self.num_heads // self.groups
    qkv = self.qkv.split(u).reshape(t // num_tokens, num_tokens, g, 3, hg, self.head_dim)
    # Head h of sub-block j is head j*H/G + h of the full attention (timm's head-major qkv order).
    q, k, v = (qkv[:, :, :, i].reshape(t // num_tokens, num_tokens, self.num_heads, self.head_dim) for i in range(3))
    return vit.attend(q, k, v).reshape(t, g, -1)


class FactorizedMlp(nnx.Module):
  """G hidden-unit sub-blocks: fc1 [G, D, M/G] -> exact GELU -> fc2 [G, M/G, D]."""

  def __init__(self, dim: int, hidden: int, groups: int, *, param_dtype, rngs: nnx.Rngs):
    if hidden % groups:
      raise InvalidValueError(f"MLP hidden size {hidden} is not divisible by the {groups} sub-blocks",
                              "choose embed_dim * mlp_ratio as a multiple of method.num_sub_blocks")
    self.fc1 = SubBlockLinear(groups, dim, hidden // groups, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = SubBlockLinear(groups, hidden // groups, dim, param_dtype=param_dtype, rngs=rngs)

  def hidden(self, u: jax.Array) -> jax.Array:
    """Normalised tokens [T, D] -> GELU activations of every sub-block [T, G, M/G]."""
    return vit.gelu(self.fc1.split(u))

  def __call__(self, u: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """[T, D] -> [T, D]: sub-blocks weighted by `weights` [T, G] (None: summed, the full MLP)."""
    return self.fc2.merge(self.hidden(u), weights)


class MatchTerms(NamedTuple):
  """DFML's per-block matching terms and routing decisions (a block: scalars and [B*N]; the network: a
  leading [depth] axis).

  attn_distance, mlp_distance: float32, sum over tokens of ||d - t||_2 of the attention / MLP matching term.
  attn_route, mlp_route: int32 [B*N], the sub-block each token was routed to.
  """

  attn_distance: jax.Array
  mlp_distance: jax.Array
  attn_route: jax.Array
  mlp_route: jax.Array


class FactorizedBlock(nnx.Module):
  """Pre-norm block with factorized attention and MLP; norm1 / norm2 shared by the sub-blocks."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, groups: int, *, qkv_bias: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.norm1 = vit._layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = FactorizedAttention(dim, num_heads, groups, qkv_bias=qkv_bias, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = vit._layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = FactorizedMlp(dim, int(dim * mlp_ratio), groups, param_dtype=param_dtype, rngs=rngs)
    self.gate = Router(dim, groups, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, num_tokens: int) -> jax.Array:
    """The full block (all sub-blocks summed), x [B*N, D] -> [B*N, D]. The routers are not used."""
    x = x + self.attn.proj.merge(self.attn.heads(self.norm1(x), num_tokens))
    return x + self.mlp(self.norm2(x))

  def two_stream(self, xo: jax.Array, xh: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array, MatchTerms]:
    """DFML's training block on the full ("ori") stream xo and the routed stream xh, [B*N, D] each.

    With sg = stop_gradient, r(.) = straight-through top-1 weights [B*N, G], A_j / F_j the attention / MLP
    sub-blocks:

      xo1 = xo + sum_j A_j(LN1(xo))                     xo2 = xo1 + sum_j F_j(LN2(xo1))
      u = LN1(xh), r_a = r(attn.gate(u))                xh1 = xh + sum_j r_a,j A_j(u)
      r_m = r(gate(xh1))  (un-normalised, not detached)  xh2 = xh1 + sum_j r_m,j F_j(LN2(xh1))
      d_attn = sg(xh) + sum_j sg(A_j(u)) r(attn.gate(sg(u)))_j     (only attn.gate gets a gradient)
      d_mlp  = sg(xh2) + sum_j r_m,j F_j(LN2(sg(xh2)))   (the routed MLP applied again to the block's output;
                                                          F and r_m not detached, as the code does)
      attn_distance = sum_tokens ||d_attn - sg(xo1)||_2,  mlp_distance = sum_tokens ||d_mlp - sg(xo2)||_2

    The routed stream evaluates every sub-block densely and weights the outputs with the one-hot r. (The
    code also runs the attention router on the ori stream and discards the result; that is skipped here.)

    Returns:
      xo2, xh2 [B*N, D] and the block's MatchTerms.
    """
    sg = jax.lax.stop_gradient
    proj = self.attn.proj
    xo1 = xo + proj.merge(self.attn.heads(self.norm1(xo), num_tokens))
    u = self.norm1(xh)
    heads = self.attn.heads(u, num_tokens)  # [B*N, G, D/G]: every attention sub-block
    r_attn = self.attn.gate(u)
    xh1 = xh + proj.merge(heads, r_attn)
    r_attn_detached = self.attn.gate(u, detach_input=True)
    d_attn = sg(xh) + merge_outputs(sg(heads), sg(proj.kernel[...]), sg(proj.bias[...]), r_attn_detached)
    attn_distance = jnp.sum(safe_norm((d_attn - sg(xo1)).astype(jnp.float32)))

    xo2 = xo1 + self.mlp(self.norm2(xo1))
    r_mlp = self.gate(xh1)
    xh2 = xh1 + self.mlp(self.norm2(xh1), r_mlp)
    d_mlp = sg(xh2) + self.mlp(self.norm2(sg(xh2)), r_mlp)
    mlp_distance = jnp.sum(safe_norm((d_mlp - sg(xo2)).astype(jnp.float32)))
    routes = [jnp.argmax(r, axis=-1).astype(jnp.int32) for r in (r_attn, r_mlp)]
    return xo2, xh2, MatchTerms(attn_distance, mlp_distance, *routes)


class FactorizedVisionTransformer(vit.VisionTransformer):
  """vit.VisionTransformer (embedding, tokens, final norm, pooling: unchanged) with factorized blocks.

  Args: those of vit.VisionTransformer, plus num_sub_blocks (G, 3 in DFML): num_heads and the MLP hidden
  size must be divisible by it.
  """

  def __init__(self, *, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
               num_sub_blocks: int = 3, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               **kwargs: Any):
    super().__init__(depth=0, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, **kwargs)
    self.depth = depth
    self.num_sub_blocks = num_sub_blocks
    kw = dict(qkv_bias=qkv_bias, dtype=self.dtype, param_dtype=jnp.dtype(param_dtype), rngs=rngs)
    self.blocks = nnx.List([FactorizedBlock(self.embed_dim, num_heads, mlp_ratio, num_sub_blocks, **kw)
                            for _ in range(depth)])

  def forward_blocks(self, tokens: jax.Array, prompts: Mapping[int, jax.Array] | None = None) -> jax.Array:
    """The full network's blocks (all sub-blocks summed): tokens [B, N, D] -> [B, N, D], before the final norm."""
    if prompts:
      raise ValueError("the factorized ViT takes no prompts")
    b, n, d = tokens.shape
    x = tokens.reshape(b * n, d)
    for block in self.blocks:
      x = block(x, n)
    return x.reshape(b, n, d)

  def forward_two_stream(self, images: jax.Array) -> tuple[jax.Array, jax.Array, MatchTerms]:
    """DFML's training forward (FactorizedBlock.two_stream in every block; both streams start from the same
    embedded tokens).

    Args:
      images: float32 [B, S, S, C], normalised.
    Returns:
      ori and routed tokens after the final norm, [B, N, D] each, and the blocks' MatchTerms ([depth] and
      [depth, B*N]).
    """
    tokens = self.embed(images)
    b, n, d = tokens.shape
    xo = xh = tokens.reshape(b * n, d)
    terms = []
    for block in self.blocks:
      xo, xh, block_terms = block.two_stream(xo, xh, n)
      terms.append(block_terms)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *terms)
    return self.norm(xo).reshape(b, n, d), self.norm(xh).reshape(b, n, d), stacked


# -- weights ------------------------------------------------------------------------------------------------


def factorize_vit_params(flat: Mapping[str, np.ndarray], *, num_sub_blocks: int) -> dict[str, np.ndarray]:
  """A converted plain ViT / DeiT ({'blocks/0/attn/qkv/kernel': [D, 3D], ...}) -> factorized tensors.

  The authors' `convert.py` re-layout, in our (in, out) kernel layout, for sub-block j of G:
    qkv   kernel [D, 3D] -> [G, D, 3D/G]: columns of q, k and v of heads [jH/G, (j+1)H/G), [q; k; v]
          bias [3D] -> [G, 3D/G] likewise
    proj  kernel [D, D] -> [G, D/G, D]: the input rows that read those heads;  bias [D] -> bias / G each
    fc1   kernel [D, M] -> [G, D, M/G]: hidden units [jM/G, (j+1)M/G);  bias [M] -> [G, M/G]
    fc2   kernel [M, D] -> [G, M/G, D]: the rows of those hidden units;  bias [D] -> bias / G each
  Every other tensor is copied. Deterministic and exact (the bias division is float32 b / G, as torch's
  `bias / 3`); the routers are not in a plain checkpoint (see `init_router_params`).
  """
  g = int(num_sub_blocks)
  out: dict[str, np.ndarray] = {}
  for key, value in flat.items():
    match = _FACTORIZED.fullmatch(key)
    if match is None:
      out[key] = value
      continue
    value = np.asarray(value)
    layer, kind = match.group(2), match.group(3)
    split_axis = 0 if layer in ("attn/proj", "mlp/fc2") and kind == "kernel" else -1
    if value.shape[split_axis] % (3 * g if layer == "attn/qkv" else g):
      raise InvalidValueError(f"{key} of shape {value.shape} does not split into {g} sub-blocks")
    if kind == "bias" and layer in ("attn/proj", "mlp/fc2"):
      out[key] = np.broadcast_to(value / value.dtype.type(g), (g,) + value.shape)
    elif layer == "attn/qkv" and kind == "kernel":  # [D, 3D] = [D, (q|k|v, G, D/G)]
      out[key] = value.reshape(value.shape[0], 3, g, -1).transpose(2, 0, 1, 3).reshape(g, value.shape[0], -1)
    elif layer == "attn/qkv":
      out[key] = value.reshape(3, g, -1).transpose(1, 0, 2).reshape(g, -1)
    elif layer == "mlp/fc1" and kind == "kernel":
      out[key] = value.reshape(value.shape[0], g, -1).transpose(1, 0, 2)
    elif layer == "mlp/fc1":
      out[key] = value.reshape(g, -1)
    else:  # attn/proj and mlp/fc2 kernels: [G * in/G, out] -> [G, in/G, out]
      out[key] = value.reshape(g, -1, value.shape[-1])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def init_router_params(key: jax.Array, depth: int, dim: int, num_sub_blocks: int,
                       dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
  """Fresh routers for every block, N(0, 0.02^2) (the authors' checkpoints hold none: timm's init)."""
  keys = jax.random.split(key, 2 * depth)
  init = nnx.initializers.normal(ROUTER_INIT_STD)
  out = {}
  for i in range(depth):
    out[f"blocks/{i}/attn/gate/kernel"] = np.asarray(init(keys[2 * i], (dim, num_sub_blocks), dtype))
    out[f"blocks/{i}/gate/kernel"] = np.asarray(init(keys[2 * i + 1], (dim, num_sub_blocks), dtype))
  return out


@functools.cache
def _random_init_fn(arch: tuple):
  return nnx.jit(lambda key: FactorizedVisionTransformer(rngs=nnx.Rngs(key), **dict(arch)))


def create(name: str, weights: str | None = None, *, rng: jax.Array | None = None, num_sub_blocks: int = 3,
           **overrides: Any) -> FactorizedVisionTransformer:
  """The factorized version of registered ViT / DeiT `name` ('deit_small_distilled_patch16_224', ...).

  weights: a plain ViT weights directory written by convert_timm_weights.py for `name` (no special
    conversion): it is re-laid out by `factorize_vit_params` while loading (position embeddings are
    resampled to another img_size as for the plain ViT) and the routers are drawn from `rng`. Loading is
    strict, as for every backbone. None: random init from `rng` (routers included).
  The module's `pretrained_cfg` holds the weights' preprocessing (or the variant's default).
  """
  entry = get_entry(name)
  if entry.family != "vit":
    raise InvalidValueError(f"only ViT / DeiT backbones can be factorized, {name!r} is a {entry.family!r}",
                            "e.g. --config.model.backbone=deit_small_distilled_patch16_224")
  rng = jax.random.key(0) if rng is None else rng
  arch = {**entry.arch, **overrides, "num_sub_blocks": int(num_sub_blocks)}
  if not weights:
    model = _random_init_fn(tuple(sorted(arch.items())))(rng)
    model.pretrained_cfg = get_pretrained_cfg(name)
    return model
  meta, flat = read_weights_dir(weights)
  if meta["family"] != "vit" or meta["model"] != entry.name:
    raise InvalidValueError(f"{weights} holds {meta['model']!r} ({meta['family']}), not the plain {entry.name!r} "
                            f"weights that are factorized for this model",
                            f"python convert_timm_weights.py --model {entry.name} --out DIR, then "
                            f"--config.model.weights=DIR")
  model = nnx.eval_shape(lambda: FactorizedVisionTransformer(rngs=nnx.Rngs(0), **arch))
  flat = vit._adapt_pos_embed_on_load(flat, model_shapes(model))
  flat = {**factorize_vit_params(flat, num_sub_blocks=num_sub_blocks),
          **init_router_params(rng, model.depth, model.embed_dim, num_sub_blocks)}
  strict_update(model, flat, source=f"{weights} (factorized into {num_sub_blocks} sub-blocks)")
  model.pretrained_cfg = PretrainedCfg.from_json(meta["pretrained_cfg"])
  return model
