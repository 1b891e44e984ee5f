"""Suite-wide settings: offline hubs, parsed absl flags (grain workers read them), a compilation cache."""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and their subprocesses, which inherit these variables) compile the same tiny models; XLA's
# persistent cache keys on the HLO and the flags, so a hit is always the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

# grain's multiprocessing workers read absl flags; outside absl.app.run they are unparsed.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402
from reference import References  # noqa: E402


# Every test that takes `ref` runs twice: '[file]' against the committed references (the default run, no
# torch needed) and '[live]' against the real libraries (`pytest -m parity`). Module scope: a module's
# expensive fixtures built on `ref` are built once per mode.
@pytest.fixture(scope="module", params=["file", pytest.param("live", marks=pytest.mark.parity)])
def ref(request) -> References:
  return References(request.param, test=str(pathlib.Path(request.module.__file__).relative_to(
      pathlib.Path(__file__).resolve().parent.parent)))
