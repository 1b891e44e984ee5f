"""Named backbone variants and `create(name, weights=None, **overrides)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from dml_jax.backbones.weights import load_weights_into
from dml_jax.errors import UnknownNameError, close_matches
from dml_jax.preprocessing import PretrainedCfg


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One named variant: its family, builder, architecture kwargs and default preprocessing."""

  name: str
  family: str  # 'vit' | 'resnet' | 'bninception'; selects the converter and weight adapter
  build: Callable[..., nnx.Module]  # build(*, rngs: nnx.Rngs, **arch) -> module
  arch: dict[str, Any]
  pretrained_cfg: PretrainedCfg
  # timm pretrained tag ('augreg_in21k') -> that weight's preprocessing; the untagged name gets `pretrained_cfg`.
  pretrained_tags: dict[str, PretrainedCfg] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, family: str, build: Callable[..., nnx.Module], pretrained_cfg: PretrainedCfg,
             pretrained_tags: dict[str, PretrainedCfg] | None = None, **arch: Any) -> None:
  if name in _REGISTRY:
    raise ValueError(f"backbone {name!r} is registered twice")
  _REGISTRY[name] = ModelEntry(name, family, build, dict(arch), pretrained_cfg, dict(pretrained_tags or {}))


def _ensure_families_imported() -> None:
  # Families register themselves on import; importing here keeps `registry` free of import cycles.
  from dml_jax.backbones import bninception, resnet, vit  # noqa: F401


def get_entry(name: str) -> ModelEntry:
  _ensure_families_imported()
  base = name.split(".", 1)[0]  # 'vit_base_patch16_224.augreg_in21k' -> architecture name
  if base not in _REGISTRY:
    close = close_matches(base, list(_REGISTRY), n=3)
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownNameError(f"unknown backbone {name!r}; {guess}known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[base]


def get_pretrained_cfg(name: str) -> PretrainedCfg:
  """Preprocessing for `name`: 'arch.tag' gives that tag's cfg, a bare 'arch' the variant's default.

  An unknown tag stops with the known ones rather than guessing a normalisation.
  """
  entry = get_entry(name)
  if "." not in name:
    return entry.pretrained_cfg
  tag = name.split(".", 1)[1]
  if tag not in entry.pretrained_tags:
    close = close_matches(tag, list(entry.pretrained_tags))
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownNameError(f"unknown pretrained tag {tag!r} for {entry.name!r}; {guess}known tags: "
                           f"{sorted(entry.pretrained_tags)}")
  return entry.pretrained_tags[tag]


def list_models() -> list[str]:
  _ensure_families_imported()
  return sorted(_REGISTRY)


def create(name: str, weights: str | None = None, *, rngs: nnx.Rngs | None = None, **overrides: Any) -> nnx.Module:
  """Builds backbone `name`; with `weights`, loads a directory written by convert_timm_weights.py.

  Overrides change the architecture (e.g. `img_size=32, depth=2` for tests). With weights, the
  directory's model name must match `name`'s architecture, and every parameter must match in name and
  shape (after the family's adaptations, e.g. ViT position embeddings resampled to a new image size);
  otherwise loading stops with the list of missing, unexpected and mis-shaped keys.

  The module's `pretrained_cfg` attribute holds the preprocessing of the loaded weights (or the
  variant's default without weights).
  """
  entry = get_entry(name)
  arch = {**entry.arch, **overrides}
  tag = name.split(".", 1)[1] if "." in name else None
  cfg = entry.pretrained_tags.get(tag, entry.pretrained_cfg)
  if weights is None:
    model = entry.build(rngs=rngs or nnx.Rngs(0), **arch)
  else:
    # The weights replace every parameter and BN statistic, so only shapes are built: a random init costs one
    # XLA compile per parameter shape (seconds for a ViT on a CPU) and the memory of a second copy.
    model = nnx.eval_shape(lambda: entry.build(rngs=nnx.Rngs(0), **arch))
    cfg = load_weights_into(model, weights, expected_model=entry.name, family=entry.family)
    if _has_abstract_state(model):  # state the directory does not hold (e.g. RNG streams): build it for real
      model = entry.build(rngs=rngs or nnx.Rngs(0), **arch)
      cfg = load_weights_into(model, weights, expected_model=entry.name, family=entry.family)
  model.pretrained_cfg = cfg
  return model


def _has_abstract_state(model: nnx.Module) -> bool:
  return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))
