"""torchvision / timm ResNet state dict -> flat NNX paths of `dml_jax.backbones.resnet.ResNet`.

torchvision and timm share the key layout (`conv1.weight`, `bn1.running_mean`,
`layer1.0.downsample.0.weight`, ...), so one mapping serves both. Dropped on purpose: the classifier
`fc.*` and BN's `num_batches_tracked` counters (torch reads them only when momentum is None).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dml_jax.backbones.resnet import ResNet
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.torch_cnn import abstract_shapes, take_all

DROPPED = (r"fc\.(weight|bias)", r".*\.num_batches_tracked")


def from_torch(reader: StateDictReader, arch: dict[str, Any]) -> dict[str, np.ndarray]:
  """Maps a ResNet state dict to {'conv1/kernel': HWIO array, 'bn1/scale': [C], ...}.

  `arch` holds `ResNet` constructor arguments (`layers`, `channels`, `stem_width`); every tensor that
  architecture needs is taken from the reader, so a checkpoint of another depth reports each missing
  and left-over key at `reader.finish()`.
  """
  shapes = abstract_shapes(ResNet, arch)
  out = take_all(reader, shapes)
  reader.drop(DROPPED)
  return out
