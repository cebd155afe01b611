"""Before the test suite, once per environment: compile DeepSpeed's CPU collectives op, which the ZeRO runs
on CPU load (torch caches it under ~/.cache/torch_extensions). Compiling it takes over a minute of both
cores; done here, it is not done while the suite runs, competing with the tests. Never fails: if the op
can't be built here, the DeepSpeed tests say why."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
try:
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
except Exception as e:  # the tests that need the op report it
    print(f"tests/prepare.py: DeepSpeed's CPU op was not built ({type(e).__name__}: {e})", file=sys.stderr)
