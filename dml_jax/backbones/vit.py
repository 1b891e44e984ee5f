"""Vision Transformer (ViT, DeiT distilled) in Flax NNX with timm `vision_transformer` semantics.

Parameter paths follow timm's state-dict names (`blocks/0/attn/qkv/kernel`, `blocks/0/norm1/scale`,
`patch_embed/proj/kernel`, `cls_token`, `pos_embed`, `dist_token`, `norm/scale`, ...), so regex parameter
groups written against timm names carry over. Numerics follow timm: exact (erf) GELU, LayerNorm eps 1e-6 with
a two-pass variance, fused qkv Linear whose output is [q; k; v], each head-major, learned absolute position
embedding that includes the prefix (cls, dist) positions.

The forward pass is split so that methods can reuse the pieces without copying the model:

  tokens = vit.embed(x)                         # [B, prefix + grid**2, D]: cls (, dist), patches, + pos_embed
  tokens = vit.forward_blocks(tokens, prompts)  # the blocks, with optional deep prompts
  tokens = vit.norm(tokens)                     # final LayerNorm
  pooled = vit.pool(tokens)                     # [B, D]

`forward_features` is the first three, `__call__` all four (timm's
`forward_head(forward_features(x), pre_logits=True)`).

Inside the blocks the token stream is flat, [B*N, D] (B samples of N tokens), and the blocks' LayerNorms
have a hand-written backward (`LayerNorm`). Both are for XLA's CPU fusion pass, which otherwise rebuilds
the backward pass badly: jax's own LayerNorm gradient ends the residual-stream gradient of every block
with an add of a broadcast per-token statistic, which XLA counts as "effectively unary" and so free to
duplicate into each consumer. Every block's gradient then re-adds the contributions of all later blocks
instead of reading the computed value: fusions whose operand count and cost grow with depth (ViT-S/16 at
batch 16: up to ~180 operands, together more than a third of a CPU training step). On [B, N, D] arrays
XLA's CPU backend also feeds the weight gradients of `qkv`, `proj`, `fc1` and `fc2` a transposed [D, B*N]
copy of the gradient, the costliest of those fusions; a 2-D dot contracts the token axis of both operands
without a copy.

A method that needs its own block loop (e.g. DFML's factorized blocks) keeps the same layout: flatten
`embed`'s tokens to [B*N, D] once and pass the sequence length N along. The pieces all work on flat tokens:
`Block.norm1/norm2` (`LayerNorm`, per token), `Attention.qkv` and `Attention.split_heads(qkv, N)` -> q, k,
v [B, N, H, hd], `attend`, `Attention.merge_heads` -> [B*N, h*hd], `Attention.proj`, and `Mlp.fc1`, `gelu`,
`Mlp.fc2` (per token). A sub-block over heads g computes `merge_heads(attend(q[:, :, g], k[:, :, g],
v[:, :, g])) @ proj.kernel[rows of g]` and one over hidden units u `gelu(fc1(x)[:, u]) @ fc2.kernel[u]`;
the sub-blocks' outputs (plus each bias once) sum to `attn` and `mlp` up to rounding. Summing them and adding the
residual on the flat [B*N, D] arrays, with `LayerNorm` for every norm on the stream, keeps the backward free
of the recomputing fusions (`tests/test_vit_fusion.py` checks the blocks for this).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.backbones import attention
from dml_jax.backbones.registry import register
from dml_jax.backbones.weights import register_load_adapter
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, PretrainedCfg

_LN_EPS = 1e-6
_INIT_STD = 0.02  # timm's trunc_normal_(std=.02) for Linear weights, pos_embed and dist_token
_logger = logging.getLogger(__name__)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2: torch's formula for timm's nn.GELU.

  jax.nn.gelu defaults to the tanh approximation, and its exact form goes through erfc, which XLA's CPU backend
  computes with an exponential and two branches where erf is one polynomial; both forms agree to float32
  rounding.
  """
  return x * (1 + jax.lax.erf(x * math.sqrt(0.5))) * 0.5  # Python floats keep x's dtype


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention per head, scale 1/sqrt(head_dim), logits and softmax in float32 (`attention`: the
  numbers of jax.nn.dot_product_attention with a backward that makes fewer passes over the [N, N] arrays).

  Args:
    q, k, v: [B, N, H, head_dim] in the compute dtype.
  Returns:
    [B, N, H, head_dim] in the compute dtype.
  """
  return attention.dot_product_attention(q, k, v)


@jax.custom_vjp
def _bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [..., F] + bias [F]; the bias gradient is ones @ dy, a matrix-vector product, instead of a reduction."""
  return y + bias


def _bias_add_fwd(y, bias):
  return y + bias, None


def _bias_add_bwd(_, dy):
  rows = dy.reshape(-1, dy.shape[-1])
  # XLA's CPU backend reduces over the B*N tokens in two loop passes, slower than its matrix-vector product.
  d_bias = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=jnp.float32)
  return dy, d_bias.astype(dy.dtype)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, same forward) with the bias added by `_bias_add`."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.bias is None:
      return super().__call__(inputs)
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return _bias_add(y, bias)


def _linear(in_features: int, out_features: int, *, use_bias: bool = True, dtype, param_dtype,
            rngs: nnx.Rngs) -> Linear:
  return Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=nnx.initializers.truncated_normal(_INIT_STD), bias_init=nnx.initializers.zeros,
                rngs=rngs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """x [..., D] in the compute dtype, scale and bias [D] -> [..., D] in x's dtype; statistics in float32."""
  y, _ = _layer_norm_fwd(x, scale, bias, eps)
  return y


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  # Two-pass variance as torch's LayerNorm: E[x^2] - E[x]^2 loses digits on the large residual streams
  # of pretrained ViTs.
  centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  xhat = centred * rstd
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  # xhat and rstd are all the backward needs; bias only for its dtype (it is tiny).
  return y.astype(x.dtype), (xhat, rstd, scale, bias)


def _layer_norm_bwd(eps, res, dy):
  del eps
  xhat, rstd, scale, bias = res
  x_dtype, dy = dy.dtype, dy.astype(jnp.float32)  # y has x's dtype, so its cotangent does too
  lead = tuple(range(dy.ndim - 1))
  d_scale = jnp.sum(dy * xhat, axis=lead).astype(scale.dtype)
  d_bias = jnp.sum(dy, axis=lead).astype(bias.dtype)
  g = dy * scale.astype(jnp.float32)
  # One expression for dx, ending in a product with a per-token factor: the block's residual gradient is then
  # `add(residual cotangent, dx)`, two full-size operands, which XLA materialises once instead of
  # duplicating into every consumer (see the module docstring).
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return dx.astype(x_dtype), d_scale, d_bias


_layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, `scale` and `bias` as timm's weight and bias, with a hand-written VJP.

  Same numbers as torch's LayerNorm (two-pass variance, float32 statistics, (x - mean) * rstd * scale + bias);
  the backward is the textbook formula, written out so that XLA does not recompute the residual-stream
  gradient across blocks (module docstring).
  """

  def __init__(self, dim: int, *, epsilon: float = _LN_EPS, dtype, param_dtype, rngs: nnx.Rngs):
    # Scale 1, bias 0; one key drawn for each as nnx.LayerNorm does, so that a seed gives the same random
    # ViT as before.
    self.epsilon = epsilon
    self.scale = nnx.Param(nnx.initializers.ones(rngs.params(), (dim,), param_dtype))
    self.bias = nnx.Param(nnx.initializers.zeros(rngs.params(), (dim,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the compute dtype (x's dtype when dtype is None)."""
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, self.scale[...])
    return _layer_norm_fn(x.astype(dtype), self.scale[...], self.bias[...], self.epsilon)


def _layer_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> LayerNorm:
  return LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patch_size x patch_size convolution; `proj/kernel` is HWIO [p, p, in_chans, D]."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = nnx.Conv(in_chans, embed_dim, kernel_size=(patch_size, patch_size),
                         strides=(patch_size, patch_size), padding="VALID", dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), D], patches in row-major order as timm's flatten(2)."""
    y = self.proj(x)
    return y.reshape(y.shape[0], -1, y.shape[-1])


class Attention(nnx.Module):
  """timm Attention: fused `qkv` Linear D -> 3D, per-head softmax attention, `proj` Linear D -> D.

  Works on flat tokens [B*N, D] (see the module docstring); `seq_len` N tells where one sample ends.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = _linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def split_heads(self, qkv: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv output [B*N, 3*H*hd] -> q, k, v each [B, N, H, hd] (timm's reshape(B, N, 3, H, hd))."""
    qkv = qkv.reshape(-1, seq_len, 3, self.num_heads, self.head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  @staticmethod
  def merge_heads(out: jax.Array) -> jax.Array:
    """Per-head outputs [B, N, h, hd] -> flat tokens [B*N, h*hd], heads in order (the rows of `proj`'s kernel)."""
    b, n, h, hd = out.shape
    return out.reshape(b * n, h * hd)

  def __call__(self, x: jax.Array, seq_len: int) -> jax.Array:
    """Flat tokens [B*N, D] -> [B*N, D]."""
    return self.proj(self.merge_heads(attend(*self.split_heads(self.qkv(x), seq_len))))


class Mlp(nnx.Module):
  """fc1 (D -> hidden), exact GELU, fc2 (hidden -> D); per token, so any leading shape (flat tokens [B*N, D])."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). No layer scale, no drop path."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, seq_len: int | None = None) -> jax.Array:
    """Flat tokens [B*N, D] with seq_len N -> [B*N, D]; or [B, N, D] -> [B, N, D] when seq_len is None.

    Loops over blocks should stay flat between blocks (module docstring); the [B, N, D] form is for single
    calls.
    """
    if seq_len is None:
      b, n, d = x.shape
      return self(x.reshape(b * n, d), n).reshape(b, n, d)
    x = x + self.attn(self.norm1(x), seq_len)
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
  """timm VisionTransformer with class token, learned pos_embed including prefix positions, token pooling.

  Args:
    img_size: square input side in pixels; images must have exactly this size (timm's strict_img_size).
    patch_size: square patch side; must divide img_size.
    in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as timm's VisionTransformer.
    distilled: DeiT distillation token after the class token (timm's VisionTransformerDistilled); then
      pooling averages the cls and dist outputs, as timm's distilled `forward_head(pre_logits=True)`.
    dtype: compute dtype (e.g. 'bfloat16'); None computes in the parameters' dtype. Attention logits and
      softmax, and LayerNorm statistics, are always float32.
    param_dtype: parameter dtype (float32 unless memory forces otherwise).
  """

  def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
               depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
               distilled: bool = False, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(img_size, int) or not isinstance(patch_size, int):
      raise ValueError(f"img_size and patch_size must be ints (square images and patches), got "
                       f"{img_size!r} and {patch_size!r}")
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    dtype = None if dtype is None else jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype)
    self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
    self.grid_size = img_size // patch_size
    self.num_prefix_tokens = 2 if distilled else 1
    self.distilled = distilled
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **kw)
    # timm: cls_token ~ N(0, 1e-6); pos_embed and dist_token ~ trunc_normal(.02).
    self.cls_token = nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, embed_dim), param_dtype))
    trunc = nnx.initializers.truncated_normal(_INIT_STD)
    self.dist_token = nnx.Param(trunc(rngs.params(), (1, 1, embed_dim), param_dtype)) if distilled else None
    num_tokens = self.num_prefix_tokens + self.grid_size ** 2
    self.pos_embed = nnx.Param(trunc(rngs.params(), (1, num_tokens, embed_dim), param_dtype))
    self.blocks = nnx.List([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, **kw) for _ in range(depth)])
    self.norm = _layer_norm(embed_dim, **kw)

  def embed(self, x: jax.Array) -> jax.Array:
    """Images [B, img_size, img_size, C] (normalised) -> tokens [B, prefix + grid**2, D] with pos_embed added.

    Token order: cls, (dist,) patches row-major.
    """
    if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"expected images [B, {self.img_size}, {self.img_size}, C] (NHWC), got {x.shape}; "
                       f"pass img_size=... to create() for another size (position embeddings are resampled)")
    dtype = self.dtype if self.dtype is not None else self.pos_embed[...].dtype
    patches = self.patch_embed(x.astype(dtype))
    b = patches.shape[0]
    prefix = [self.cls_token[...]] + ([self.dist_token[...]] if self.distilled else [])
    prefix = [jnp.broadcast_to(t.astype(dtype), (b, 1, self.embed_dim)) for t in prefix]
    tokens = jnp.concatenate(prefix + [patches], axis=1)
    return tokens + self.pos_embed[...].astype(dtype)

  def forward_blocks(self, tokens: jax.Array, prompts: Mapping[int, jax.Array] | None = None) -> jax.Array:
    """Runs the blocks; deep prompts are inserted before a block and dropped after it.

    Args:
      tokens: [B, N, D] from `embed`.
      prompts: optional {block_index: prompts}, prompts [B, P, D] per sample or [P, D] shared; P may differ
        between blocks. Before block i its prompts go right after the prefix tokens (cls, dist), i.e.
        tokens [prefix, prompts, patches]; after block i those P outputs are removed, so every block
        returns N tokens. Prompts get no position embedding. (VPT-deep; VPTSP's code puts them in front
        of cls instead, which gives the same outputs: attention, LayerNorm and MLP are per token and
        permutation-equivariant.)
    Returns:
      [B, N, D], before the final norm. Between blocks the stream is flat, [B*N, D] (module docstring).
    """
    prompts = self._checked_prompts(prompts, tokens)
    b, n, d = tokens.shape
    k = self.num_prefix_tokens
    x = tokens.reshape(b * n, d)
    for i, block in enumerate(self.blocks):
      p = prompts.get(i)
      if p is None:
        x = block(x, n)
      else:
        tokens = x.reshape(b, n, d)
        m = n + p.shape[1]
        x = block(jnp.concatenate([tokens[:, :k], p, tokens[:, k:]], axis=1).reshape(b * m, d), m)
        tokens = x.reshape(b, m, d)
        x = jnp.concatenate([tokens[:, :k], tokens[:, m - n + k:]], axis=1).reshape(b * n, d)
    return x.reshape(b, n, d)

  def forward_features(self, x: jax.Array, prompts: Mapping[int, jax.Array] | None = None) -> jax.Array:
    """Images [B, H, W, C] -> tokens [B, prefix + grid**2, D] after the final LayerNorm (timm's forward_features)."""
    return self.norm(self.forward_blocks(self.embed(x), prompts))

  def pool(self, tokens: jax.Array) -> jax.Array:
    """Tokens [B, N, D] -> [B, D]: the cls token; DeiT distilled: (cls + dist) / 2, as timm."""
    if self.distilled:
      return (tokens[:, 0] + tokens[:, 1]) / 2
    return tokens[:, 0]

  def __call__(self, x: jax.Array, prompts: Mapping[int, jax.Array] | None = None) -> jax.Array:
    """Images [B, H, W, C] float32, normalised -> pooled pre-logits features [B, D] in the compute dtype."""
    return self.pool(self.forward_features(x, prompts))

  def _checked_prompts(self, prompts: Mapping[int, jax.Array] | None, tokens: jax.Array) -> dict[int, jax.Array]:
    if not prompts:
      return {}
    b, _, d = tokens.shape
    checked = {}
    for i, p in prompts.items():
      if not isinstance(i, (int, np.integer)) or not 0 <= i < self.depth:
        raise ValueError(f"prompt key {i!r} is not a block index in [0, {self.depth})")
      if p is None:
        continue
      if p.ndim == 2:
        p = jnp.broadcast_to(p[None], (b,) + p.shape)
      if p.ndim != 3 or p.shape[0] != b or p.shape[2] != d:
        raise ValueError(f"prompts for block {i} have shape {p.shape}; expected [{b}, P, {d}] or [P, {d}]")
      checked[int(i)] = p.astype(tokens.dtype)
    return checked


def resample_abs_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int) -> np.ndarray:
  """Resizes a square learned position grid as timm's `resample_abs_pos_embed` (bicubic, antialias, float32).

  jax.image.resize with bicubic + antialias uses the same Keys kernel (a = -0.5) and edge renormalisation as
  torch's antialiased bicubic, so this matches timm to ~1e-6.

  Args:
    pos_embed: [1, num_prefix_tokens + g*g, D].
    new_grid: target side g'.
    num_prefix_tokens: leading positions (cls, dist) that are kept as they are.
  Returns:
    [1, num_prefix_tokens + g'*g', D] in pos_embed's dtype.
  """
  pos_embed = np.asarray(pos_embed)
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old = math.isqrt(grid.shape[1])
  if old * old != grid.shape[1]:
    raise ValueError(f"pos_embed has {grid.shape[1]} grid positions after {num_prefix_tokens} prefix tokens, "
                     f"not a square")
  dim = grid.shape[-1]
  if old == new_grid:
    return pos_embed
  resized = jax.image.resize(jnp.asarray(grid[0].reshape(old, old, dim), jnp.float32), (new_grid, new_grid, dim),
                             method="bicubic", antialias=True)
  resized = np.asarray(resized).reshape(1, new_grid * new_grid, dim).astype(pos_embed.dtype)
  return np.concatenate([prefix, resized], axis=1)


def _adapt_pos_embed_on_load(flat: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Load adapter: weights for another image size get their pos_embed resampled to the model's grid.

  Anything else that does not fit (width, prefix tokens, non-square grids) is left for the strict check to
  report.
  """
  src, dst = flat.get("pos_embed"), shapes.get("pos_embed")
  if src is None or dst is None or tuple(src.shape) == tuple(dst) or src.ndim != 3 or src.shape[-1] != dst[-1]:
    return flat
  prefix = 2 if "dist_token" in flat else 1
  old_n, new_n = src.shape[1] - prefix, dst[1] - prefix
  old_g, new_g = math.isqrt(max(old_n, 0)), math.isqrt(max(new_n, 0))
  if old_g * old_g != old_n or new_g * new_g != new_n or old_n <= 0 or new_n <= 0:
    return flat
  _logger.info("resampling pos_embed from a %dx%d to a %dx%d grid (bicubic, as timm)", old_g, old_g, new_g, new_g)
  return {**flat, "pos_embed": resample_abs_pos_embed(src, new_g, prefix)}


def build(*, rngs: nnx.Rngs, **arch: Any) -> VisionTransformer:
  return VisionTransformer(rngs=rngs, **arch)


def _register_variants() -> None:
  def cfg(mean, std, crop_pct=0.9):
    return PretrainedCfg(mean=mean, std=std, input_size=224, crop_pct=crop_pct, interpolation="bicubic")

  inception, imagenet = cfg(INCEPTION_MEAN, INCEPTION_STD), cfg(IMAGENET_MEAN, IMAGENET_STD)
  # Values from timm 1.0's default_cfgs for these tags.
  augreg = {t: inception for t in ("augreg_in1k", "augreg_in21k", "augreg_in21k_ft_in1k")}
  register("vit_small_patch16_224", "vit", build, pretrained_cfg=inception,
           pretrained_tags={**augreg, "dino": imagenet},
           img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
  clip_mean = (0.48145466, 0.4578275, 0.40821073)
  clip_std = (0.26862954, 0.26130258, 0.27577711)
  register("vit_base_patch16_224", "vit", build, pretrained_cfg=inception,
           pretrained_tags={**augreg, "augreg2_in21k_ft_in1k": inception, "orig_in21k": inception,
                            "orig_in21k_ft_in1k": inception, "sam_in1k": inception, "dino": imagenet,
                            "mae": imagenet, "bamboo": cfg(clip_mean, clip_std, crop_pct=1.0)},
           img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
  register("deit_small_distilled_patch16_224", "vit", build, pretrained_cfg=imagenet,
           pretrained_tags={"fb_in1k": imagenet},
           img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, distilled=True)


_register_variants()
register_load_adapter("vit", _adapt_pos_embed_on_load)
