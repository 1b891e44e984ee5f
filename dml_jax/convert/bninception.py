"""pretrainedmodels BN-Inception state dict -> flat NNX paths of `dml_jax.backbones.bninception.BNInception`.

Accepts both forms of the BN tensors: [C] (a state dict of `pretrainedmodels.bninception()`, or Cadene's
checkpoint after the Proxy-Anchor code's `squeeze(0)`) and [1, C] (Cadene's `bn_inception-52deb4733.pth`
as stored). Dropped on purpose: the classifier `last_linear.*` and BN `num_batches_tracked` counters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dml_jax.backbones.bninception import BNInception
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.torch_cnn import abstract_shapes, take_all

DROPPED = (r"last_linear\.(weight|bias)", r".*\.num_batches_tracked")


def from_torch(reader: StateDictReader, arch: dict[str, Any]) -> dict[str, np.ndarray]:
  """Maps a BN-Inception state dict to {'conv1_7x7_s2/kernel': HWIO, 'conv1_7x7_s2_bn/scale': [C], ...}.

  `arch` holds `BNInception` constructor arguments (none change the parameter set).
  """
  shapes = abstract_shapes(BNInception, arch)
  out = take_all(reader, shapes, squeeze_bn=True)
  reader.drop(DROPPED)
  return out
