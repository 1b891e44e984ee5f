"""Embeddings of an evaluation split saved with what is needed to look at them again (plots, retrieval).

The trainer writes the test split's embeddings under the best checkpoint to `<workdir>/embeddings/best_test.npz`
(`best_test_path`); `python -m dml_jax.plot` reads them. One `.npz` (numpy only, no pickled objects):

  embeddings    float32 [N, E]   the evaluation embeddings (the method's embed_fn: L2-normalised)
  labels        int64 [N]        class of each row, 0..C-1 within the split
  paths         str [N]          image file of each row (or the store reference of prepared / tfds data)
  roles         str [N]          'test' (leave-one-out protocols) or 'query' / 'gallery' (In-Shop)
  class_names   str [C]          the dataset's name of each label (folder name, class id)
  protocol      str []           evaluation protocol name (dml_jax.eval.protocols), e.g. 'cub200', 'folder'
  split         str []           which split ('test', 'val')
  step, epoch   int64 []         the checkpoint's global step and epoch (-1 when unknown)
  format        str []           FORMAT, for readers to recognise the file
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

FORMAT = "dml_jax.embeddings/1"
EMBEDDINGS_DIR = "embeddings"
BEST_TEST_FILE = "best_test.npz"
_ARRAYS = ("embeddings", "labels", "paths", "roles", "class_names")


@dataclasses.dataclass
class SavedEmbeddings:
  """The contents of an embeddings file; see the module docstring for the fields."""

  embeddings: np.ndarray
  labels: np.ndarray
  paths: np.ndarray
  roles: np.ndarray
  class_names: np.ndarray
  protocol: str
  split: str = "test"
  step: int = -1
  epoch: int = -1

  def __len__(self) -> int:
    return len(self.labels)


def best_test_path(workdir: str | os.PathLike) -> pathlib.Path:
  """Where the trainer keeps the best checkpoint's test embeddings: `<workdir>/embeddings/best_test.npz`."""
  return pathlib.Path(workdir) / EMBEDDINGS_DIR / BEST_TEST_FILE


def _check(e: SavedEmbeddings, where: str) -> SavedEmbeddings:
  n = len(e.labels)
  if e.embeddings.ndim != 2 or e.embeddings.shape[0] != n:
    raise ValueError(f"{where}: embeddings must be [N, E] with N = {n} labels, got shape {e.embeddings.shape}")
  for name in ("labels", "paths", "roles"):
    if getattr(e, name).shape != (n,):
      raise ValueError(f"{where}: {name} must have shape ({n},), one per embedding row, got "
                       f"{getattr(e, name).shape}")
  if not np.isfinite(e.embeddings).all():
    raise ValueError(f"{where}: embeddings hold NaN or Inf")
  if n and (e.labels.min() < 0 or e.labels.max() >= len(e.class_names)):
    raise ValueError(f"{where}: labels span [{e.labels.min()}, {e.labels.max()}] but there are "
                     f"{len(e.class_names)} class names")
  return e


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, labels: Sequence[int], paths: Sequence[str],
                    roles: Sequence[str], *, protocol: str, class_names: Sequence[str] | None = None,
                    split: str = "test", step: int = -1, epoch: int = -1) -> pathlib.Path:
  """Writes an embeddings file (format in the module docstring), atomically; returns its path.

  Args:
    embeddings: float [N, E]; labels: int [N]; paths, roles: str [N] (e.g. `records.paths[indices]`,
      `records.roles[indices]` for the rows `embed_dataset` returned); protocol: the evaluation protocol;
    class_names: str [C] (`records.class_names`); default the label numbers.
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  if class_names is None:
    class_names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
  saved = _check(SavedEmbeddings(np.asarray(embeddings, np.float32), labels, np.asarray(paths, str).reshape(-1),
                                 np.asarray(roles, str).reshape(-1), np.asarray(class_names, str).reshape(-1),
                                 str(protocol), str(split), int(step), int(epoch)), os.fspath(path))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(tmp, format=np.asarray(FORMAT), protocol=np.asarray(saved.protocol), split=np.asarray(saved.split),
           step=np.asarray(saved.step, np.int64), epoch=np.asarray(saved.epoch, np.int64),
           **{name: getattr(saved, name) for name in _ARRAYS})
  os.replace(tmp, path)
  return path


def load_embeddings(path: str | os.PathLike) -> SavedEmbeddings:
  """Reads a file written by `save_embeddings`; a missing or foreign file stops with what was expected."""
  path = pathlib.Path(path)
  expected = (f"an .npz written by dml_jax.eval.saved.save_embeddings (format {FORMAT!r}: "
              + ", ".join(_ARRAYS) + ", protocol, split, step, epoch)")
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; expected {expected}")
  try:
    with np.load(path, allow_pickle=False) as z:
      contents = {k: z[k] for k in z.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not readable as .npz ({e}); expected {expected}") from e
  missing = [k for k in (*_ARRAYS, "format", "protocol") if k not in contents]
  if missing or str(contents["format"]) != FORMAT:
    raise ValueError(f"{path} lacks {missing or ['format ' + repr(FORMAT)]}; expected {expected}")
  return _check(SavedEmbeddings(
      contents["embeddings"].astype(np.float32, copy=False), contents["labels"].astype(np.int64, copy=False),
      contents["paths"].astype(str), contents["roles"].astype(str), contents["class_names"].astype(str),
      str(contents["protocol"]), str(contents.get("split", "test")), int(contents.get("step", -1)),
      int(contents.get("epoch", -1))), str(path))
