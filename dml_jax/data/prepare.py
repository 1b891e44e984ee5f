"""Prepared datasets: ArrayRecord shards of shrunk JPEGs, written without TensorFlow.

`prepare(name, data_root, out)` reads the raw folders and writes `<out>/<name>/`:
  dml_jax_prepared.json                 manifest: format, dataset, shorter side, splits, shard files
  <split>.index.npz                     labels int64 [N], roles str [N], paths str [N], class_names str [C]
  <split>-NNNNN-of-MMMMM.array_record   one msgpack map per record (group_size:1, random access):
                                        {'image': bytes, 'label': int, 'role': str, 'path': str}
Images whose shorter side exceeds `shorter_side` are resized to it (torchvision Resize rounding,
bilinear, antialiased) and stored as JPEG; smaller JPEG/PNG images are stored byte for byte, so the
prepared records decode to exactly the raw pixels. Splits: 'train' and 'eval' (VehicleID: 'train' and
one 'test_<size>' per test list).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from concurrent import futures
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from dml_jax.data import decode, transforms
from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.records import DatasetSplits, Records
from dml_jax.errors import UserFileExistsError

log = logging.getLogger("dml_jax.data")

FORMAT = "dml_jax.prepared/1"
MANIFEST = "dml_jax_prepared.json"
_KEEP_FORMATS = ("JPEG", "PNG")


class PreparedStore:
  """Encoded images of one prepared split; the ArrayRecord reader opens lazily (and again in workers)."""

  def __init__(self, files: list[str]):
    self.files = list(files)
    self._source = None

  def _reader(self):
    if self._source is None:
      from array_record.python.array_record_data_source import ArrayRecordDataSource
      self._source = ArrayRecordDataSource(self.files)
    return self._source

  def __len__(self) -> int:
    return len(self._reader())

  def read(self, i: int) -> bytes:
    return msgpack.unpackb(self._reader()[i], raw=False)["image"]

  def read_record(self, i: int) -> dict[str, Any]:
    return msgpack.unpackb(self._reader()[i], raw=False)

  def __getstate__(self):
    return {"files": self.files, "_source": None}


def dataset_dir(out: str, name: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(out)), name)


def find_prepared(data_root: str | None, name: str) -> str | None:
  """The prepared folder of `name` under data_root (`<root>/<name>/` or `<root>` itself), or None."""
  if data_root is None:
    return None
  root = os.path.abspath(os.path.expanduser(data_root))
  for folder in (os.path.join(root, name), root):
    manifest = os.path.join(folder, MANIFEST)
    if os.path.isfile(manifest):
      with open(manifest) as f:
        if json.load(f).get("dataset") == name:
          return folder
  return None


def _encode(records: Records, i: int, shorter_side: int, quality: int) -> bytes:
  source = records.read_source(i)
  ref = records.paths[i]
  with decode.open_image(source, ref) as img:
    width, height = img.size
    if min(width, height) <= shorter_side and img.format in _KEEP_FORMATS:
      if isinstance(source, bytes):
        return source
      with open(source, "rb") as f:
        return f.read()
    rgb = decode.to_rgb(img, ref)
    if min(width, height) > shorter_side:
      rgb = rgb.resize(transforms.resized_shape(width, height, shorter_side), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_split(records: Records, folder: str, split: str, *, shorter_side: int, quality: int,
                 records_per_shard: int, num_threads: int) -> dict[str, Any]:
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  n = len(records)
  num_shards = max(1, -(-n // records_per_shard))
  files = [f"{split}-{s:05d}-of-{num_shards:05d}.array_record" for s in range(num_shards)]
  chunk = 4 * records_per_shard if num_threads <= 1 else 64 * num_threads
  with futures.ThreadPoolExecutor(num_threads) as pool, tqdm(total=n, desc=f"{split}", unit="img",
                                                               disable=None) as progress:
    for s, name in enumerate(files):
      writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
      try:
        lo, hi = s * records_per_shard, min(n, (s + 1) * records_per_shard)
        # Bounded chunks: Executor.map submits everything at once and would hold every encoded image.
        for start in range(lo, hi, chunk):
          rows = range(start, min(hi, start + chunk))
          for i, payload in zip(rows, pool.map(lambda i: _encode(records, i, shorter_side, quality), rows)):
            writer.write(msgpack.packb({"image": payload, "label": int(records.labels[i]),
                                        "role": str(records.roles[i]), "path": str(records.paths[i])}))
          progress.update(len(rows))
      finally:
        writer.close()
  np.savez(os.path.join(folder, f"{split}.index.npz"), labels=records.labels, roles=records.roles,
           paths=records.paths, class_names=records.class_names)
  return {"files": files, "num_records": n, "num_classes": records.num_classes}


def prepare(name: str, data_root: str, out: str, *, shorter_side: int = 256, quality: int = 95,
            records_per_shard: int = 10000, num_threads: int = 8, skip_corrupt: bool = False,
            overwrite: bool = False) -> str:
  """Writes the prepared shards of dataset `name` (raw folders under data_root) to `<out>/<name>/`.

  Returns that folder. The shards are written to a temporary sibling and renamed at the end, so a
  folder with a manifest is always complete.
  """
  from dml_jax.data.digits import default_root, ensure_digits_tree
  from dml_jax.data.readers import read_raw

  if name == "folder":
    # Its split is made at load time (seeded, or from the run's split.json); shards would freeze one split.
    raise ValueError("the 'folder' dataset is read from its class folders; it has no prepared shards")
  if name == "digits":
    data_root = default_root() if data_root is None else data_root
    ensure_digits_tree(data_root)
  target = dataset_dir(out, name)
  if os.path.exists(os.path.join(target, MANIFEST)) and not overwrite:
    raise UserFileExistsError(f"{target} already holds a prepared {name!r}", "pass overwrite=True (--overwrite)")
  splits = read_raw(name, data_root, skip_corrupt=skip_corrupt, num_threads=num_threads)
  parts = {"train": splits.train}
  if splits.extra:
    parts.update(splits.extra)
  else:
    parts["eval"] = splits.eval
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  started = time.time()
  manifest = {"format": FORMAT, "dataset": name, "shorter_side": shorter_side, "quality": quality,
              "source": {"root": splits.root, "layout": splits.layout}, "splits": {}}
  for split, records in parts.items():
    manifest["splits"][split] = _write_split(records, tmp, split, shorter_side=shorter_side, quality=quality,
                                             records_per_shard=records_per_shard, num_threads=num_threads)
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  if os.path.exists(target):
    shutil.rmtree(target)
  os.replace(tmp, target)
  log.info("prepared %r in %.1f s: %s", name, time.time() - started,
           {k: v["num_records"] for k, v in manifest["splits"].items()})
  return target


def read_prepared(folder: str, name: str, *, vehicleid_test_size: str = "small") -> DatasetSplits:
  """Records of a prepared folder; labels, roles and class names as the raw reader gave them."""
  manifest_path = os.path.join(folder, MANIFEST)
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetLayoutError(name, f"cannot read the prepared manifest {manifest_path}: {e}") from e
  if manifest.get("format") != FORMAT or manifest.get("dataset") != name:
    raise DatasetLayoutError(name, f"{manifest_path} is format {manifest.get('format')!r} of dataset "
                             f"{manifest.get('dataset')!r}; expected {FORMAT!r} of {name!r}")

  def load(split: str) -> Records:
    info = manifest["splits"].get(split)
    if info is None:
      raise DatasetLayoutError(name, f"{manifest_path} has no split {split!r}; it has {sorted(manifest['splits'])}")
    files = [os.path.join(folder, f) for f in info["files"]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise DatasetLayoutError(name, f"prepared shards are missing: {missing}")
    with np.load(os.path.join(folder, f"{split}.index.npz"), allow_pickle=False) as index:
      labels, roles, paths, class_names = (index["labels"], index["roles"], index["paths"],
                                           index["class_names"])
    store = PreparedStore(files)
    if not len(labels) == info["num_records"] == len(store):
      raise DatasetLayoutError(name, f"{folder}: split {split!r} has {len(store)} records in its shards, "
                               f"{len(labels)} in its index and {info['num_records']} in the manifest")
    refs = [f"{p} [prepared {folder}/{split}#{i}]" for i, p in enumerate(paths)]
    return Records(store, labels=labels, roles=roles, paths=refs, class_names=class_names)

  train = load("train")
  extra = {}
  if "eval" in manifest["splits"]:
    evaluation = load("eval")
  else:
    extra = {k: load(k) for k in manifest["splits"] if k.startswith("test_")}
    key = f"test_{vehicleid_test_size}"
    if key not in extra:
      raise DatasetLayoutError(name, f"{manifest_path} has no split {key!r}; it has {sorted(manifest['splits'])}")
    evaluation = extra[key]
  return DatasetSplits(name, train, evaluation, layout=f"prepared ({manifest['shorter_side']}px)", root=folder,
                       extra=extra)
