"""Suite-wide settings: offline hubs, parsed absl flags (grain workers read them), CPU-friendly numerics."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain's multiprocessing workers read absl flags; outside absl.app.run they are unparsed.
flags.FLAGS.mark_as_parsed()
