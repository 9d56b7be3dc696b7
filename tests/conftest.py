"""Shared fixtures."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter: CI tests the same
# kernel source the GPU compiles. Set before anything imports mezo_replay.kernels.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "compiled", "triton"])
def backend(request):
    """Runs a test once per backend; they must give identical bits. triton takes the CPU tensors too
    where the kernels are interpreted (no GPU), and CUDA tensors where there is one."""
    from mezo_replay.kernels import cpu_kernel, steps, triton_kernels

    if request.param == "compiled" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    if request.param == "triton" and not triton_kernels.available():
        pytest.skip("Triton is not installed")
    steps.set_backend(request.param)
    yield request.param
    steps.set_backend("auto")


# Parametrized cases that repeat a kind the default run already covers, at the cost of Triton's
# interpreter (15-25 s each on two cores): they run with `pytest -m slow`. Kept by default: the largest
# eps/lr case of every 16-bit pattern test, and triton -> compiled for bf16.
_SLOW_CASES = [
    ("test_every_16_bit_pattern_replays_like_the_reference[triton-interpreted-", ("-16.0-4.0-",)),
    ("test_backends_agree_across_training_and_replay[", ("bf16-",)),
]


# Plain repeats moved to -m slow the same way: (name prefix, the cases of it the default run keeps).
_SLOW_REPEATS = [
    # the torch path repeats the compiled kernel's NaN cases (about 15 s); it keeps the diverged one
    ("test_a_failing_step_mid_run_is_the_legacy_one[torch-", ("-bad2-",)),
]


# Multi-process (torchrun, gloo) cases that the default run leaves to -m slow for time only: it keeps a
# data-parallel train -> reconstruct, a distributed rebuild and the FSDP2 shard passes under torchrun.
_MULTI_PROCESS = (
    "test_ranks_started_with_other_settings_refuse_in_one_line",
    "test_an_error_on_one_rank_ends_every_rank_with_one_line",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.name.split("[")[0] in _MULTI_PROCESS:
            item.add_marker(pytest.mark.slow)
        for prefix, kept in _SLOW_REPEATS:
            if item.name.startswith(prefix) and not any(k in item.name for k in kept):
                item.add_marker(pytest.mark.slow)
        for prefix, kept in _SLOW_CASES:
            name = item.name
            if name.startswith(prefix) and not any(k in name for k in kept) and \
                    ("triton-compiled" in name or "triton-interpreted" in name):
                item.add_marker(pytest.mark.slow)
