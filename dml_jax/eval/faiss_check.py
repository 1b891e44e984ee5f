"""Guarded FAISS import: refuses a co-installation of faiss-cpu and faiss-gpu.

Both PyPI distributions install the same top-level `faiss` module, so with both present whichever
was installed last silently overwrites the other's files (a GPU build without its CUDA libraries, or
a CPU build that never sees the GPUs). pip cannot express the conflict (uv can: pyproject.toml
`tool.uv.conflicts`), so dml_jax checks the installed distributions before importing faiss.
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType

# Distribution names that provide the `faiss` module. Only the two official ones are guarded; the
# unofficial faiss-gpu-cu12 / -cu11 wheels also install `faiss` and count as a GPU build here.
_CPU_DISTRIBUTIONS = ("faiss-cpu",)
_GPU_DISTRIBUTIONS = ("faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")


class FaissConflictError(RuntimeError):
  """faiss-cpu and a faiss-gpu build are installed side by side."""


def installed_faiss_distributions() -> list[str]:
  """Names (lower case) of the installed distributions that provide the `faiss` module."""
  found = []
  for name in _CPU_DISTRIBUTIONS + _GPU_DISTRIBUTIONS:
    try:
      importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    found.append(name)
  return found


def check_single_faiss_distribution() -> None:
  """Raises FaissConflictError when a CPU and a GPU faiss distribution are both installed."""
  found = installed_faiss_distributions()
  cpu = [name for name in found if name in _CPU_DISTRIBUTIONS]
  gpu = [name for name in found if name in _GPU_DISTRIBUTIONS]
  if cpu and gpu:
    raise FaissConflictError(
        f"both {cpu + gpu} are installed; they provide the same `faiss` module and overwrite each "
        f"other's files. Uninstall one of them, e.g. `pip uninstall {cpu[0]}` on a GPU machine "
        f"(keep faiss-gpu) or `pip uninstall {gpu[0]}` on a CPU-only machine, then reinstall the "
        "one you keep (`pip install --force-reinstall ...`) to restore its files.")


def import_faiss() -> ModuleType:
  """Imports faiss after the co-installation check.

  Raises:
    FaissConflictError: faiss-cpu and faiss-gpu are both installed.
    ModuleNotFoundError: no faiss is installed (install `dml_jax[cpu]` or `dml_jax[gpu]`).
  """
  check_single_faiss_distribution()
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "the faiss backend needs FAISS: `pip install 'dml_jax[cpu]'` (faiss-cpu) or "
        "`pip install 'dml_jax[gpu]'` (faiss-gpu); or use backend='jax'", name="faiss") from error
  return faiss


def faiss_available() -> bool:
  """True when faiss can be imported (after the co-installation check, which still raises)."""
  try:
    import_faiss()
  except ModuleNotFoundError:
    return False
  return True
