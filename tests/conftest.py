"""Shared fixtures."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter: CI tests the same
# kernel source the GPU compiles. Set before anything imports mezo_replay.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "compiled", "triton"])
def backend(request):
    """Runs a test once per backend; they must give identical bits. triton takes the CPU tensors too
    where the kernels are interpreted (no GPU), and CUDA tensors where there is one."""
    from mezo_replay import cpu_kernel, steps, triton_kernels

    if request.param == "compiled" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    if request.param == "triton" and not triton_kernels.available():
        pytest.skip("Triton is not installed")
    steps.set_backend(request.param)
    yield request.param
    steps.set_backend("auto")
