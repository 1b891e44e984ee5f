"""Image retrieval over your own folder: a FAISS index built with a trained run or plain converted weights.

  python -m dml_jax.retrieve build --images ~/photos --index runs/mine/index --workdir runs/mine
  python -m dml_jax.retrieve build --images ~/photos --index idx_vits --weights weights/vit_s16   # no training
  python -m dml_jax.retrieve query --index runs/mine/index ~/new/cat.jpg ~/more_queries --k 5 \
      --json answer.json --grid answer.png

build embeds every image under --images (`<class>/<image>` subfolders give each image its class; images lying
directly in --images have none) and writes the index directory:

  index.faiss     exact inner-product index (faiss IndexFlatIP) of the L2-normalised embeddings: cosine similarity
  gallery.json    {"paths": [...], "labels": [class or null, ...]}
  model.json      the model: its fingerprint (SHA-256 of the parameters and the preprocessing), where it came from
                  (workdir + checkpoint + step, or weights directory), embedding size and preprocessing

Building into an existing index adds the images it does not hold yet, and only with the same model: embeddings
of different models are not comparable, so a different fingerprint is refused (use a new --index, or
--overwrite). With --workdir the embedding is the run's (the best checkpoint, or --checkpoint last); with
--weights it is the backbone's pooled feature, L2-normalised. Images go through the evaluation transform
(Resize + CenterCrop) and the weights' normalisation.

query embeds image files or folders of them (with the index's model unless --workdir / --weights is given,
which must then be the same model) and prints the top-k paths and cosine similarities, writes them as JSON and
draws a grid PNG (query + top-k). A query whose parent folder is named like a class of the index has that class:
its results are framed green (same class) or red. A query that is itself in the index does not retrieve itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

INDEX_FORMAT = "dml_jax.retrieval_index/1"
INDEX_FILE, GALLERY_FILE, MODEL_FILE = "index.faiss", "gallery.json", "model.json"


class RetrievalError(ValueError):
  """Bad input to build or query (a missing folder, an index of another model, ...); the message says which."""


@dataclasses.dataclass
class Preprocessing:
  """The evaluation transform: Resize(resize_size) + CenterCrop(image_size), then the weights' normalisation."""

  image_size: int
  resize_size: int
  interpolation: str
  pretrained_cfg: Any  # dml_jax.backbones.PretrainedCfg

  def to_json(self) -> dict[str, Any]:
    return {"image_size": self.image_size, "resize_size": self.resize_size, "interpolation": self.interpolation,
            "pretrained_cfg": self.pretrained_cfg.to_json()}


@dataclasses.dataclass
class Embedder:
  """A model ready to embed images.

  Attributes:
    embed_fn: jitted images float32 [B, S, S, 3] -> L2-normalised embeddings float32 [B, E].
    preprocessing: how images are prepared for it.
    fingerprint: SHA-256 (hex) of its parameters and preprocessing; equal fingerprints embed alike.
    source: JSON-able description of where the model came from ({'kind': 'workdir' | 'weights', ...}).
  """

  embed_fn: Callable[[Any], Any]
  preprocessing: Preprocessing
  fingerprint: str
  source: dict[str, Any]

  def describe(self) -> str:
    s = self.source
    if s["kind"] == "workdir":
      return f"run {s['workdir']} ({s['checkpoint']} checkpoint, step {s['step']}, epoch {s['epoch']})"
    return f"weights {s['weights']} ({s['model']}, pooled features)"

  def embed(self, paths: Sequence[str], *, batch_size: int = 32, num_threads: int = 4,
            desc: str = "embed") -> np.ndarray:
    """float32 [N, E] embeddings of the image files `paths`, in order; a progress bar shows images/s."""
    from dml_jax.data import make_eval_loader
    from dml_jax.data.records import FileStore, Records
    from dml_jax.eval import embed as embed_lib

    records = Records(FileStore(paths), labels=np.zeros(len(paths), np.int64), roles="gallery", paths=paths,
                      class_names=["?"])
    p = self.preprocessing
    loader = make_eval_loader(records, batch_size=batch_size, pretrained_cfg=p.pretrained_cfg,
                              image_size=p.image_size, resize_size=p.resize_size, num_threads=num_threads,
                              interpolation=p.interpolation)
    emb, _, indices = embed_lib.embed_dataset(self.embed_fn, loader, desc=desc)
    out = np.empty_like(emb)
    out[indices] = emb
    return out


# ------------------------------------------------------------------------- adapters to the model-loading APIs


def _hash_arrays(tree: Any, preprocessing: Preprocessing) -> str:
  import jax

  h = hashlib.sha256(json.dumps(preprocessing.to_json(), sort_keys=True).encode())
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda e: jax.tree_util.keystr(e[0])):
    array = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def _l2_normalize(x):
  import jax
  import jax.numpy as jnp

  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def _weights_embedder(weights: str, image_size: int | None) -> Embedder:
  """Adapter: a converted weights directory -> its backbone's pooled features, L2-normalised.

  Uses `dml_jax.backbones.create(name, weights=DIR, **arch)` with the architecture recorded in the directory's
  model.json; the evaluation size is the architecture's image size (ViT) or the weights' input size, the resize
  side image_size / crop_pct as timm's evaluation transform.
  """
  import jax
  from flax import nnx

  from dml_jax import backbones
  from dml_jax.train import compile_options

  folder = pathlib.Path(weights).expanduser()
  meta_path = folder / "model.json"
  if not meta_path.is_file():
    raise RetrievalError(f"--weights {folder}: no model.json there; expected a directory written by "
                         "convert_timm_weights.py (model.json + params.npz)")
  meta = json.loads(meta_path.read_text())
  arch = dict(meta.get("arch", {}))
  if image_size is not None and "img_size" in arch:
    arch["img_size"] = int(image_size)  # ViT position embeddings are resampled on load
  model = backbones.create(meta["model"], weights=str(folder), **arch)
  model.eval()  # BatchNorm with running statistics, no dropout
  cfg = model.pretrained_cfg
  size = int(image_size or arch.get("img_size") or cfg.input_size)
  pre = Preprocessing(size, int(size / cfg.crop_pct), cfg.interpolation, cfg)
  graph, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=compile_options.compiler_options(jax.default_backend()))
  def pooled(state, images):
    return _l2_normalize(nnx.merge(graph, state)(images))

  source = {"kind": "weights", "weights": str(folder.resolve()), "model": meta["model"], "arch": arch}
  return Embedder(functools.partial(pooled, state), pre, _hash_arrays(state, pre), source)


def _workdir_embedder(workdir: str, checkpoint: str) -> Embedder:
  """Adapter: a training run's checkpoint -> its method's evaluation embedding (`method.embed_fn`), for any
  method: `dml_jax.train.loop.load_trained` rebuilds the method from the checkpoint alone (its config, class
  count and preprocessing) and restores the verified parameters."""
  from dml_jax.train import loop

  root = pathlib.Path(workdir).expanduser().absolute()
  if not (root / "checkpoints").is_dir():
    raise RetrievalError(f"--workdir {root}: no checkpoints/ folder; expected the workdir of a training run "
                         "(python train.py --workdir ...)")
  run = loop.load_trained(root, checkpoint, echo=lambda line: print(line, file=sys.stderr))
  config = run.config
  pre = Preprocessing(int(config.dataset.image_size), int(config.dataset.resize_size),
                      str(config.data.interpolation), run.method.pretrained_cfg)
  source = {"kind": "workdir", "workdir": str(root), "checkpoint": checkpoint, "step": int(run.step),
            "epoch": int(run.meta["epoch"]) - 1, "method": config.method.name, "backbone": config.model.backbone}
  return Embedder(run.embed, pre, _hash_arrays({"params": run.params, "method_state": run.method_state}, pre), source)


def load_embedder(*, workdir: str | None = None, weights: str | None = None, checkpoint: str = "best",
                  image_size: int | None = None) -> Embedder:
  """The model of a training run (`workdir`, its 'best' or 'last' checkpoint) or of a converted weights directory.

  image_size (weights only): evaluate at this size instead of the weights' own.
  """
  if (workdir is None) == (weights is None):
    raise RetrievalError("give exactly one of --workdir (a trained run) or --weights (a converted weights directory)")
  if checkpoint not in ("best", "last"):
    raise RetrievalError(f"--checkpoint must be 'best' or 'last', got {checkpoint!r}")
  if weights is not None:
    return _weights_embedder(weights, image_size)
  if image_size is not None:
    raise RetrievalError("--image_size applies to --weights; a run evaluates at its config's dataset.image_size")
  return _workdir_embedder(workdir, checkpoint)


# ------------------------------------------------------------------------------------------------ the index


@dataclasses.dataclass
class Gallery:
  """What an index holds besides the vectors: one path and one class (or None) per indexed image."""

  paths: list[str]
  labels: list[str | None]


def list_images(images: str) -> Gallery:
  """Every image under `images`: `<class>/<...>/<image>` has that class, `<image>` directly in the folder none."""
  from dml_jax.data.readers import folder

  root = os.path.abspath(os.path.expanduser(images))
  if not os.path.isdir(root):
    raise RetrievalError(f"--images {root} is not a folder; expected <folder>/<class>/<image> (classes optional)")
  names, files, loose = folder.list_class_images(root)
  paths = loose + [p for f in files for p in f]
  labels: list[str | None] = [None] * len(loose) + [n for n, f in zip(names, files) for _ in f]
  if not paths:
    raise RetrievalError(f"--images {root} holds no images (extensions {', '.join(_image_extensions())})")
  return Gallery(paths, labels)


def _image_extensions() -> tuple[str, ...]:
  from dml_jax.data.decode import IMAGE_EXTENSIONS

  return IMAGE_EXTENSIONS


def _faiss():
  from dml_jax.eval import faiss_check

  return faiss_check.import_faiss()


def read_index(index_dir: str | os.PathLike) -> tuple[Any, Gallery, dict[str, Any]]:
  """(faiss index, gallery, model.json) of an index directory; anything missing or inconsistent stops."""
  folder = pathlib.Path(index_dir).expanduser()
  files = [folder / INDEX_FILE, folder / GALLERY_FILE, folder / MODEL_FILE]
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise RetrievalError(f"{folder} is not a retrieval index: missing {missing}; expected {INDEX_FILE}, "
                         f"{GALLERY_FILE} and {MODEL_FILE} written by `python -m dml_jax.retrieve build`")
  model = json.loads(files[2].read_text())
  if model.get("format") != INDEX_FORMAT:
    raise RetrievalError(f"{files[2]}: format {model.get('format')!r}, expected {INDEX_FORMAT!r}")
  raw = json.loads(files[1].read_text())
  gallery = Gallery(list(raw["paths"]), list(raw["labels"]))
  index = _faiss().read_index(str(files[0]))
  if not index.ntotal == len(gallery.paths) == len(gallery.labels):
    raise RetrievalError(f"{folder}: the index holds {index.ntotal} vectors but {GALLERY_FILE} lists "
                         f"{len(gallery.paths)} paths; rebuild it (build --overwrite)")
  return index, gallery, model


def _check_model(model: dict[str, Any], embedder: Embedder, index_dir: pathlib.Path, *,
                 from_index: bool = False) -> None:
  if model["fingerprint"] != embedder.fingerprint:
    hint = ("the model the index was built with has changed since (a run trained further?): rebuild the index "
            "(build --overwrite)" if from_index else
            "use the index's model (leave out --workdir / --weights), another --index, or build --overwrite")
    raise RetrievalError(
        f"{index_dir} was built with another model, and embeddings of different models are not comparable:\n"
        f"  index: {model['description']} (fingerprint {model['fingerprint'][:12]})\n"
        f"  now:   {embedder.describe()} (fingerprint {embedder.fingerprint[:12]})\n{hint}")


def _write_index_dir(index_dir: pathlib.Path, index: Any, gallery: Gallery, model: dict[str, Any]) -> None:
  """Writes the three files into a fresh sibling folder, then swaps it in: a reader never sees a mix."""
  index_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.", dir=index_dir.parent))
  try:
    _faiss().write_index(index, str(tmp / INDEX_FILE))
    (tmp / GALLERY_FILE).write_text(json.dumps({"paths": gallery.paths, "labels": gallery.labels}))
    (tmp / MODEL_FILE).write_text(json.dumps(model, indent=2, sort_keys=True))
    old = index_dir.with_name(f".{index_dir.name}.old")
    if index_dir.exists():
      shutil.rmtree(old, ignore_errors=True)
      os.replace(index_dir, old)
    os.replace(tmp, index_dir)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def build(images: str, index_dir: str | os.PathLike, embedder: Embedder, *, overwrite: bool = False,
          batch_size: int = 32, num_threads: int = 4) -> dict[str, Any]:
  """Indexes every image under `images` (see `list_images`) into `index_dir`; returns a summary dict.

  An existing index of the same model gets the images it lacks; one of another model is refused unless
  `overwrite` (then it is replaced).
  """
  index_dir = pathlib.Path(index_dir).expanduser().absolute()
  gallery = list_images(images)
  faiss = _faiss()
  index, old = None, Gallery([], [])
  if index_dir.exists() and not overwrite:
    index, old, model = read_index(index_dir)
    _check_model(model, embedder, index_dir)
  known = set(old.paths)
  new = [(p, lab) for p, lab in zip(gallery.paths, gallery.labels) if p not in known]
  if new:
    emb = embedder.embed([p for p, _ in new], batch_size=batch_size, num_threads=num_threads,
                         desc=f"embed {len(new)} images")
    if index is None:
      index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, np.float32))
  elif index is None:
    raise RetrievalError(f"--images {images}: nothing to index")
  gallery = Gallery(old.paths + [p for p, _ in new], old.labels + [lab for _, lab in new])
  model = {"format": INDEX_FORMAT, "fingerprint": embedder.fingerprint, "description": embedder.describe(),
           "source": embedder.source, "preprocessing": embedder.preprocessing.to_json(),
           "embedding_dim": int(index.d), "metric": "cosine (inner product of L2-normalised embeddings)",
           "updated": datetime.datetime.now().isoformat(timespec="seconds"), "num_images": len(gallery.paths)}
  _write_index_dir(index_dir, index, gallery, model)
  classes = sorted({lab for lab in gallery.labels if lab is not None})
  return {"index": str(index_dir), "added": len(new), "already_indexed": len(gallery.paths) - len(new),
          "num_images": len(gallery.paths), "num_classes": len(classes),
          "unlabelled": sum(lab is None for lab in gallery.labels), "model": embedder.describe()}


def query_paths(items: Sequence[str]) -> list[str]:
  """Image files named directly, plus every image under each named folder; anything else stops."""
  from dml_jax.data import decode
  from dml_jax.data.readers.folder import images_under

  paths = []
  for item in items:
    full = os.path.abspath(os.path.expanduser(item))
    if os.path.isdir(full):
      found = images_under(full)
      if not found:
        raise RetrievalError(f"query folder {full} holds no images")
      paths.extend(found)
    elif os.path.isfile(full):
      if not decode.is_image_file(os.path.basename(full)):
        raise RetrievalError(f"query {full} is not an image file (extensions {', '.join(_image_extensions())})")
      paths.append(full)
    else:
      raise RetrievalError(f"query {full} does not exist")
  return paths


def query(index_dir: str | os.PathLike, items: Sequence[str], *, embedder: Embedder | None = None, k: int = 5,
          batch_size: int = 32, num_threads: int = 4) -> dict[str, Any]:
  """Top-k of each query image (files, or folders of them) in the index; returns the JSON-able answer.

  Without `embedder`, the model recorded in the index is loaded; with one, it must be the index's model.
  """
  index_dir = pathlib.Path(index_dir).expanduser().absolute()
  index, gallery, model = read_index(index_dir)
  if k < 1:
    raise RetrievalError(f"--k must be at least 1, got {k}")
  paths = query_paths(items)
  from_index = embedder is None
  if embedder is None:
    source = model["source"]
    if source["kind"] == "workdir":
      embedder = load_embedder(workdir=source["workdir"], checkpoint=source["checkpoint"])
    else:
      embedder = load_embedder(weights=source["weights"], image_size=model["preprocessing"]["image_size"])
  _check_model(model, embedder, index_dir, from_index=from_index)
  emb = embedder.embed(paths, batch_size=batch_size, num_threads=num_threads, desc=f"embed {len(paths)} queries")
  # One extra neighbour, dropped again when a query finds itself.
  scores, idx = index.search(np.ascontiguousarray(emb, np.float32), min(k + 1, index.ntotal))
  classes = {lab for lab in gallery.labels if lab is not None}
  position = {p: i for i, p in enumerate(gallery.paths)}
  answers = []
  for path, row_scores, row_idx in zip(paths, scores, idx):
    label = os.path.basename(os.path.dirname(path))
    label = label if label in classes else None
    own = position.get(path, -1)
    keep = [(int(i), float(s)) for i, s in zip(row_idx, row_scores) if i >= 0 and i != own][:k]
    results = []
    for rank, (i, s) in enumerate(keep, 1):
      result_label = gallery.labels[i]
      correct = None if label is None or result_label is None else result_label == label
      results.append({"rank": rank, "path": gallery.paths[i], "score": s, "label": result_label,
                      "correct": correct})
    answers.append({"path": path, "label": label, "excluded_itself": own >= 0, "results": results})
  return {"index": str(index_dir), "model": model["description"], "fingerprint": model["fingerprint"],
          "metric": "cosine", "k": k, "queries": answers}


def format_answer(answer: dict[str, Any]) -> str:
  """The terminal form: per query, rank, cosine similarity, same class (+) / other (-) / unknown ( ), class, path."""
  def shown(path):
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") and len(rel) < len(path) else path

  lines = [f"index {answer['index']}: {answer['model']}"]
  for q in answer["queries"]:
    lines.append("")
    lines.append(f"query {shown(q['path'])}" + (f"  [{q['label']}]" if q["label"] is not None else "")
                 + ("  (itself excluded)" if q["excluded_itself"] else ""))
    for r in q["results"]:
      mark = {True: "+", False: "-", None: " "}[r["correct"]]
      label = f"[{r['label']}]" if r["label"] is not None else ""
      lines.append(f"  {r['rank']:>3}  {r['score']:.4f} {mark} {label:<20} {shown(r['path'])}")
  return "\n".join(lines)


def draw_answer(answer: dict[str, Any], out: str | os.PathLike, *, max_rows: int = 12) -> pathlib.Path:
  """The grid PNG of the first `max_rows` queries (query + top-k, matches framed where classes are known)."""
  from dml_jax import plot

  rows = [plot.GridRow(q["path"], q["label"], [(r["path"], r["score"], r["label"]) for r in q["results"]])
          for q in answer["queries"][:max_rows]]
  shown = f"{len(rows)} of {len(answer['queries'])} queries" if len(rows) < len(answer["queries"]) else ""
  title = f"top {answer['k']} by cosine similarity" + (f" ({shown})" if shown else "")
  if any(q["label"] is not None for q in answer["queries"][:max_rows]):
    title += "; green = same class, red = another class"
  return plot.retrieval_grid(rows, out, title=title)


# ------------------------------------------------------------------------------------------------ command line


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  parser = argparse.ArgumentParser(prog="python -m dml_jax.retrieve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="index every image under --images")
  q = sub.add_parser("query", help="top-k of query images in an index")
  for s in (b, q):
    s.add_argument("--index", required=True, help="the index directory")
    s.add_argument("--workdir", default=None, help="a training run: embed with its checkpoint")
    s.add_argument("--weights", default=None, help="a converted weights directory: embed with its pooled features")
    s.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of --workdir")
    s.add_argument("--image_size", type=int, default=None, help="with --weights: evaluation size (default the "
                   "weights' own)")
    s.add_argument("--batch_size", type=int, default=32)
    s.add_argument("--num_threads", type=int, default=4, help="image decoding threads")
  b.add_argument("--images", required=True, help="folder of images: <folder>/<class>/<image> (classes optional)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing index (even of another model)")
  q.add_argument("queries", nargs="+", help="image files and/or folders of images")
  q.add_argument("--k", type=int, default=5, help="results per query")
  q.add_argument("--json", default="retrieval.json", help="answer as JSON ('' = none)")
  q.add_argument("--grid", default="retrieval.png", help="grid PNG of the answer ('' = none)")
  q.add_argument("--grid_rows", type=int, default=12, help="queries drawn in the grid (the JSON holds all)")
  return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  _, args = _parse(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    if args.command == "build":
      embedder = load_embedder(workdir=args.workdir, weights=args.weights, checkpoint=args.checkpoint,
                               image_size=args.image_size)
      summary = build(args.images, args.index, embedder, overwrite=args.overwrite, batch_size=args.batch_size,
                      num_threads=args.num_threads)
      print(f"index {summary['index']}: {summary['num_images']} images ({summary['added']} added, "
            f"{summary['already_indexed']} already indexed), {summary['num_classes']} classes, "
            f"{summary['unlabelled']} without class; model: {summary['model']}")
      return 0
    embedder = None
    if args.workdir is not None or args.weights is not None:
      embedder = load_embedder(workdir=args.workdir, weights=args.weights, checkpoint=args.checkpoint,
                               image_size=args.image_size)
    answer = query(args.index, args.queries, embedder=embedder, k=args.k, batch_size=args.batch_size,
                   num_threads=args.num_threads)
  except (RetrievalError, FileNotFoundError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    return 1
  print(format_answer(answer))
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answer, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
  if args.grid:
    drawn = min(args.grid_rows, len(answer["queries"]))
    print(f"wrote {draw_answer(answer, args.grid, max_rows=args.grid_rows)} ({drawn} of "
          f"{len(answer['queries'])} queries)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
