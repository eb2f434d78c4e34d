"""Test configuration: on a machine without a GPU, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before bus_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bus_kernels  # noqa: E402,F401  (import after the environment is set)
