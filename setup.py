"""Only for the optional compiled CPU kernel; everything else is in pyproject.toml.

The kernel is loaded with ctypes (no Python API), and `optional=True` lets installation go on without a C
compiler: mezo-replay then falls back to its torch path, with a warning, and the same results.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mezo_replay.kernels._cpu_kernel", ["mezo_replay/kernels/_cpu_kernel.c"], optional=True,
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-Wno-psabi"],
)])
