"""Per-dataset protocols: K values, query/gallery handling, roles."""

from __future__ import annotations

import numpy as np
import pytest

from dml_jax.eval import metrics as metrics_lib
from dml_jax.eval import protocols


def _data(seed=0, num=400, num_classes=40):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num)
  embeddings = rng.standard_normal((num_classes, 8))[labels] + 0.7 * rng.standard_normal((num, 8))
  return embeddings.astype(np.float32), labels


@pytest.mark.parametrize("dataset, ks", [("cub200", (1, 2, 4, 8)), ("Cars196", (1, 2, 4, 8)),
                                         ("sop", (1, 10, 100, 1000)), ("vehicleid_large", (1, 5)),
                                         ("inaturalist", (1, 4, 16, 32)),
                                         ("inshop", (1, 10, 20, 30, 40, 50))])
def test_protocol_recall_ks(dataset, ks):
  assert protocols.get_protocol(dataset).recall_ks == ks


def test_leave_one_out_protocol_equals_metrics_call():
  embeddings, labels = _data()
  roles = np.full(len(labels), "test")
  results = protocols.evaluate("cub", embeddings, labels, roles, metrics=["recall", "map@r", "nmi", "f1"],
                               backend="jax", seed=3)
  assert list(results) == ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi", "f1"]
  direct = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["recall", "map@r"], recall_ks=(1, 2, 4, 8),
                                         backend="jax")
  assert all(results[name] == direct[name] for name in direct)
  clustering = metrics_lib.clustering_metrics(embeddings, labels, backend="jax", seed=3)
  assert results["nmi"] == clustering["nmi"] and results["f1"] == clustering["f1"]


def test_inshop_queries_the_gallery_without_self_exclusion():
  embeddings, labels = _data(1)
  roles = np.where(np.arange(len(labels)) % 2 == 0, "query", "gallery")
  results = protocols.evaluate("inshop", embeddings, labels, roles, metrics=["recall", "marp"], backend="auto")
  direct = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=roles == "query",
                                         gallery_mask=roles == "gallery", metrics=["recall", "marp"],
                                         recall_ks=(1, 10, 20, 30, 40, 50), marp_max_rank=50, backend="auto")
  assert results == direct
  # A query that duplicates a gallery image finds it at rank 1: nothing is excluded across the split.
  embeddings[0] = embeddings[1]
  labels[0] = labels[1]
  one_query = np.where(np.arange(len(labels)) == 0, "query", "gallery")
  assert protocols.evaluate("inshop", embeddings, labels, one_query, metrics=["recall@1"])["recall@1"] == 1.0


def test_roles_are_checked():
  embeddings, labels = _data()
  with pytest.raises(ValueError, match="query vs gallery"):
    protocols.evaluate("inshop", embeddings, labels, np.full(len(labels), "test"))
  with pytest.raises(ValueError, match="every role must be 'test'"):
    protocols.evaluate("sop", embeddings, labels, np.where(np.arange(len(labels)) < 5, "query", "test"))
  with pytest.raises(ValueError, match="unknown roles"):
    protocols.evaluate("sop", embeddings, labels, np.full(len(labels), "train"))
  with pytest.raises(ValueError, match="no evaluation protocol"):
    protocols.get_protocol("mnist")
  with pytest.raises(ValueError, match="unknown evaluation options"):
    protocols.evaluate("cub200", embeddings, labels, np.full(len(labels), "test"), k=5)
