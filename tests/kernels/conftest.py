"""Kernel tier setup: run the Triton kernels on CPU through the interpreter and force the Triton path.

``TRITON_INTERPRET`` must be set before Triton compiles anything (``@triton.jit`` reads it), hence the module-level
``setdefault`` here: it is a no-op where the caller chose (``TRITON_INTERPRET=0`` on a GPU machine runs the same
tests on CUDA). The kernel modules themselves are imported lazily by ``fxadapt.kernels`` on first use, so it does
not matter whether other test directories imported ``fxadapt`` earlier.

The only global state touched: that environment variable, and the kernels' backend flag (forced to "triton" for
each test by the autouse fixture, restored afterwards). Test modules that exercise the reference path on purpose
set ``NEEDS_TRITON = False``; the others are skipped, with the reason, where the Triton path cannot run at all
(``TRITON_INTERPRET=0`` without CUDA).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import fxadapt.kernels as K
import pytest
from kernel_helpers import triton_runnable


@pytest.fixture(autouse=True)
def _force_triton(request):
    if not getattr(request.module, "NEEDS_TRITON", True):
        yield
        return
    ok, why = triton_runnable()
    if not ok:
        pytest.skip(f"Triton path cannot run here: {why}")
    with K.force_triton():
        yield
