"""dml_jax: deep metric learning on images in JAX/Flax.

Subpackages (arrows point one way: methods use backbones/losses/data; train and eval use a method only
through its interface):
  backbones  Flax NNX ViT/DeiT, ResNet-50, BN-Inception with timm parameter semantics.
  convert    timm / torch state dicts / AugReg npz -> Flax weight directories (strict).
  data       dataset readers, prepared shards, transforms, samplers, grain loaders.
  losses     pure jittable loss functions.
  methods    one module per paper.
  train      optimizer groups, the sharded update step, the epoch loop, checkpoints.
  eval       sharded embedding, kNN backends, retrieval and clustering metrics, saved embeddings.
Modules with a command line: evaluate (saved embeddings), retrieve (FAISS index over a folder of images),
plot (the PNGs of a run).

Reliability (docs/reliability.md): `errors` (UserError), `cli` (one `error:` line, exit statuses),
`workdir_lock` (one run per workdir), `preemption` (save and stop on SIGTERM / SIGINT).
"""

__version__ = "0.1.0"
