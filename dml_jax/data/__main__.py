"""Command line: check a dataset's layout and counts, or write its prepared ArrayRecord shards.

  python -m dml_jax.data verify  --dataset cub200 --data_root /data [--source raw] [--check_images] [--strict]
  python -m dml_jax.data prepare --dataset cub200 --data_root /data --out /data/prepared [--shorter_side 256]

verify prints, per split, the images and classes found beside the published counts. Exit status: 0 when
the layout is recognised; 1 when images are unreadable (--check_images) or, with --strict, a count differs
from the published one; 2 with one `error:` line when the layout is not recognised, a class is missing or a
listed file is not there (--debug adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent import futures

from dml_jax import cli
from dml_jax.data import decode, load_dataset, prepare
from dml_jax.data.readers import DATASETS, get_reader
from dml_jax.data.records import DatasetSplits, Records


def _rows(splits: DatasetSplits) -> list[tuple[str, Records]]:
  rows = [("train", splits.train)]
  if splits.name == "inshop":
    for role in ("query", "gallery"):
      rows.append((role, splits.eval.subset((splits.eval.roles == role).nonzero()[0])))
  if splits.extra:
    rows.extend(sorted(splits.extra.items()))
  else:
    rows.append(("eval", splits.eval))
  return rows


def _count_unreadable(records: Records, num_threads: int) -> list[str]:
  def check(i):
    return decode.check_decodable(records.read_source(i), records.paths[i])

  with futures.ThreadPoolExecutor(num_threads) as pool:
    errors = list(pool.map(check, range(len(records)), chunksize=256))
  return [f"{records.paths[i]}: {e}" for i, e in enumerate(errors) if e is not None]


def verify(args: argparse.Namespace) -> int:
  splits = load_dataset(args.dataset, args.data_root, source=args.source, tfds_data_dir=args.tfds_data_dir,
                        vehicleid_test_size=args.vehicleid_test_size)
  published = get_reader(args.dataset).PUBLISHED
  print(f"dataset {args.dataset}: {splits.layout} in {splits.root}")
  print(f"{'split':<12}{'images':>9}{'classes':>9}   {'published':>9}{'classes':>9}")
  status = 0
  for split, records in _rows(splits):
    pub = published.get(split)
    found = (len(records), records.num_classes)
    if pub is None:
      verdict, pub_text = "", f"{'-':>9}{'-':>9}"
    else:
      dash = lambda v: "-" if v is None else v
      pub_text = f"{dash(pub.images):>9}{dash(pub.classes):>9}"
      matches = all(p is None or p == f for p, f in zip((pub.images, pub.classes), found))
      verdict = "ok" if matches else "DIFFERS"
      if not matches and args.strict:
        status = 1
      if pub.note:
        verdict += f"  ({pub.note})"
    print(f"{split:<12}{found[0]:>9}{found[1]:>9}   {pub_text}   {verdict}")
  if args.check_images:
    for split, records in _rows(splits):
      bad = _count_unreadable(records, args.num_threads)
      print(f"{split}: {len(bad)} unreadable image(s) of {len(records)}")
      for line in bad[:20]:
        print(f"  {line}")
      if bad:
        status = 1
  return status


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (module docstring)."""
  raw = sys.argv[1:] if argv is None else list(argv)
  return cli.run(lambda: _main(argv), debug=cli.debug_requested(raw))


def _main(argv: list[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dml_jax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="print the splits found beside the published counts")
  p = sub.add_parser("prepare", help="write ArrayRecord shards of resized JPEGs")
  for s in (v, p):
    s.add_argument("--dataset", required=True, choices=DATASETS)
    s.add_argument("--data_root", default=None, help="folder holding the dataset folder (digits: optional)")
    s.add_argument("--num_threads", type=int, default=8)
    s.add_argument("--debug", action="store_true", help="show the traceback of errors too")
  v.add_argument("--source", default="auto", choices=("auto", "raw", "prepared", "tfds"))
  v.add_argument("--tfds_data_dir", default=None)
  v.add_argument("--vehicleid_test_size", default="small", choices=("small", "medium", "large"))
  v.add_argument("--check_images", action="store_true", help="decode every image (1/8-scale JPEG decoding)")
  v.add_argument("--strict", action="store_true", help="exit 1 when a count differs from the published one")
  p.add_argument("--out", required=True, help="writes <out>/<dataset>/")
  p.add_argument("--shorter_side", type=int, default=256, help="shrink images whose shorter side is larger")
  p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
  p.add_argument("--records_per_shard", type=int, default=10000)
  p.add_argument("--skip_corrupt", action="store_true", help="skip (and log) unreadable or missing images")
  p.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if args.command == "verify":
    return verify(args)
  folder = prepare(args.dataset, args.data_root, args.out, shorter_side=args.shorter_side, quality=args.quality,
                   records_per_shard=args.records_per_shard, num_threads=args.num_threads,
                   skip_corrupt=args.skip_corrupt, overwrite=args.overwrite)
  print(f"prepared {args.dataset} in {folder}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
