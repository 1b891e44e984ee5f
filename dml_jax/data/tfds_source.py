"""Reading already-prepared tensorflow-datasets (array_record) and re-splitting them by class.

tfds splits these datasets per image (CUB's official train_test_split, Cars' devkit split); DML
splits them by class. Without TensorFlow tfds can still read array_record datasets
(`builder.as_data_source`), but cannot build them; nothing here downloads.

| dataset     | tfds builder               | DML split                                                         |
| cub200      | caltech_birds2011          | train+test pooled; label < 100 train, >= 100 test                 |
| cars196     | cars196                    | train+test pooled; label < 98 train, >= 98 test                   |
| sop         | stanford_online_products   | tfds train = Ebay_train.txt, test = Ebay_test.txt                 |
| inaturalist | i_naturalist2018           | train+validation, selected and labelled by the Smooth-AP split    |
|             |                            | lists (`id` = file stem) read from data_root                     |

Scanning labels reads every record once (images not decoded); the result is cached under
~/.cache/dml_jax/tfds_index keyed by the shard files' sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent import futures
from typing import Any

import numpy as np

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, Records, contiguous_labels

TFDS_NAMES = {"cub200": "caltech_birds2011", "cars196": "cars196", "sop": "stanford_online_products",
              "inaturalist": "i_naturalist2018"}
_LABEL_KEY = {"cub200": "label", "cars196": "label", "sop": "class_id", "inaturalist": "label"}
_NAME_KEY = {"cub200": "image/filename", "cars196": "id", "sop": None, "inaturalist": "id"}
_NUM_TRAIN_CLASSES = {"cub200": 100, "cars196": 98}
_SPLITS = {"cub200": ("train", "test"), "cars196": ("train", "test"), "sop": ("train", "test"),
           "inaturalist": ("train", "validation")}


def _prepare_hint(builder_name: str, data_dir: str) -> str:
  manual = ""
  if builder_name == "cars196":
    manual = (" Its download URLs are dead (tensorflow/datasets issues #4932, #5053): put the archives in a "
              "manual_dir and pass --manual_dir.")
  return (f"Prepare it where TensorFlow is installed, e.g. `pip install tensorflow-cpu tensorflow-datasets && "
          f"tfds build {builder_name} --data_dir {data_dir} --file_format array_record`, then copy "
          f"{data_dir}/{builder_name} here.{manual} Or read the raw folders (source='raw') or write "
          "TensorFlow-free shards with `python -m dml_jax.data prepare`.")


class TfdsStore:
  """Encoded images of tfds records; data sources open lazily (again in worker processes)."""

  def __init__(self, builder_name: str, data_dir: str, splits: tuple[str, ...], rows: np.ndarray):
    self.builder_name, self.data_dir, self.splits = builder_name, data_dir, splits
    self.rows = rows  # int64 [N, 2]: (split position in `splits`, index within the split)
    self._sources = None

  def _open(self):
    if self._sources is None:
      self._sources = open_sources(self.builder_name, self.data_dir, self.splits)
    return self._sources

  def __len__(self) -> int:
    return len(self.rows)

  def read(self, i: int) -> bytes:
    split, index = self.rows[i]
    return self._open()[int(split)][int(index)]["image"]

  def __getstate__(self):
    return {**self.__dict__, "_sources": None}


def _builder(builder_name: str, data_dir: str, dataset: str):
  import tensorflow_datasets as tfds

  builder = tfds.builder(builder_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DatasetLayoutError(dataset, f"tfds dataset {builder_name!r} is not prepared in {data_dir} (no "
                             f"{builder.data_dir}/dataset_info.json). Nothing is downloaded. "
                             + _prepare_hint(builder_name, data_dir), looked_at=[str(builder.data_dir)])
  if "array_record" not in str(builder.info.file_format).lower():
    raise DatasetLayoutError(dataset, f"tfds dataset {builder_name!r} in {builder.data_dir} is stored as "
                             f"{builder.info.file_format}; random access needs array_record. "
                             + _prepare_hint(builder_name, data_dir))
  return builder


def open_sources(builder_name: str, data_dir: str, splits: tuple[str, ...]) -> list[Any]:
  """tfds data sources of `splits` whose image features stay encoded bytes (we decode with drafts)."""
  import tensorflow_datasets as tfds

  builder = _builder(builder_name, data_dir, builder_name)
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    raise DatasetLayoutError(builder_name, f"tfds dataset in {builder.data_dir} lacks split(s) {missing}; it has "
                             f"{list(builder.info.splits)}")
  return [builder.as_data_source(split=s, decoders=decoders) for s in splits]


def _fingerprint(builder) -> str:
  h = hashlib.sha1(str(builder.data_dir).encode())
  for entry in sorted(os.scandir(str(builder.data_dir)), key=lambda e: e.name):
    if entry.is_file():
      st = entry.stat()
      h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def _scan(source, label_key: str, name_key: str | None, num_threads: int) -> tuple[np.ndarray, list[str]]:
  """(labels int64 [n], names [n]) of every record of one split."""
  n = len(source)
  chunks = [range(s, min(n, s + 512)) for s in range(0, n, 512)]

  def read(chunk):
    rows = source.__getitems__(list(chunk))
    return ([int(r[label_key]) for r in rows],
            [(r[name_key].decode() if isinstance(r[name_key], bytes) else str(r[name_key])) if name_key else ""
             for r in rows])

  labels, names = [], []
  with futures.ThreadPoolExecutor(num_threads) as pool:
    for chunk_labels, chunk_names in pool.map(read, chunks):
      labels.extend(chunk_labels)
      names.extend(chunk_names)
  return np.asarray(labels, np.int64), names


def _index(dataset: str, builder, sources, splits, num_threads: int, cache_dir: str | None):
  """Per split (labels, names), from the cache when the shards are unchanged."""
  cache_file = None
  if cache_dir:
    cache_file = os.path.join(cache_dir, f"{builder.name}-{builder.version}-{_fingerprint(builder)}.json")
    if os.path.isfile(cache_file):
      with open(cache_file) as f:
        cached = json.load(f)
      if all(s in cached and len(cached[s]["labels"]) == len(src) for s, src in zip(splits, sources)):
        return [(np.asarray(cached[s]["labels"], np.int64), cached[s]["names"]) for s in splits]
  common.log.info("dataset %r: scanning labels of tfds %s (%s records, once)", dataset, builder.name,
                  [len(s) for s in sources])
  result = [_scan(src, _LABEL_KEY[dataset], _NAME_KEY[dataset], num_threads) for src in sources]
  if cache_file:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{cache_file}.{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump({s: {"labels": labels_.tolist(), "names": n} for s, (labels_, n) in zip(splits, result)}, f)
      os.replace(tmp, cache_file)
    except OSError as e:
      common.log.warning("cannot cache the tfds label index in %s: %s", cache_dir, e)
  return result


def default_cache_dir() -> str:
  from dml_jax.data.digits import default_root

  return os.path.join(default_root(), "tfds_index")


def read_tfds(dataset: str, tfds_data_dir: str | None, *, data_root: str | None = None, skip_corrupt: bool = False,
              num_threads: int = 8, cache_dir: str | None = "default") -> DatasetSplits:
  """DML splits of a prepared tfds dataset (see the module docstring for each dataset's rule)."""
  if dataset not in TFDS_NAMES:
    raise DatasetLayoutError(dataset, f"no tensorflow-datasets builder covers it; tfds covers {sorted(TFDS_NAMES)}")

  data_dir = os.path.abspath(os.path.expanduser(tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
                                                or "~/tensorflow_datasets"))
  builder_name, splits = TFDS_NAMES[dataset], _SPLITS[dataset]
  builder = _builder(builder_name, data_dir, dataset)
  sources = open_sources(builder_name, data_dir, splits)
  index = _index(dataset, builder, sources, splits, num_threads,
                 default_cache_dir() if cache_dir == "default" else cache_dir)
  split_of = np.concatenate([np.full(len(labels_), k, np.int64) for k, (labels_, _) in enumerate(index)])
  idx_in = np.concatenate([np.arange(len(labels_), dtype=np.int64) for labels_, _ in index])
  labels = np.concatenate([labels_ for labels_, _ in index])
  names = [n for _, ns in index for n in ns]
  refs = [f"tfds:{builder_name}/{splits[s]}[{i}]" + (f" {n}" if n else "") for s, i, n in zip(split_of, idx_in,
                                                                                                names)]
  label_feature = builder.info.features[_LABEL_KEY[dataset]]
  label_names = list(getattr(label_feature, "names", []) or [])

  def make(rows: np.ndarray, role: str, keys=None, key_names=None) -> Records:
    store = TfdsStore(builder_name, data_dir, splits, np.stack([split_of[rows], idx_in[rows]], axis=1))
    if keys is None:
      kept, new_labels = np.unique(labels[rows], return_inverse=True)
      class_names = [label_names[c] if c < len(label_names) else str(c) for c in kept]
    else:
      new_labels, class_names = keys, key_names
    return Records(store, labels=new_labels, roles=role, paths=[refs[r] for r in rows], class_names=class_names)

  if dataset in _NUM_TRAIN_CLASSES:
    # Raw-reader order: by class, then by file name within the class.
    order = sorted(range(len(labels)), key=lambda r: (labels[r], os.path.basename(names[r]), split_of[r], idx_in[r]))
    order = np.asarray(order, np.int64)
    cut = _NUM_TRAIN_CLASSES[dataset]
    train, test = make(order[labels[order] < cut], "train"), make(order[labels[order] >= cut], "test")
  elif dataset == "sop":
    train, test = make(np.flatnonzero(split_of == 0), "train"), make(np.flatnonzero(split_of == 1), "test")
  else:
    train, test = _inaturalist_splits(data_root, names, make, skip_missing=skip_corrupt)
  splits_out = DatasetSplits(dataset, train, test, layout=f"tfds {builder_name} {builder.version}",
                             root=str(builder.data_dir))
  if skip_corrupt:
    splits_out.train = common.drop_corrupt(dataset, splits_out.train, "train", num_threads=num_threads)
    splits_out.eval = common.drop_corrupt(dataset, splits_out.eval, "eval", num_threads=num_threads)
  return splits_out


def _inaturalist_splits(data_root: str | None, ids: list[str], make, *, skip_missing: bool):
  """Selects and labels iNat-2018 tfds records by the Smooth-AP lists (found as the raw reader finds them)."""
  from dml_jax.data.readers import inaturalist

  def lists_only(folder):
    return inaturalist.detect(folder)

  folder, layout = common.locate("inaturalist", data_root, inaturalist.DIR_NAMES, lists_only, (
      "inaturalist/Inaturalist_{train,test}_set1.txt (the Smooth-AP split lists; tfds has the images)",))
  row_of = {i: r for r, i in enumerate(ids)}
  out = []
  for split, role in (("train", "train"), ("test", "test")):
    path = inaturalist.list_path(folder, layout, split)
    rel_paths, keys = inaturalist.read_split_list(path)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in rel_paths]
    found = [s in row_of for s in stems]
    if not all(found):
      missing = [p for p, f in zip(rel_paths, found) if not f]
      if not skip_missing:
        raise DatasetLayoutError("inaturalist", f"{len(missing)} image(s) of {path} are not in the tfds dataset "
                                 f"(matched by file stem = tfds 'id'), e.g. {missing[:5]}")
      common.log.warning("dataset 'inaturalist': skipping %d image(s) of %s not in tfds, e.g. %s", len(missing),
                         path, missing[:5])
    rows = np.asarray([row_of[s] for s, f in zip(stems, found) if f], np.int64)
    labels, classes = contiguous_labels([k for k, f in zip(keys, found) if f], order="first")
    out.append(make(rows, role, labels, classes))
  return out[0], out[1]
