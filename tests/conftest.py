"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["torch", "compiled"])
def backend(request):
    """Runs a test once per CPU backend; they must give identical bits."""
    from mezo_replay import cpu_kernel, steps

    if request.param == "compiled" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    steps.set_backend(request.param)
    yield request.param
    steps.set_backend("auto")
