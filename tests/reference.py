"""Parity references of the real libraries (torch, timm, pretrainedmodels, pytorch-metric-learning,
torchvision), committed as small files so that the default test run needs none of them.

A parity test takes the `ref` fixture (tests/conftest.py) and asks for each reference by name:

  def test_proxy_anchor_matches_pml(ref):
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)   # inputs: seeded numpy only
    expected = ref("losses/proxy_anchor", lambda: _pml_proxy_anchor(x))   # -> {name: np.ndarray}
    assert ... dml_jax's value against expected["value"] ...

`compute` runs the real library (imported inside it, never at module level) and returns a flat dict of
numpy arrays (scalars and strings are fine). The fixture runs every such test twice:

  * `[file]` (the default run): the dict is read from tests/references/<name>.npz; `compute` is not called.
  * `[live]` (marked `parity`, run with `pytest -m parity` after `pip install -e '.[parity]'`): `compute`
    runs, its result is compared with the committed file (a stale or missing file fails) and the test
    asserts against the live result.

`python tests/make_references.py [pytest node ids]` reruns the live variants and rewrites the files they ask for.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent / "references"
# Set by tests/make_references.py: live computations overwrite the committed files instead of checking them.
WRITE_ENV = "DML_JAX_WRITE_REFERENCES"
# A live result agrees with its file when every float differs by at most this fraction of the array's largest
# magnitude, plus STALE_ATOL. The same library versions do not reproduce their outputs bit for bit across CPUs:
# torch's kernels round differently on AVX-512 and AVX2 machines. Between an Intel Xeon and an AMD EPYC,
# BN-Inception's running variances after 20 training-mode batches moved by 1.2e-5 (relative), and parameters
# after an Adam step moved by up to 7e-4: Adam divides a gradient that is zero up to rounding by its own
# magnitude, so the step there is +-lr either way. A changed input or library behaviour moves results by far
# more (1e-2 to 1).
STALE_RTOL = 1e-3
# A gradient that is zero up to rounding (a bias before a BatchNorm) is ~1e-9 noise whose every digit changes
# with the CPU.
STALE_ATOL = 1e-6
GENERATOR = "python tests/make_references.py"


def path_of(name: str) -> pathlib.Path:
  if not name or name.startswith("/") or ".." in name.split("/"):
    raise ValueError(f"reference name {name!r}: expected a relative name like 'losses/proxy_anchor'")
  return ROOT / f"{name}.npz"


# A file holds all entries of one dtype in one flat array (an .npz member costs ~250 bytes of headers, and a
# layout or BatchNorm reference has hundreds of small entries), plus their keys, dtypes, shapes and offsets.
def _pack(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  keys = list(values)
  dtypes = [values[k].dtype.str for k in keys]
  groups = sorted(set(dtypes))
  shapes = np.full((len(keys), max([values[k].ndim for k in keys] + [1])), -1, np.int64)
  offsets = np.zeros(len(keys), np.int64)
  chunks: dict[str, list[np.ndarray]] = {d: [] for d in groups}
  for i, key in enumerate(keys):
    value = values[key]
    shapes[i, :value.ndim] = value.shape
    offsets[i] = sum(c.size for c in chunks[dtypes[i]])
    chunks[dtypes[i]].append(value.ravel())
  packed = {"keys": np.asarray(keys, str), "dtypes": np.asarray(dtypes, str), "shapes": shapes, "offsets": offsets}
  for j, dtype in enumerate(groups):
    packed[f"data_{j}"] = np.concatenate(chunks[dtype]).astype(dtype)
  return packed


def _unpack(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  groups = sorted(set(packed["dtypes"].tolist()))
  out = {}
  for key, dtype, shape, offset in zip(packed["keys"].tolist(), packed["dtypes"].tolist(), packed["shapes"],
                                       packed["offsets"]):
    shape = tuple(int(n) for n in shape if n >= 0)
    size = int(np.prod(shape))
    data = packed[f"data_{groups.index(dtype)}"]
    out[key] = data[int(offset):int(offset) + size].reshape(shape).copy()
  return out


def load(name: str, test: str = "") -> dict[str, np.ndarray]:
  path = path_of(name)
  if not path.is_file():
    hint = f" {test}" if test else ""
    raise FileNotFoundError(f"parity reference {path.relative_to(ROOT.parent.parent)} is missing; generate it with "
                            f"`{GENERATOR}{hint}` (needs `pip install -e '.[cpu,parity]'`)")
  with np.load(path, allow_pickle=False) as z:
    return _unpack({k: z[k] for k in z.files})


def save(name: str, values: Mapping[str, np.ndarray]) -> pathlib.Path:
  path = path_of(name)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **_pack(values))
  return path


def _as_arrays(name: str, values) -> dict[str, np.ndarray]:
  if not isinstance(values, Mapping):
    raise TypeError(f"reference {name!r}: compute() must return a dict of arrays, got {type(values).__name__}")
  out = {}
  for key, value in values.items():
    array = np.asarray(value)
    if array.dtype == object:
      raise TypeError(f"reference {name!r}: entry {key!r} is not a numeric or string array")
    out[str(key)] = array
  return out


def compare(name: str, live: Mapping[str, np.ndarray], stored: Mapping[str, np.ndarray]) -> list[str]:
  """Differences between a live result and its committed file, one line per mismatching entry."""
  problems = []
  if set(live) != set(stored):
    problems.append(f"entries differ: live only {sorted(set(live) - set(stored))}, "
                    f"file only {sorted(set(stored) - set(live))}")
  for key in sorted(set(live) & set(stored)):
    a, b = live[key], stored[key]
    if a.shape != b.shape:
      problems.append(f"{key}: shape {a.shape} live vs {b.shape} in the file")
    elif np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating):
      finite = np.isfinite(b)
      if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(np.isnan(a), np.isnan(b)):
        problems.append(f"{key}: non-finite entries differ")
      elif finite.any():
        scale = max(float(np.abs(b[finite]).max()), 1e-12)
        diff = float(np.abs(a[finite].astype(np.float64) - b[finite]).max())
        if diff > STALE_RTOL * scale + STALE_ATOL:
          problems.append(f"{key}: max difference {diff:.3g} > {STALE_RTOL} x {scale:.3g} + {STALE_ATOL}")
    elif not np.array_equal(a, b):
      problems.append(f"{key}: values differ")
  return problems


class References:
  """The callable behind the `ref` fixture: `ref(name, compute) -> {key: np.ndarray}`."""

  def __init__(self, mode: str, test: str = ""):
    if mode not in ("file", "live"):
      raise ValueError(f"mode must be 'file' or 'live', got {mode!r}")
    self.mode = mode
    self.test = test  # the file to name in the generator hint

  @property
  def live(self) -> bool:
    return self.mode == "live"

  def __call__(self, name: str, compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if self.mode == "file":
      return load(name, self.test)
    live = _as_arrays(name, compute())
    if os.environ.get(WRITE_ENV):
      save(name, live)
      return live
    problems = compare(name, live, load(name, self.test))
    if problems:
      raise AssertionError(f"parity reference {name!r} is stale (the live libraries give other values):\n  "
                           + "\n  ".join(problems) + f"\nregenerate it with `{GENERATOR} {self.test}`")
    return live
