"""`python -m dml_jax.retrieve` end to end on generated pictures: a tiny random ViT weights directory (no torch,
no download) and a run trained on the `folder` dataset; index, terminal answer, JSON, grid PNG, refusals."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dml_jax import backbones, plot, retrieve
from dml_jax.backbones.registry import get_pretrained_cfg
from dml_jax.convert import weights_dir
from dml_jax.data import load_dataset, synthetic
from dml_jax.eval import protocols
from dml_jax.eval import saved as saved_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ["apple", "bicycle", "cat", "door", "eagle", "fern"]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _weights(out: pathlib.Path, seed: int) -> str:
  """A converted-weights directory of a randomly initialised tiny ViT-S/16, as convert_timm_weights.py writes it."""
  arch = {**backbones.get_entry("vit_small_patch16_224").arch, **TINY}
  model = backbones.create("vit_small_patch16_224", rngs=nnx.Rngs(seed), **arch)
  flat = {weights_dir.path_key(k): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(nnx.state(model, weights_dir.LOADED))}
  weights_dir.write_weights_dir(out, model_name="vit_small_patch16_224", family="vit", arch=arch, flat=flat,
                                pretrained_cfg=get_pretrained_cfg("vit_small_patch16_224.augreg_in21k"),
                                source=f"random init, seed {seed}", dropped_keys=[])
  return str(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("retrieve")
  synthetic.picture_folder(str(root / "photos"), CLASSES, 4, size=(40, 32))
  return root, _weights(root / "w0", 0), _weights(root / "w1", 1)


def _grid_size(rows: int, k: int) -> tuple[int, int]:
  """Pixels of a retrieval grid at 110 dpi: 1.45 in tiles with 0.08 in gaps, 0.36 in captions, margins."""
  return int((0.3 + (k + 1) * 1.53 + 0.18) * 110), int((0.5 + rows * 1.81 + 0.08) * 110)


def test_weights_dir_build_query_json_and_grid(setup, tmp_path, capsys):
  root, w0, _ = setup
  index = tmp_path / "index"
  assert retrieve.main(["build", "--images", str(root / "photos"), "--index", str(index), "--weights", w0]) == 0
  out = capsys.readouterr()
  assert "24 images (24 added, 0 already indexed), 6 classes, 0 without class" in out.out
  assert "images_per_s" in out.err  # the progress bar
  faiss_index, gallery, model = retrieve.read_index(index)
  assert sorted(set(gallery.labels)) == CLASSES and model["source"]["kind"] == "weights"
  assert model["preprocessing"]["image_size"] == 32 and model["embedding_dim"] == 64

  # The index holds the backbone's pooled features, L2-normalised.
  vectors = faiss_index.reconstruct_n(0, faiss_index.ntotal)
  embedder = retrieve.load_embedder(weights=w0)
  assert embedder.fingerprint == model["fingerprint"]
  np.testing.assert_allclose(vectors, embedder.embed(gallery.paths), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

  queries = tmp_path / "queries"
  (queries / "cat").mkdir(parents=True)
  shutil.copy(root / "photos" / "cat" / "cat_002.jpg", queries / "cat" / "new.jpg")  # a new file, class 'cat'
  shutil.copy(root / "photos" / "fern" / "fern_001.jpg", queries / "unknown.jpg")  # no class
  in_gallery = str(root / "photos" / "door" / "door_000.jpg")
  answer_path, grid_path = tmp_path / "answer.json", tmp_path / "answer.png"
  assert retrieve.main(["query", "--index", str(index), str(queries), in_gallery, "--k", "3",
                        "--json", str(answer_path), "--grid", str(grid_path)]) == 0
  printed = capsys.readouterr().out
  answer = json.loads(answer_path.read_text())
  assert [pathlib.Path(q["path"]).name for q in answer["queries"]] == ["new.jpg", "unknown.jpg", "door_000.jpg"]
  new, unknown, door = answer["queries"]
  for q in answer["queries"]:
    scores = [r["score"] for r in q["results"]]
    assert [r["rank"] for r in q["results"]] == [1, 2, 3] and scores == sorted(scores, reverse=True)
  # The copy finds its original first, at cosine 1; a gallery image never finds itself.
  assert new["label"] == "cat" and new["results"][0]["path"].endswith("cat/cat_002.jpg")
  assert new["results"][0]["score"] == pytest.approx(1.0, abs=1e-4) and new["results"][0]["correct"] is True
  assert unknown["label"] is None and all(r["correct"] is None for r in unknown["results"])
  assert door["excluded_itself"] and in_gallery not in [r["path"] for r in door["results"]]
  assert all(r["correct"] == (r["label"] == "door") for r in door["results"])
  assert "query queries/cat/new.jpg  [cat]" in printed or "new.jpg  [cat]" in printed
  assert "(itself excluded)" in printed and f"{new['results'][0]['score']:.4f} + [cat]" in printed
  with Image.open(grid_path) as img:
    assert img.format == "PNG" and img.size == _grid_size(3, 3)


def test_index_grows_with_its_model_and_refuses_another(setup, tmp_path):
  root, w0, w1 = setup
  photos = tmp_path / "photos"
  shutil.copytree(root / "photos", photos)
  first, other = retrieve.load_embedder(weights=w0), retrieve.load_embedder(weights=w1)
  index = tmp_path / "index"
  assert retrieve.build(str(photos), index, first)["added"] == 24
  synthetic.picture_folder(str(photos), ["gate"], 3, size=(40, 32))
  shutil.copy(photos / "cat" / "cat_000.jpg", photos / "loose.jpg")
  summary = retrieve.build(str(photos), index, first)
  assert (summary["added"], summary["already_indexed"], summary["num_classes"], summary["unlabelled"]) == (4, 24, 7, 1)

  with pytest.raises(retrieve.RetrievalError, match="built with another model"):
    retrieve.build(str(photos), index, other)
  with pytest.raises(retrieve.RetrievalError, match="built with another model"):
    retrieve.query(index, [str(photos / "loose.jpg")], embedder=other)
  replaced = retrieve.build(str(photos), index, other, overwrite=True)
  assert replaced["added"] == 28 and retrieve.read_index(index)[2]["fingerprint"] == other.fingerprint
  assert not list(tmp_path.glob(".index*"))  # no temporary folders left behind


def test_bad_inputs_stop_with_one_clear_line(setup, tmp_path, capsys):
  root, w0, _ = setup
  index = tmp_path / "index"

  def error(*argv):
    assert retrieve.main(list(argv)) == 1
    return capsys.readouterr().err

  assert "is not a folder" in error("build", "--images", str(tmp_path / "nope"), "--index", str(index),
                                    "--weights", w0)
  assert "exactly one of --workdir" in error("build", "--images", str(root / "photos"), "--index", str(index))
  assert "no model.json" in error("build", "--images", str(root / "photos"), "--index", str(index),
                                  "--weights", str(tmp_path))
  assert "not a retrieval index" in error("query", "--index", str(tmp_path), str(root / "photos"))
  retrieve.build(str(root / "photos"), index, retrieve.load_embedder(weights=w0))
  (tmp_path / "notes.txt").write_text("x")
  assert "not an image file" in error("query", "--index", str(index), str(tmp_path / "notes.txt"))
  assert "does not exist" in error("query", "--index", str(index), str(tmp_path / "missing.jpg"))
  assert "no checkpoints/ folder" in error("query", "--index", str(index), "--workdir", str(tmp_path),
                                           str(root / "photos"))


@pytest.mark.integration
def test_trained_run_on_a_folder_retrieves_and_plots(setup, tmp_path, monkeypatch, capsys):
  """configs/folder_vits.py shrunk to a tiny random ViT, trained by today's trainer on the folder dataset; the
  run's checkpoint then embeds exactly as its evaluation did, indexes the folder and draws its pictures."""
  from dml_jax.train import loop

  root, _, _ = setup
  photos = tmp_path / "photos"
  synthetic.picture_folder(str(photos), CLASSES + ["gate", "harbour"], 6, size=(40, 32))
  spec = importlib.util.spec_from_file_location("folder_vits", REPO / "configs" / "folder_vits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.dataset.data_root = str(photos)
  c.model.weights = ""
  c.model.backbone_overrides.update(TINY)
  c.dataset.image_size, c.dataset.resize_size = 32, 36
  c.num_epochs, c.data.batch_size, c.data.num_threads = 2, 16, 2
  c.eval.before_training = False
  c.log.tensorboard, c.log.progress = False, False
  workdir = tmp_path / "run"
  summary = loop.fit(c, workdir)

  monkeypatch.chdir(tmp_path)
  embedder = retrieve.load_embedder(workdir=str(workdir))
  assert embedder.source["epoch"] == summary["best"]["epoch"]
  test = load_dataset("folder", str(photos)).eval  # today's trainer splits with the default FolderSplit
  emb = embedder.embed(list(test.paths))
  found = protocols.evaluate("folder", emb, test.labels, test.roles, metrics=["recall", "map@r"])
  for key, value in summary["best"]["test"].items():
    assert found[key] == pytest.approx(value, abs=1e-6), key

  # What the trainer will do at the end of a run: save the best test embeddings, then draw the pictures.
  saved_lib.save_embeddings(saved_lib.best_test_path(workdir), emb, test.labels, test.paths, test.roles,
                            protocol="folder", class_names=test.class_names, step=embedder.source["step"],
                            epoch=embedder.source["epoch"])
  pngs = plot.plot_run(workdir, embedding_map="pca")
  assert [p.name for p in pngs] == ["curves.png", "recall_at_k.png", "retrieval.png", "embedding_map.png"]

  index = tmp_path / "index"
  assert retrieve.main(["build", "--images", str(photos), "--index", str(index), "--workdir", str(workdir)]) == 0
  assert retrieve.main(["query", "--index", str(index), str(photos / "gate"), "--k", "4", "--json", "a.json",
                        "--grid", "a.png"]) == 0
  answer = json.loads((tmp_path / "a.json").read_text())
  assert len(answer["queries"]) == 6 and answer["model"].startswith(f"run {workdir}")
  assert all(q["excluded_itself"] and len(q["results"]) == 4 for q in answer["queries"])
  with Image.open(tmp_path / "a.png") as img:
    assert img.size == _grid_size(6, 4)
  assert "images_per_s" in capsys.readouterr().err
