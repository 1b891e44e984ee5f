"""Parameter paths: nested dicts <-> flat {'model/backbone/blocks/0/attn/qkv/kernel': leaf}.

Parameter-group rules are regexes on these '/'-joined paths. Flattening and nesting run in Python, so
inside a jitted function they cost trace time only, never per-step time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

Path = str
KeyTuple = tuple[Any, ...]


def _key_name(key: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  raise TypeError(f"unsupported pytree key {key!r}")


def path_string(keys: Iterable[Any]) -> Path:
  return "/".join(str(k) for k in keys)


def key_index(tree: Any) -> dict[Path, KeyTuple]:
  """{'a/0/kernel': ('a', 0, 'kernel')} for every leaf of a nested dict (keys may be str or int)."""
  out = {}
  for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(_key_name(k) for k in keypath)
    path = path_string(keys)
    if path in out:
      raise ValueError(f"two leaves share the path {path!r} (keys {out[path]} and {keys})")
    out[path] = keys
  return out


def flatten(tree: Any) -> dict[Path, Any]:
  """{'a/0/kernel': leaf} in jax's leaf order."""
  return {path_string(_key_name(k) for k in keypath): leaf
          for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: Mapping[Path, Any], keys: Mapping[Path, KeyTuple]) -> dict[Any, Any]:
  """Inverse of `flatten` for any subset of paths: a nested dict holding only the given leaves."""
  out: dict[Any, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = keys[path]
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = leaf
  return out


def map_with_paths(fn, tree: Any) -> Any:
  """jax.tree.map with the leaf's '/'-joined path: fn(path, leaf); keeps the tree's own node types."""
  return jax.tree_util.tree_map_with_path(lambda keypath, leaf: fn(path_string(_key_name(k) for k in keypath), leaf),
                                          tree)
