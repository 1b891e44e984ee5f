"""Tiny synthetic dataset trees in every supported layout, for tests, demos and benchmarks.

Each writer creates the folders and split files a real download would have, with small generated
images, and returns what a reader must find: {split: (num_images, num_classes)} (In-Shop adds 'query'
and 'gallery'; VehicleID has 'train' and 'test_<size>').

CUB and Cars trees with fewer classes than the dataset take the first classes of each official split
(CUB ids 1.. and 101..; Cars 1.. and 99..) and declare them in `dml_jax_subset.txt`, as a partial tree
must: the readers split by class id and refuse a tree with missing classes otherwise.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

Counts = dict[str, tuple[int, int]]


def image_bytes(seed: int, size: tuple[int, int] = (12, 10), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
  """A deterministic smooth-ish image (w, h) = size, encoded as `fmt`, in PIL mode `mode`."""
  rng = np.random.default_rng(seed)
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.uniform(0, 255, 3)
  grad = rng.uniform(-4, 4, (2, 3))
  pixels = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 8, (h, w, 3))
  img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
  if mode != "RGB":
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _write(path: str, seed: int, size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(image_bytes(seed, size, fmt, mode))


def _per_class(c: int) -> int:
  return 1 + c % 3  # 1, 2, 3, 1, 2, 3 ...: uneven classes catch off-by-one splits


def split_class_ids(num_classes: int, total: int, num_train: int) -> list[int]:
  """`num_classes` official class ids: all `total` of them, or the first of each split (half train, rest test)."""
  if num_classes == total:
    return list(range(1, total + 1))
  half = num_classes // 2
  if not 1 <= half <= num_train or not 1 <= num_classes - half <= total - num_train:
    raise ValueError(f"cannot take {num_classes} classes, half from each split of {num_train} + {total - num_train}")
  return list(range(1, half + 1)) + list(range(num_train + 1, num_train + 1 + num_classes - half))


def write_subset_file(folder: str, class_ids: list[int], total: int) -> None:
  """Declares a partial tree (readers' SUBSET_FILE); nothing is written for a complete one."""
  if len(class_ids) == total:
    return
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "dml_jax_subset.txt"), "w") as f:
    f.write("# class ids of this partial tree (written by dml_jax.data.synthetic)\n")
    f.writelines(f"{c}\n" for c in class_ids)


def class_folders(root: str, dirname: str, class_names: list[str], *, images_per_class: Callable[[int], int] =
                  _per_class, size: tuple[int, int] = (12, 10), ext: str = ".jpg") -> Counts:
  """<root>/<dirname>/images/<class>/<i>.jpg; the first half of `class_names` must be the training classes."""
  counts = [images_per_class(c) for c in range(len(class_names))]
  for c, name in enumerate(class_names):
    for i in range(counts[c]):
      fmt = "PNG" if ext == ".png" else "JPEG"
      _write(os.path.join(root, dirname, "images", name, f"img_{c:03d}_{i}{ext}"), c * 100 + i, size, fmt)
  half = len(class_names) // 2
  return {"train": (sum(counts[:half]), half), "eval": (sum(counts[half:]), len(class_names) - half)}


def cub_folders(root: str, dirname: str = "cub200", num_classes: int = 200, **kw) -> Counts:
  """CUB class folders 'NNN.Bird_Name' (1-based, zero padded); fewer than 200: ids 1.. and 101.. (a subset)."""
  ids = split_class_ids(num_classes, 200, 100)
  write_subset_file(os.path.join(root, dirname), ids, 200)
  return class_folders(root, dirname, [f"{c:03d}.Bird_{c}" for c in ids], **kw)


def cars_class_names(num_classes: int = 196) -> list[str]:
  """Folder names of `num_classes` Cars196 classes (the real class names), ids 1.. and 99.. for a subset."""
  from dml_jax.data.readers import cars_classes

  return [cars_classes.folder_name(c) for c in split_class_ids(num_classes, 196, 98)]


def cars_folders(root: str, dirname: str = "cars196", num_classes: int = 196, **kw) -> Counts:
  write_subset_file(os.path.join(root, dirname), split_class_ids(num_classes, 196, 98), 196)
  return class_folders(root, dirname, cars_class_names(num_classes), **kw)


def cars_annos(root: str, dirname: str = "cars196", num_classes: int = 196, size: tuple[int, int] = (12, 10)
               ) -> Counts:
  """car_ims/NNNNNN.jpg + cars_annos.mat (struct array 'annotations' as the official file)."""
  import scipy.io

  folder = os.path.join(root, dirname)
  ids = split_class_ids(num_classes, 196, 98)
  write_subset_file(folder, ids, 196)
  classes = [c for c in ids for _ in range(_per_class(c))]
  order = np.random.default_rng(0).permutation(len(classes))  # the file interleaves classes
  classes = [classes[i] for i in order]
  dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
           ("class", "O"), ("test", "O")]
  annos = np.zeros((1, len(classes)), dtype=dtype)
  for i, c in enumerate(classes):
    rel = f"car_ims/{i + 1:06d}.jpg"
    _write(os.path.join(folder, rel), i, size)
    annos[0, i] = (rel, np.array([[1]], np.uint8), np.array([[1]], np.uint8), np.array([[5]], np.uint8),
                   np.array([[5]], np.uint8), np.array([[c]], np.uint8), np.array([[i % 2]], np.uint8))
  scipy.io.savemat(os.path.join(folder, "cars_annos.mat"),
                   {"annotations": annos, "class_names": np.array([[f"class {c}" for c in range(num_classes)]],
                                                                   dtype=object)})
  half = num_classes // 2
  return {"train": (sum(c <= 98 for c in classes), half), "eval": (sum(c > 98 for c in classes), num_classes - half)}


def sop(root: str, dirname: str = "sop", *, info_files: bool = True, num_train_classes: int = 7,
        num_test_classes: int = 6, size: tuple[int, int] = (12, 10)) -> Counts:
  """Ebay_{train,test}.txt (in Info_Files/ with images/ beside it, or flat as the official zip)."""
  folder = os.path.join(root, dirname)
  list_dir = os.path.join(folder, "Info_Files") if info_files else folder
  image_dir = os.path.join(folder, "images") if info_files else folder
  os.makedirs(list_dir, exist_ok=True)
  supers = ["bicycle", "cabinet", "chair"]
  image_id, counts = 1, {}
  for split, classes in (("train", range(1, num_train_classes + 1)),
                         ("test", range(num_train_classes + 1, num_train_classes + num_test_classes + 1))):
    lines = ["image_id class_id super_class_id path"]
    n = 0
    for class_id in classes:
      s = class_id % 3
      for k in range(_per_class(class_id) + 1):
        rel = f"{supers[s]}_final/{100000 + class_id}_{k}.JPG"
        _write(os.path.join(image_dir, rel), image_id, size)
        lines.append(f"{image_id} {class_id} {s + 1} {rel}")
        image_id += 1
        n += 1
    with open(os.path.join(list_dir, f"Ebay_{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
    counts["train" if split == "train" else "eval"] = (n, len(classes))
  return counts


def inshop(root: str, dirname: str = "inshop", *, official: bool = False, num_train_items: int = 5,
           num_eval_items: int = 4, size: tuple[int, int] = (12, 10)) -> Counts:
  """list_eval_partition.txt + img/ (VPTSP), or Eval/ + Img/img/ (official archive)."""
  folder = os.path.join(root, dirname)
  list_path = os.path.join(folder, "Eval", "list_eval_partition.txt") if official else os.path.join(
      folder, "list_eval_partition.txt")
  image_base = os.path.join(folder, "Img") if official else folder
  rows = []
  # Train and eval items interleave in id order, with sparse ids: the reader must re-index each split.
  ids = [3 * k + 1 for k in range(2 * max(num_train_items, num_eval_items))]
  train_items, eval_items = ids[0::2][:num_train_items], ids[1::2][:num_eval_items]
  for k, item in enumerate(sorted(train_items + eval_items)):
    for v in range(2 + k % 2):
      name = f"img/WOMEN/Dresses/id_{item:08d}/{v:02d}_1_front.jpg"
      status = "train" if item in train_items else ("query" if v == 0 else "gallery")
      rows.append((name, f"id_{item:08d}", status))
  for i, (name, _, _) in enumerate(rows):
    _write(os.path.join(image_base, name), i, size)
  os.makedirs(os.path.dirname(list_path), exist_ok=True)
  with open(list_path, "w") as f:
    f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
    f.writelines(f"{n}   {i}   {s}\n" for n, i, s in rows)
  count = lambda st: sum(r[2] in st for r in rows)
  classes = lambda st: len({r[1] for r in rows if r[2] in st})
  return {"train": (count(("train",)), classes(("train",))), "query": (count(("query",)), classes(("query",))),
          "gallery": (count(("gallery",)), classes(("gallery",))),
          "eval": (count(("query", "gallery")), classes(("query", "gallery")))}


def inaturalist(root: str, dirname: str = "inaturalist", *, lists_subdir: str = "", num_train_classes: int = 6,
                num_test_classes: int = 4, size: tuple[int, int] = (12, 10)) -> Counts:
  """Inaturalist_{train,test}_set1.txt listing train_val2018/<Kingdom>/<id>/<hash>.jpg."""
  folder = os.path.join(root, dirname)
  kingdoms = ["Plantae", "Animalia", "Fungi"]
  counts = {}
  image = 0
  for split, classes in (("train", range(num_train_classes)),
                         ("test", range(num_train_classes, num_train_classes + num_test_classes))):
    lines = []
    for c in classes:
      for _ in range(_per_class(c)):
        rel = f"train_val2018/{kingdoms[c % 3]}/{1000 + c}/{image:032x}.jpg"
        _write(os.path.join(folder, rel), image, size)
        lines.append(rel)
        image += 1
    # Interleaved classes: labels follow the order of first appearance.
    lines = lines[1::2] + lines[0::2]
    os.makedirs(os.path.join(folder, lists_subdir), exist_ok=True)
    with open(os.path.join(folder, lists_subdir, f"Inaturalist_{split}_set1.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
    counts["train" if split == "train" else "eval"] = (len(lines), len(classes))
  return counts


def vehicleid(root: str, dirname: str = "VehicleID_V1.0", *, num_train_ids: int = 6,
              test_ids: dict[str, int] | None = None, size: tuple[int, int] = (12, 10)) -> Counts:
  """train_test_split/{train_list,test_list_800,...}.txt + image/<id>.jpg; test lists nested."""
  test_ids = test_ids or {"small": 2, "medium": 3, "large": 4}
  folder = os.path.join(root, dirname)
  os.makedirs(os.path.join(folder, "train_test_split"), exist_ok=True)
  image = 0

  def write_list(name, vehicle_ids):
    nonlocal image
    lines = []
    for v in vehicle_ids:
      for _ in range(_per_class(v) + 1):
        image_id = f"{image:07d}"
        _write(os.path.join(folder, "image", f"{image_id}.jpg"), image, size)
        lines.append(f"{image_id} {v}")
        image += 1
    with open(os.path.join(folder, "train_test_split", name), "w") as f:
      f.write("\n".join(lines) + "\n")
    return len(lines), len(vehicle_ids)

  counts = {"train": write_list("train_list.txt", [3 * v for v in range(num_train_ids)])}
  files = {"small": "test_list_800.txt", "medium": "test_list_1600.txt", "large": "test_list_2400.txt"}
  for size_name, n in test_ids.items():
    counts[f"test_{size_name}"] = write_list(files[size_name], [1000 + 7 * v for v in range(n)])
  return counts


def tfds_dataset(data_dir: str, builder_name: str, splits: dict[str, list[dict]], *, size: tuple[int, int] = (12, 10)
                 ) -> str:
  """Writes a tiny array_record tfds dataset that `tfds.data_source` reads, without TensorFlow.

  `splits` maps a split name to its examples: dicts of feature overrides (e.g. {'label': 3, 'id': 'a1'});
  other features get defaults (generated JPEG/PNG bytes for images, 0 for class labels, '' for text).
  Uses the installed builder's own feature spec and tfds' own serializer; images are pre-encoded, which
  is what lets tfds skip TensorFlow. Returns the builder's data folder.
  """
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from tensorflow_datasets.core import example_serializer, naming
  from tensorflow_datasets.core import splits as splits_lib

  builder = tfds.builder(builder_name, data_dir=data_dir, file_format="array_record")
  features = builder.info.features
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  os.makedirs(builder.data_dir, exist_ok=True)
  split_infos = []
  seed = 0
  for split, examples in splits.items():
    template = naming.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name, split=split,
                                          filetype_suffix="array_record")
    writer = ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
    num_bytes = 0
    for overrides in examples:
      example = {}
      for key, feature in features.items():
        if key in overrides:
          example[key] = overrides[key]
        elif isinstance(feature, tfds.features.Image):
          channels = feature.shape[-1]
          example[key] = image_bytes(seed, size, "JPEG" if channels == 3 else "PNG", "RGB" if channels == 3 else "L")
        elif isinstance(feature, tfds.features.ClassLabel):
          example[key] = 0
        elif isinstance(feature, tfds.features.BBoxFeature):
          example[key] = tfds.features.BBox(0.1, 0.1, 0.9, 0.9)
        else:
          example[key] = ""
      seed += 1
      serialized = serializer.serialize_example(features.encode_example(example))
      num_bytes += len(serialized)
      writer.write(serialized)
    writer.close()
    split_infos.append(splits_lib.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=num_bytes,
                                            filename_template=template))
  builder.info.set_splits(splits_lib.SplitDict(split_infos))
  builder.info.set_file_format("array_record")
  builder.info.write_to_directory(builder.data_dir)
  return str(builder.data_dir)


_SHAPES = ("disc", "square", "triangle", "ring", "bars", "cross", "diamond", "dots")


def picture(class_index: int, seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
  """A small RGB picture whose class shows: a shape and hue per class, placed and tinted at random per image.

  Class c draws shape `_SHAPES[c % 8]` in a hue spread over the colour wheel by c (golden-ratio steps), on a
  noisy background of the complementary hue; position, scale, rotation and brightness vary with `seed`.
  Classes therefore differ in colour and form as photos of different things do, while images of one class
  are not copies of each other.
  """
  import colorsys

  from PIL import ImageDraw, ImageFilter

  rng = np.random.default_rng([class_index, seed])
  w, h = size
  hue = (class_index * 0.618034) % 1.0
  fg = np.array(colorsys.hsv_to_rgb(hue, 0.75, rng.uniform(0.75, 1.0))) * 255
  bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.25, rng.uniform(0.3, 0.55))) * 255
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  shade = (xx / w - 0.5) * rng.uniform(-40, 40) + (yy / h - 0.5) * rng.uniform(-40, 40)
  pixels = bg + shade[..., None] + rng.normal(0, 10, (h, w, 3))
  img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(img)
  r = min(w, h) * rng.uniform(0.25, 0.4)
  cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
  color = tuple(int(v) for v in fg)
  shape = _SHAPES[class_index % len(_SHAPES)]
  angle = rng.uniform(0, 2 * np.pi)
  if shape == "disc":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
  elif shape == "ring":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(2, int(r / 3)))
  elif shape in ("square", "triangle"):
    corners = 4 if shape == "square" else 3
    draw.polygon([(cx + r * np.cos(angle + 2 * np.pi * k / corners), cy + r * np.sin(angle + 2 * np.pi * k / corners))
                  for k in range(corners)], fill=color)
  elif shape == "diamond":  # a tall rhombus, tilted a little: unlike the square, its axes stay put
    tilt = rng.uniform(-0.3, 0.3)
    c, s = np.cos(tilt), np.sin(tilt)
    draw.polygon([(cx + r * (sx * c - sy * s), cy + r * (sx * s + sy * c))
                  for sx, sy in ((0.6, 0), (0, 1.2), (-0.6, 0), (0, -1.2))], fill=color)
  elif shape == "bars":
    step = max(4, int(r / 2))
    for x in range(int(cx - 2 * r), int(cx + 2 * r), 2 * step):
      draw.rectangle((x, cy - r, x + step - 1, cy + r), fill=color)
  elif shape == "cross":
    t = max(2, int(r / 3))
    draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=color)
    draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=color)
  else:  # dots
    for _ in range(6):
      dx, dy, s = rng.uniform(-r, r), rng.uniform(-r, r), r / 4
      draw.ellipse((cx + dx - s, cy + dy - s, cx + dx + s, cy + dy + s), fill=color)
  return img.filter(ImageFilter.GaussianBlur(0.6))


def picture_folder(root: str, class_names: list[str], images_per_class: int | Callable[[int], int] = 6, *,
                   size: tuple[int, int] = (64, 48), ext: str = ".jpg", seed: int = 0) -> dict[str, list[str]]:
  """Writes `<root>/<class>/<class>_<i><ext>` pictures (see `picture`); returns {class: [paths]} in class order.

  The layout of the `folder` dataset and of `python -m dml_jax.retrieve build --images`.
  """
  out = {}
  for c, name in enumerate(class_names):
    n = images_per_class(c) if callable(images_per_class) else images_per_class
    paths = []
    for i in range(n):
      path = os.path.join(root, name, f"{name}_{i:03d}{ext}")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      img = picture(c, seed * 100_003 + i, size)
      img.save(path, **({"quality": 92} if ext in (".jpg", ".jpeg") else {}))
      paths.append(path)
    out[name] = paths
  return out
