"""Evaluation: sharded embedding, exact kNN (JAX / FAISS), retrieval and clustering metrics, protocols.

  embed.embed_dataset       embeddings of a loader's images over all devices (progress bar, images/s)
  knn.knn / knn_chunks      exact chunked k-nearest neighbours, backend 'jax' | 'faiss' | 'auto'
  kmeans.kmeans             faiss-style Lloyd k-means (JAX) or faiss.Kmeans
  metrics                   retrieval_metrics (Recall@K, R-Precision, MAP@R, mARP), clustering_metrics (NMI, F1)
  protocols.evaluate        the per-dataset protocol (K values, query/gallery split)
  faiss_check               refuses faiss-cpu and faiss-gpu installed together
  saved                     a split's embeddings on disk with labels, paths and roles (what dml_jax.plot reads)

`python -m dml_jax.evaluate` evaluates saved embeddings (dml_jax/evaluate.py).
"""
