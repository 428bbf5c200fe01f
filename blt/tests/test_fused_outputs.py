"""blt.fused_outputs: the kernels that split and rotate the fused q|k|v product and apply
SwiGLU to the fused w1|w3 product.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported, hence in a child process); without Triton those tests are skipped. On CUDA they are
checked in float32 and bfloat16 against the tensor ops they replace.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
has_triton = importlib.util.find_spec("triton") is not None


def reference(y, rope, H, Hkv):
    """q, k, v as SelfAttention computes them from separate products: split, then rotated."""
    B, T, W = y.shape
    D = W // (H + 2 * Hkv)
    from blt.layers import apply_rotary

    q, k, v = y.split([H * D, Hkv * D, Hkv * D], dim=-1)
    return apply_rotary(q.view(B, T, H, D), rope), apply_rotary(k.view(B, T, Hkv, D), rope), v.view(B, T, Hkv, D)


def compare(device: str, dtype: torch.dtype, tol: float) -> None:
    """Outputs and the gradient of y against the reference, with position tables (T, D/2) and
    per-row (B, T, D/2), grouped keys (Hkv < H) and a row count that is no multiple of the
    kernel's block of rows. tol 0: bit for bit."""
    from blt import fused_outputs
    from blt.layers import Rotary

    g = torch.Generator().manual_seed(0)
    for per_row in (False, True):
        B, T, H, Hkv, D = 2, 37, 4, 2, 16
        y = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(device, dtype)
        rot = Rotary(D, 10000.0).to(device)
        rope = rot(torch.randint(0, 300, (B, T), generator=g).to(device)) if per_row else rot.table(T)
        grads = [torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]
        results = []
        for fn in (lambda y: fused_outputs.rotary_split(y, rope, H, Hkv), lambda y: reference(y, rope, H, Hkv)):
            leaf = y.clone().requires_grad_()
            out = fn(leaf)
            (dy,) = torch.autograd.grad(out, leaf, grads)
            results.append([*out, dy])
        assert all(t.is_contiguous() for t in results[0][:3])
        for a, b, name in zip(*results, ("q", "k", "v", "dy")):
            err = (a.float() - b.float()).abs().max().item()
            assert err <= tol * b.float().abs().max().item(), f"{name} per_row={per_row} {dtype}: {err}"


def compare_qk(device: str, dtype: torch.dtype) -> None:
    """rotate_qk and unrotate_qk (v left in place, as blt.fa4.qkv_attention reads and writes it)
    against rotary_split and its backward: the same q, k and q|k columns of the gradient, bit
    for bit, and the v columns of the gradient untouched."""
    from blt import fused_outputs
    from blt.layers import Rotary

    g = torch.Generator().manual_seed(1)
    B, T, H, Hkv, D = 2, 37, 4, 2, 16
    y = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(device, dtype)
    rope = Rotary(D, 10000.0).to(device).table(T)
    cos, sin = fused_outputs.rope_tables(rope, B, T)
    q, k = fused_outputs.rotate_qk(y, cos, sin, H, Hkv)
    want = fused_outputs.rotary_split(y, rope, H, Hkv)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])

    dq, dk, dv = (torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    want_dy = fused_outputs.rotary_split_backward(dq, dk, dv, cos, sin)
    dy = torch.full_like(y, 7.0)
    fused_outputs.unrotate_qk(dy, dq, dk, cos, sin)
    qk = (H + Hkv) * D
    assert torch.equal(dy[..., :qk], want_dy[..., :qk])
    assert bool((dy[..., qk:] == 7.0).all())


def compare_swiglu(device: str, dtype: torch.dtype, tol: float) -> None:
    """silu(h1) * h3 and the gradient of h against F.silu's, on a shape whose rows and columns
    are no multiples of the kernel's blocks, and on a (B, T, 2F) input."""
    import torch.nn.functional as F
    from blt import fused_outputs

    g = torch.Generator().manual_seed(0)
    for shape in ((37, 2 * 300), (2, 5, 2 * 24)):
        h = torch.randn(*shape, generator=g).to(device, dtype)
        grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(device, dtype)
        results = []
        half = shape[-1] // 2
        for fn in (fused_outputs.swiglu, lambda h: F.silu(h.float()[..., :half]) * h.float()[..., half:]):
            leaf = h.clone().requires_grad_()
            out = fn(leaf)
            (dh,) = torch.autograd.grad(out, leaf, grad.to(out.dtype))
            results.append([out, dh])
        assert results[0][0].shape == results[1][0].shape
        for a, b, name in zip(*results, ("out", "dh")):
            err = (a.float() - b.float()).abs().max().item()
            assert err <= tol * b.float().abs().max().item(), f"swiglu {name} {shape} {dtype}: {err}"


def compare_block() -> None:
    """A transformer block with fused products (the kernels) against the same weights without
    (separate products, apply_rotary, F.silu): output and every parameter's gradient."""
    from blt.config import TransformerConfig
    from blt.layers import Rotary, TransformerBlock, set_fused_products

    torch.manual_seed(0)
    cfg = TransformerConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2)
    block = TransformerBlock(cfg)
    for p in block.parameters():  # norm gains away from 1, so that folding them is exercised
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.2)
    x = torch.randn(2, 21, 48)
    rope = Rotary(cfg.head_dim, 10000.0).table(21)
    mask = torch.ones(21, 21, dtype=torch.bool).tril()
    results = []
    for fused in (True, False):
        set_fused_products(fused)
        block.zero_grad()
        out = block(x, rope, mask)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in block.parameters()])
    set_fused_products(False)
    for a, b in zip(*results):  # float32 sums in other orders (the folded gains among them)
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


CHECKS = textwrap.dedent(
    """
    import sys, torch
    from blt.tests.test_fused_outputs import compare, compare_block, compare_qk, compare_swiglu
    if sys.argv[1] == "kernels":
        compare("cpu", torch.float32, 0.0)
        compare("cpu", torch.bfloat16, 2 ** -7)  # the interpreter rounds to bfloat16 by truncation
        compare_swiglu("cpu", torch.float32, 1e-6)
        compare_swiglu("cpu", torch.bfloat16, 2 ** -6)
        compare_qk("cpu", torch.float32)
    else:
        compare_block()
    print("ok", sys.argv[1])
    """
)


@pytest.mark.skipif(not has_triton, reason="needs Triton (its interpreter runs the kernels on CPU)")
@pytest.mark.parametrize("name", ["kernels", "block"])
def test_kernels_interpreted_match_reference(name):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS, name], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and f"ok {name}" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_reference_on_cuda():
    """Within float32 rounding, and bfloat16 within one rounding of the result: Triton may
    contract a product and a sum into one fused multiply-add, eager PyTorch does not."""
    compare("cuda", torch.float32, 1e-6)
    compare("cuda", torch.bfloat16, 2 ** -7)
    compare_swiglu("cuda", torch.float32, 1e-6)
    compare_swiglu("cuda", torch.bfloat16, 2 ** -7)
    compare_qk("cuda", torch.bfloat16)


def test_unavailable_without_triton_or_device():
    from blt import fused_outputs

    assert not fused_outputs.available("cpu") or os.environ.get("TRITON_INTERPRET") == "1"
