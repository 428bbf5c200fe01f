"""Which arguments torch.compile believes each of the library's Triton kernels writes.

The kernels of blt.patch_runs and blt.fused_outputs run inside compiled graphs (blt.train
--one-graph) as torch.library.triton_op. Before a graph may keep or reuse a buffer, torch asks
which arguments a kernel stores to, from the kernel's Triton IR; a tensor it takes as written is
copied first, one more read and write of it per call (for the SwiGLU input of the byte layers,
256 MiB a call at the bench shape). The analysis is conservative across helper calls: every
pointer handed to a @triton.jit helper counts as written when a store's address or mask depends
on what that helper returns. Each op runs once here with its launches recorded, not run; the
analysis must find exactly each kernel's outputs.
"""

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402

from blt import fused_outputs, patch_runs, triton_support  # noqa: E402

# kernel (and SPLIT for the rotary kernel, which runs both ways) -> the arguments it writes
OUTPUTS = {
    ("_rotate_heads", True): {"Q", "K", "V"},
    ("_rotate_heads", False): {"Y"},
    ("_swiglu_fwd", None): {"O"},
    ("_swiglu_bwd", None): {"DH"},
    ("_bytes_read_patches_fwd", None): {"O"},
    ("_bytes_read_patches_bwd", None): {"DQ", "DK", "DV"},
    ("_patches_read_bytes_fwd", None): {"O", "LSE"},
    ("_patches_read_bytes_bwd", None): {"DQ", "DK", "DV"},
    ("_patch_max_fwd", None): {"O"},
    ("_patch_max_bwd", None): {"DX"},
}


def written(kernel, kwargs) -> set[str]:
    """The tensor arguments torch's analysis takes as stored to (both of its APIs)."""
    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        writes = triton_kernel_wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes
        names = {w.name for w in writes}
    else:  # older releases; the TMA argument came in between
        identify = triton_kernel_wrap.identify_mutated_tensors
        takes_tma = len(inspect.signature(identify).parameters) > 2
        names = set(identify(kernel, kwargs, {}) if takes_tma else identify(kernel, kwargs))
    return {n for n in names if isinstance(kwargs.get(n), torch.Tensor)}


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            self.launches.append((self.kernel, {n: v for n, v in named.items() if n in self.kernel.arg_names}))

        return launch


class _Sm90:
    """Triton's codegen target when no GPU is present: the IR is built, never compiled."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def run_every_op() -> None:
    """Forward and backward of every op on small CPU tensors (the kernels don't run)."""
    B, T, H, D, P, K = 2, 64, 2, 16, 8, 2
    leaf = lambda *shape: torch.randn(*shape, requires_grad=True)  # noqa: E731
    cos, sin = torch.randn(T, D // 2), torch.randn(T, D // 2)
    q, k, v = fused_outputs.rotary_split(leaf(B, T, 3 * H * D), (cos, sin), H, H)
    (q.sum() + k.sum() + v.sum()).backward()
    fused_outputs.swiglu(leaf(B, T, 4 * D)).sum().backward()
    end = torch.full((B, P), T // P).cumsum(1).int()
    start = end - T // P
    slots, bytes_ = (leaf(B, P * K, H, D) for _ in range(2)), (leaf(B, T, H, D) for _ in range(2))
    patch_runs.bytes_read_patches(leaf(B, T, H, D), *slots, start, end).sum().backward()
    patch_runs.patches_read_bytes(leaf(B, P * K, H, D), *bytes_, start, end).sum().backward()
    patch_runs.max_pool(leaf(B, T, D), start, end).sum().backward()


def test_compile_sees_only_the_outputs_written(monkeypatch):
    if fused_outputs.triton is None or patch_runs.triton is None:
        pytest.skip("this torch has no torch.library.triton_op")
    if not any(hasattr(triton_kernel_wrap, f) for f in ("identify_accessed_tensors", "identify_mutated_tensors")):
        pytest.skip("this torch's mutation analysis has another name")
    launches = []
    monkeypatch.setattr(triton_support, "launcher", lambda kernel: _Recorder(kernel, launches))
    run_every_op()
    if not torch.cuda.is_available():
        monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90())
    seen = {(kernel.fn.__name__, kwargs.get("SPLIT")): written(kernel, kwargs) for kernel, kwargs in launches}
    assert set(seen) == set(OUTPUTS), f"kernels launched: {sorted(seen)}"
    wrong = {k: sorted(w) for k, w in seen.items() if w != OUTPUTS[k]}
    assert not wrong, f"taken as written (each extra one is copied before every call): {wrong}"
