"""Config names -> loss functions, and the learnable parameters each loss needs.

The engine looks a loss up by its config name, creates the parameters listed in `LOSS_PARAMS` (e.g. a
proxy table [C, D]) in its train state, and calls

    spec = get_loss_spec(name)
    loss = spec.fn(embeddings, labels, **loss_params, **({'rng': key} if spec.needs_rng else {}), **hparams)

where `loss_params` = `init_loss_params(name, key, num_classes=C, embedding_dim=D)` at the start.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax

from dml_jax.losses import param_init
from dml_jax.losses.margin import margin_loss
from dml_jax.losses.multi_similarity import multi_similarity_loss
from dml_jax.losses.norm_softmax import norm_softmax_loss
from dml_jax.losses.proxy_anchor import proxy_anchor_loss
from dml_jax.losses.proxy_nca import proxy_nca_loss
from dml_jax.losses.triplet import triplet_loss

ParamInit = Callable[..., jax.Array]  # init(key, num_classes, embedding_dim, **options) -> array


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One registered loss.

  fn: fn(embeddings [B, D], labels [B], *learnable params by name, rng=key if needs_rng, **hparams) -> scalar.
  params: learnable parameter name -> its initialiser (see `param_init`); these are keyword names of fn.
  needs_rng: fn takes a keyword `rng` (a jax.random key) for sampling.
  """

  name: str
  fn: Callable[..., jax.Array]
  params: Mapping[str, ParamInit]
  needs_rng: bool = False


_SPECS: dict[str, LossSpec] = {
    spec.name: spec for spec in (
        LossSpec("proxy_anchor", proxy_anchor_loss,
                 MappingProxyType({"proxies": param_init.kaiming_normal_fan_out_proxies})),
        LossSpec("proxy_nca", proxy_nca_loss, MappingProxyType({"proxies": param_init.standard_normal_proxies})),
        LossSpec("norm_softmax", norm_softmax_loss,
                 MappingProxyType({"proxies": param_init.standard_normal_proxies})),
        LossSpec("margin", margin_loss, MappingProxyType({"beta": param_init.margin_beta}), needs_rng=True),
        LossSpec("multi_similarity", multi_similarity_loss, MappingProxyType({})),
        LossSpec("triplet", triplet_loss, MappingProxyType({})),
    )
}

# name -> {param name: init fn}; losses without learnable parameters map to {}.
LOSS_PARAMS: Mapping[str, Mapping[str, ParamInit]] = MappingProxyType({n: s.params for n, s in _SPECS.items()})


def list_losses() -> list[str]:
  return sorted(_SPECS)


def get_loss_spec(name: str) -> LossSpec:
  if name not in _SPECS:
    close = difflib.get_close_matches(name, list(_SPECS), n=3)
    raise KeyError(f"unknown loss {name!r}; close matches: {close}; known: {list_losses()}")
  return _SPECS[name]


def get_loss(name: str) -> Callable[..., jax.Array]:
  """The loss function registered under config name `name` (see `list_losses()`)."""
  return get_loss_spec(name).fn


def init_loss_params(name: str, key: jax.Array, *, num_classes: int, embedding_dim: int,
                     **options: Any) -> dict[str, jax.Array]:
  """Initial values of loss `name`'s learnable parameters, {} if it has none.

  `options` go to every initialiser of that loss (e.g. `class_specific_beta=True, beta=1.2` for 'margin').
  """
  params = get_loss_spec(name).params
  keys = jax.random.split(key, max(len(params), 1))
  return {pname: init(k, num_classes, embedding_dim, **options) for (pname, init), k in zip(params.items(), keys)}
