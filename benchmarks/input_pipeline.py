"""Images/s of the training input pipeline (decode, RandomResizedCrop + flip, normalise, batch).

Side by side, on the same synthetic JPEG tree (generated at run time, CUB folder layout):
  dml_jax raw folders      make_train_loader over JPEG files (grain threads), with and without JPEG drafts
  dml_jax prepared shards  the same over ArrayRecord shards written by `prepare` (shorter side 256)
  torchvision              torch DataLoader + ImageFolder-style PIL loading + torchvision transforms,
                           the seeds' pipeline (when torch/torchvision are installed)

  python benchmarks/input_pipeline.py --num_images 2000 --num_threads 2 --torch_workers 2 \
      --out docs/benchmarks/input_pipeline.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def time_batches(batches, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(steady-state images/s after the first batch, seconds to the first batch)."""
  start = time.perf_counter()
  it = iter(batches)
  next(it)
  first = time.perf_counter() - start
  t0 = time.perf_counter()
  n = 0
  for _ in range(num_batches - 1):
    next(it)
    n += 1
  elapsed = time.perf_counter() - t0
  return n * batch_size / elapsed, first


def bench_dml_jax(records, args, **kw) -> tuple[float, float]:
  cfg = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  loader = make_train_loader(records, batch_size=args.batch_size, pretrained_cfg=cfg, image_size=args.image_size,
                             sampler="random", seed=0, num_threads=args.num_threads, **kw)
  return time_batches(loader.epoch(0), len(loader), args.batch_size)


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
  return time_batches(loader, len(loader), args.batch_size)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_threads", type=int, default=2, help="grain read threads")
  parser.add_argument("--torch_workers", type=int, default=2, help="torch DataLoader worker processes")
  parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per pipeline")
  parser.add_argument("--workdir", default=None, help="where to generate the tree (default: a temp dir)")
  parser.add_argument("--out", default=None, help="write the markdown table here")
  args = parser.parse_args()

  workdir = args.workdir or tempfile.mkdtemp(prefix="dml_jax_bench_")
  load_before = os.getloadavg()[0]
  try:
    t0 = time.perf_counter()
    write_tree(workdir, args.num_images, args.num_classes)
    gen_s = time.perf_counter() - t0
    raw = load_dataset("cub200", workdir, source="raw")
    records = raw.train
    t0 = time.perf_counter()
    prepare("cub200", workdir, os.path.join(workdir, "prepared"), shorter_side=256, num_threads=args.num_threads)
    prep_s = time.perf_counter() - t0
    prepared = load_dataset("cub200", os.path.join(workdir, "prepared"), source="prepared").train
    raw_mb = sum(os.path.getsize(p) for p in records.paths) / 2**20
    prep_mb = sum(os.path.getsize(os.path.join(workdir, "prepared", "cub200", f))
                  for f in os.listdir(os.path.join(workdir, "prepared", "cub200")) if f.startswith("train-")) / 2**20

    rows = []
    # torchvision first: its DataLoader forks workers, best before grain starts threads in this process.
    pipelines = [
        (f"torchvision + torch DataLoader ({args.torch_workers} workers), raw JPEG folders",
         lambda: bench_torchvision(records, args)),
        ("dml_jax, raw JPEG folders, draft decoding", lambda: bench_dml_jax(records, args, fast_decode=True)),
        ("dml_jax, raw JPEG folders, full decoding", lambda: bench_dml_jax(records, args, fast_decode=False)),
        ("dml_jax, prepared ArrayRecord shards (256 px)", lambda: bench_dml_jax(prepared, args)),
    ]
    for name, fn in pipelines:
      results = [fn() for _ in range(args.repeats)]
      if results[0] is None:
        print(f"{name}: skipped (torch not installed)")
        continue
      best = max(r[0] for r in results)
      first = min(r[1] for r in results)
      rows.append((name, best, first))
      print(f"{name}: {best:.0f} images/s (first batch {first:.2f} s)", flush=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  load_after = os.getloadavg()[0]
  command = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])
  lines = [
      "# Input pipeline throughput",
      "",
      f"Date 2026-11-23; machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
      f"shared with other jobs: 1-minute load average {load_before:.1f} before and {load_after:.1f} after the run "
      "(figures are noisy; compare rows, not runs).",
      "",
      f"Command: `{command}`",
      "",
      f"Train pipeline: decode + RandomResizedCrop({args.image_size}) + flip + normalise + batch {args.batch_size}, "
      f"float32 output. Data: {len(records)} training images of a synthetic CUB-layout tree "
      f"({args.num_images} JPEGs of about 500x375, {raw_mb:.1f} MiB; generated in {gen_s:.1f} s). Prepared shards: "
      f"{prep_mb:.1f} MiB for the training split, written in {prep_s:.1f} s (both splits). grain threads: "
      f"{args.num_threads}. Best of {args.repeats} passes, steady state after the first batch.",
      "",
      "| pipeline | images/s | first batch (s) |",
      "|---|---:|---:|",
  ]
  lines += [f"| {name} | {ips:.0f} | {first:.2f} |" for name, ips, first in rows]
  lines += ["", "Draft decoding lets libjpeg decode at 1/2-1/8 scale when the random crop keeps enough pixels; "
            "prepared shards hold images already shrunk to a 256-pixel shorter side, so an epoch decodes "
            "fewer pixels and reads one sequential file."]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
