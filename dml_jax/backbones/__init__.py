"""Flax NNX backbones with timm parameter semantics.

`create(name, weights=None, **overrides)` builds a named variant; calling the module on normalised
float32 images [B, H, W, 3] returns pooled pre-logits features [B, D], as timm's
`forward_head(forward_features(x), pre_logits=True)`.
"""

from dml_jax.backbones.registry import ModelEntry, create, get_entry, list_models, register
from dml_jax.preprocessing import PretrainedCfg

__all__ = ["PretrainedCfg", "ModelEntry", "create", "get_entry", "list_models", "register"]
