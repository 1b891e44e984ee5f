"""The training engine: parameter groups and optimizers, the one sharded update step, the epoch loop.

  optim        config regex rules -> parameter groups -> one optax chain per group (torch semantics)
  schedules    per-epoch learning-rate schedules (step, multistep, cosine), as torch's schedulers
  step         the jitted, donated, data-parallel update step over a ('data',) mesh: the method's phases
  checkpoint   orbax checkpoints: last N and best, with config, data-iterator state and host state
  logs         metrics.jsonl, TensorBoard events, the summary table
  loop         fit(config, workdir): epochs, method hooks and samplers, evaluation, resume, NaN guard
  config       the engine's config keys and the checks run before anything is built

Importing this package is cheap (config files import `dml_jax.train.config`); import the modules you use.
"""
