"""Kernel tier setup: run the Triton kernels on CPU through the interpreter and force the Triton path.

``TRITON_INTERPRET`` must be set before ``triton.language`` is first imported (Triton fixes the mode of its own
jitted library then), hence the module-level ``setdefault`` here: a no-op where the caller chose
(``TRITON_INTERPRET=0`` on a GPU machine runs the same tests on CUDA). In a whole-suite run this conftest is loaded
when pytest reaches ``tests/kernels/``, which sorts before the ``tests/test_*.py`` modules that import
``fxadapt`` (and, through ``torch.compiler``/Dynamo, Triton). If something imported Triton earlier anyway, the
interpreter is off for the process and every Triton test is skipped with that reason (see ``_force_triton``);
run ``pytest tests/kernels`` on its own then, or set ``TRITON_INTERPRET=1`` in a root conftest.

The only global state touched: that environment variable, and the kernels' backend flag (forced to "triton" for
each test by the autouse fixture, restored afterwards). Test modules that exercise the reference path on purpose
set ``NEEDS_TRITON = False``; the others are skipped, with the reason, where the Triton path cannot run at all
(``TRITON_INTERPRET=0`` without CUDA).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from kernel_helpers import triton_runnable

import fxadapt.kernels as K


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
