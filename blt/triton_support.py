"""Where the library's Triton kernels (blt.patch_runs, blt.fused_outputs, blt.adamw) can run."""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of this device: a CUDA device, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1, how the tests run them)."""
    if not HAS_TRITON:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def launcher(kernel):
    """kernel as an op built with torch.library.triton_op launches it: through wrap_triton, so a
    compiled graph sees it, or directly under the interpreter, whose kernels some torch
    releases' wrap_triton refuses (the interpreter only runs eagerly)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)
