"""Images/s of the training input pipeline (decode, RandomResizedCrop + flip, normalise, batch).

Side by side, on the same synthetic JPEG tree (generated at run time, CUB folder layout):
  dml_jax raw folders      make_train_loader over JPEG files (grain threads), with and without JPEG drafts
  dml_jax prepared shards  the same over ArrayRecord shards written by `prepare` (shorter side 256)
  torchvision              torch DataLoader + ImageFolder-style PIL loading + torchvision transforms,
                           the seeds' pipeline (when torch/torchvision are installed)

Each pass builds a fresh loader and reads --batches batches, over as many epochs as that takes (a new epoch
restarts the loader's workers, as in training); the first batch (startup: workers, first decodes) is timed
apart, the other batches give the pass's steady images/s. Reported: min / median / max over --repeats passes,
the pipelines interleaved pass by pass so that load changes hit them alike.

  python benchmarks/input_pipeline.py --out docs/benchmarks/input_pipeline.md
  python benchmarks/input_pipeline.py --quick      # tiny sizes: checks that it runs (CI)
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from dml_jax.data import load_dataset, make_train_loader, prepare, synthetic  # noqa: E402
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg  # noqa: E402


def write_tree(root: str, num_images: int, num_classes: int, seed: int = 0) -> None:
  """CUB-layout JPEGs of about 500x375 (sizes vary like CUB's), smooth content plus sensor-like noise.

  Fewer than 200 classes take the first of each official split (the readers split CUB by class id) and
  declare them in the subset file, as a partial tree must.
  """
  rng = np.random.default_rng(seed)
  class_ids = synthetic.split_class_ids(num_classes, 200, 100)
  synthetic.write_subset_file(os.path.join(root, "cub200"), class_ids, 200)
  noise = rng.normal(0, 6, (520, 520, 3)).astype(np.float32)  # one field, cropped at random offsets
  for i in range(num_images):
    c = class_ids[i % num_classes]
    folder = os.path.join(root, "cub200", "images", f"{c:03d}.class_{c}")
    os.makedirs(folder, exist_ok=True)
    w, h = (500, int(rng.integers(300, 400))) if rng.random() < 0.7 else (int(rng.integers(300, 400)), 500)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    dy, dx = rng.integers(0, 520 - h + 1), rng.integers(0, 520 - w + 1)
    pixels = np.clip(np.asarray(img, np.float32) + noise[dy:dy + h, dx:dx + w], 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def time_batches(epochs, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(steady-state images/s after the first batch, seconds to the first batch) over `num_batches` batches of
  the iterables `epochs` yields (one per epoch, consumed in turn)."""
  start = time.perf_counter()
  it = itertools.chain.from_iterable(epochs)
  next(it)
  first = time.perf_counter() - start
  t0 = time.perf_counter()
  for _ in range(num_batches - 1):
    next(it)
  return (num_batches - 1) * batch_size / (time.perf_counter() - t0), first


def bench_dml_jax(records, args, **kw) -> tuple[float, float]:
  cfg = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  loader = make_train_loader(records, batch_size=args.batch_size, pretrained_cfg=cfg, image_size=args.image_size,
                             sampler="random", seed=0, num_threads=args.num_threads, **kw)
  return time_batches((loader.epoch(e) for e in itertools.count()), args.batches, args.batch_size)


def bench_torchvision(records, args) -> tuple[float, float] | None:
  try:
    import torch
    from torchvision import transforms as T
  except ImportError:
    return None
  torch.set_num_threads(1)

  class Folder(torch.utils.data.Dataset):
    # The seeds' dataset: PIL open + convert('RGB') + torchvision transforms.
    def __init__(self, paths, labels):
      self.paths, self.labels = list(paths), list(labels)
      self.transform = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                                  T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
      return len(self.paths)

    def __getitem__(self, i):
      with Image.open(self.paths[i]) as img:
        return self.transform(img.convert("RGB")), self.labels[i]

  loader = torch.utils.data.DataLoader(Folder(records.paths, records.labels), batch_size=args.batch_size,
                                       shuffle=True, drop_last=True, num_workers=args.torch_workers)
  return time_batches(itertools.repeat(loader), args.batches, args.batch_size)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=2000, help="JPEGs in the tree (half of them train)")
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batches", type=int, default=48, help="batches read per pass (first one timed apart)")
  parser.add_argument("--num_threads", type=int, default=2, help="grain read threads")
  parser.add_argument("--torch_workers", type=int, default=2, help="torch DataLoader worker processes")
  parser.add_argument("--repeats", type=int, default=5, help="passes per pipeline")
  parser.add_argument("--workdir", default=None, help="where to generate the tree (default: a temp dir)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (96 images, 64 px, 4 batches, 1 pass)")
  parser.add_argument("--out", default=None, help="write the markdown section here")
  args = parser.parse_args()
  if args.quick:
    args.num_images, args.num_classes, args.batch_size, args.image_size = 96, 8, 8, 64
    args.batches, args.repeats, args.torch_workers, args.num_threads = 4, 1, 1, 1

  stamp = common.stamp()
  workdir = args.workdir or tempfile.mkdtemp(prefix="dml_jax_bench_")
  try:
    t0 = time.perf_counter()
    write_tree(workdir, args.num_images, args.num_classes)
    gen_s = time.perf_counter() - t0
    tree_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(workdir, "cub200"))
                  for f in files if f.endswith(".jpg")) / 2**20
    raw = load_dataset("cub200", workdir, source="raw")
    records = raw.train
    train_mb = sum(os.path.getsize(p) for p in records.paths) / 2**20
    t0 = time.perf_counter()
    prepare("cub200", workdir, os.path.join(workdir, "prepared"), shorter_side=256, num_threads=args.num_threads)
    prep_s = time.perf_counter() - t0
    prepared = load_dataset("cub200", os.path.join(workdir, "prepared"), source="prepared").train
    shards = os.path.join(workdir, "prepared", "cub200")
    prep_mb = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards)
                  if f.startswith("train-")) / 2**20

    # torchvision first in every round: its DataLoader forks workers, best before grain starts threads.
    pipelines = [
        (f"torchvision + torch DataLoader ({args.torch_workers} workers), raw JPEG folders",
         lambda: bench_torchvision(records, args)),
        ("dml_jax, raw JPEG folders, draft decoding", lambda: bench_dml_jax(records, args, fast_decode=True)),
        ("dml_jax, raw JPEG folders, full decoding", lambda: bench_dml_jax(records, args, fast_decode=False)),
        ("dml_jax, prepared ArrayRecord shards (256 px)", lambda: bench_dml_jax(prepared, args)),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in pipelines}
    for _ in range(args.repeats):
      for name, fn in pipelines:
        result = fn()
        if result is None:
          results.pop(name, None)
          continue
        results[name].append(result)
        print(f"{name}: {result[0]:.0f} images/s (first batch {result[1]:.2f} s)", flush=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  skipped = [name for name, _ in pipelines if name not in results]
  rows = [(name, common.fmt_spread([r[0] for r in runs], 0), common.fmt_spread([r[1] for r in runs], 2))
          for name, runs in results.items()]
  body = common.stamp_lines(stamp) + [
      "",
      f"Train pipeline: decode + RandomResizedCrop({args.image_size}) + flip + normalise + batch {args.batch_size}, "
      f"float32 output. Data: a synthetic CUB-layout tree of {args.num_images} JPEGs of about 500x375 "
      f"({tree_mb:.1f} MiB, generated in {gen_s:.1f} s); the pipelines read its training split, "
      f"{len(records)} images ({train_mb:.1f} MiB as JPEGs, {prep_mb:.1f} MiB as prepared shards; `prepare` wrote "
      f"both splits in {prep_s:.1f} s). grain threads: {args.num_threads}. Each pass reads {args.batches} batches "
      f"({args.batches * args.batch_size / max(len(records), 1):.1f} epochs); {args.repeats} passes per pipeline.",
      "",
      *common.table(["pipeline", "images/s after the first batch, min / median / max",
                     "first batch s, min / median / max"], rows, "lrr"),
      "",
      "Draft decoding lets libjpeg decode at 1/2-1/8 scale when the random crop keeps enough pixels; prepared "
      "shards hold images already shrunk to a 256-pixel shorter side, so an epoch decodes fewer pixels and reads "
      "one sequential file.",
  ]
  if skipped:
    body += ["", f"Not run (torch / torchvision not installed): {', '.join(skipped)}."]
  common.write_section(args.out, "Input pipeline throughput", body)


if __name__ == "__main__":
  main()
