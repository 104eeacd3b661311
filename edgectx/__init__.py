"""edgectx: chat with very long local documents on one machine.

    from edgectx.engine import Engine
    engine = Engine.load(default_model_path())
"""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP threads that finish a parallel region sleep instead of spinning. PyTorch and ggml share one libgomp,
# which reads this once, when the first of them loads; with the default (spin), two threads on a 2-core
# machine that is also running anything else wait for each other for milliseconds per matrix product
# (measured: 40 ms against 0.5 ms for one 8192x2048 Q4_K product on a busy machine). A value the user set
# wins; EDGECTX_KEEP_OMP=1 leaves the environment alone (bench speed runs llama.cpp that way, as users do).
OMP_WAIT_POLICY_SET = os.environ.get("EDGECTX_KEEP_OMP") != "1" and "OMP_WAIT_POLICY" not in os.environ
if OMP_WAIT_POLICY_SET:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:
    __version__ = version("edgectx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
