"""blt.rotary_split: the fused q|k|v product's split and rotary embedding as one kernel.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported, hence in a child process); without Triton those tests are skipped. On CUDA they are
checked in float32 and bfloat16 against layers.apply_rotary.
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
    from blt import rotary_split
    from blt.layers import Rotary

    g = torch.Generator().manual_seed(0)
    for per_row in (False, True):
        B, T, H, Hkv, D = 2, 37, 4, 2, 16
        y = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(device, dtype)
        rot = Rotary(D, 10000.0).to(device)
        rope = rot(torch.randint(0, 300, (B, T), generator=g).to(device)) if per_row else rot.table(T)
        grads = [torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]
        results = []
        for fn in (lambda y: rotary_split.rotary_split(y, rope, H, Hkv), lambda y: reference(y, rope, H, Hkv)):
            leaf = y.clone().requires_grad_()
            out = fn(leaf)
            (dy,) = torch.autograd.grad(out, leaf, grads)
            results.append([*out, dy])
        assert all(t.is_contiguous() for t in results[0][:3])
        for a, b, name in zip(*results, ("q", "k", "v", "dy")):
            err = (a.float() - b.float()).abs().max().item()
            assert err <= tol * b.float().abs().max().item(), f"{name} per_row={per_row} {dtype}: {err}"


def compare_attention() -> None:
    """A self-attention with fused products (the kernel) against the same weights without
    (separate products, apply_rotary): output and every parameter's gradient."""
    from blt.config import TransformerConfig
    from blt.layers import Rotary, SelfAttention, set_fused_products

    torch.manual_seed(0)
    cfg = TransformerConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2)
    attn = SelfAttention(cfg)
    x = torch.randn(2, 21, 48)
    rope = Rotary(cfg.head_dim, 10000.0).table(21)
    mask = torch.ones(21, 21, dtype=torch.bool).tril()
    results = []
    for fused in (True, False):
        set_fused_products(fused)
        attn.zero_grad()
        out = attn(x, rope, mask)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in attn.parameters()])
    set_fused_products(False)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


CHECKS = textwrap.dedent(
    """
    import sys, torch
    from blt.tests.test_rotary_split import compare, compare_attention
    if sys.argv[1] == "kernel":
        compare("cpu", torch.float32, 0.0)
        compare("cpu", torch.bfloat16, 2 ** -7)  # the interpreter rounds to bfloat16 by truncation
    else:
        compare_attention()
    print("ok", sys.argv[1])
    """
)


@pytest.mark.skipif(not has_triton, reason="needs Triton (its interpreter runs the kernels on CPU)")
@pytest.mark.parametrize("name", ["kernel", "attention"])
def test_rotary_split_interpreted_matches_reference(name):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS, name], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and f"ok {name}" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotary_split_matches_reference_on_cuda():
    """Within float32 rounding, and bfloat16 within one rounding of the result: Triton may
    contract a product and a sum into one fused multiply-add, eager PyTorch does not."""
    compare("cuda", torch.float32, 1e-6)
    compare("cuda", torch.bfloat16, 2 ** -7)


def test_unavailable_without_triton_or_device():
    from blt import rotary_split

    assert not rotary_split.available("cpu") or os.environ.get("TRITON_INTERPRET") == "1"
