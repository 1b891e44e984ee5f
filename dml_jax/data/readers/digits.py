"""`digits`: the embedded demo tree (dml_jax.data.digits), read with the cub200 class-folder rule."""

from __future__ import annotations

from dml_jax.data.readers import common, cub
from dml_jax.data.records import DatasetSplits

NAME = "digits"
DIR_NAMES = ("digits",)
LAYOUTS = ("digits/images/<NNN.digit_K>/<image>.png   (written by dml_jax.data.digits.ensure_digits_tree)",)
NUM_CLASSES = 10
RULE = common.ClassRule(identify=common.int_prefix_id, num_classes=NUM_CLASSES, num_train=5,
                        folder_pattern=lambda c: f"images/{c:03d}.digit_{c - 1}", naming="'NNN.digit_K' (001 to 010)",
                        sort="int_prefix")
PUBLISHED = {
    "train": common.Published(901, 5, "sklearn load_digits, digits 0-4"),
    "eval": common.Published(896, 5, "sklearn load_digits, digits 5-9"),
}
detect = cub.detect


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  del skip_missing
  return common.read_class_folders(NAME, folder, layout, RULE)
