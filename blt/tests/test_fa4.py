"""--attention fa4: the causal self-attentions given by their shape (masks.CausalRows) and run
on FlashAttention-4's own kernels (blt.fa4) where those take the inputs, on the same mask as a
BlockMask elsewhere."""

import pytest
import torch

from blt import fa4
from blt import masks as M
from blt.layers import attend
from blt.packing import packed_patch_count, packing_plan


@pytest.fixture
def fa4_masks():
    M.set_fa4(True)
    yield
    M.set_fa4(False)


def packed_rows(extra: int = 50, align: int = M.BLOCK):
    """Three rows of 201, 261 and 91 patches packed, then `extra` padding slots."""
    lengths = torch.tensor([[1] + [3] * 200 + [0] * 60, [1] + [2] * 260, [1] + [5] * 90 + [0] * 170])
    return packing_plan(lengths, packed_patch_count(lengths, align) + extra, align)


@pytest.mark.parametrize("window", [None, 40])
def test_causal_rows_stand_for_the_flex_masks(fa4_masks, window):
    """With fa4 on, the flex backend gives the self-attentions as CausalRows whose BlockMask is
    the one it gives otherwise; the dense backend is unchanged; off the kernels (float32 on
    CPU), attend runs that BlockMask and matches the dense mask."""
    T = 300
    rows = M.causal_mask(T, window, "flex", "cpu")
    assert isinstance(rows, M.CausalRows) and rows.window == window and rows.bounds is None
    M.set_fa4(False)
    plain = M.causal_mask(T, window, "flex", "cpu")
    assert torch.equal(rows.flex().to_dense(), plain.to_dense())
    dense = M.causal_mask(T, window, "dense", "cpu")
    M.set_fa4(True)
    assert torch.equal(M.causal_mask(T, window, "dense", "cpu"), dense)
    q, k, v = (torch.randn(2, 3, T, 16) for _ in range(3))
    assert (attend(q, k, v, rows) - attend(q, k, v, dense)).abs().max() < 1e-5

    plan = packed_rows()
    packed = M.packed_patch_mask(plan.doc, plan.first, window, "flex", aligned=True, bounds=plan.bounds)
    assert isinstance(packed, M.CausalRows) and packed.bounds is plan.bounds
    without = M.packed_patch_mask(plan.doc, plan.first, window, "flex", aligned=True)  # no bounds: flex
    assert torch.equal(packed.flex().to_dense(), without.to_dense())
    dense = M.packed_patch_mask(plan.doc, plan.first, window, "dense")
    N = plan.doc.shape[0]
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    assert (attend(q, k, v, packed) - attend(q, k, v, dense)).abs().max() < 1e-5


def test_causal_rows_only_with_fa4():
    assert not isinstance(M.causal_mask(64, 16, "flex", "cpu"), M.CausalRows)
    plan = packed_rows()
    assert not isinstance(M.packed_patch_mask(plan.doc, plan.first, None, "flex", True, plan.bounds), M.CausalRows)


def test_fake_shapes():
    """The shapes a compiler sees for the ops' outputs (FlashAttention-4's layouts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, kv = torch.empty(2, 64, 6, 32, dtype=torch.bfloat16), torch.empty(2, 64, 2, 32, dtype=torch.bfloat16)
        out, lse = torch.ops.blt.fa4_causal(q, kv, kv, 16, None)
        assert out.shape == q.shape and lse.shape == (2, 6, 64) and lse.dtype == torch.float32
        bounds = torch.empty(4, dtype=torch.int32)
        out, lse = torch.ops.blt.fa4_causal(q[0], kv[0], kv[0], 0, bounds)
        assert out.shape == (64, 6, 32) and lse.shape == (6, 64)
        grads = torch.ops.blt.fa4_causal_backward(out, q[0], kv[0], kv[0], out, lse, 0, bounds)
        assert [g.shape for g in grads] == [q[0].shape, kv[0].shape, kv[0].shape]


def cuda_case(window, packed):
    """-> B, T, the dense mask on CUDA and the kernels' bounds: two rows of 1000 (packed None),
    or packed_rows(packed) unaligned, as fa4 packs, in one row."""
    if packed is None:
        return 2, 1000, M.causal_mask(1000, window, "dense", "cuda"), None
    plan = packed_rows(packed, align=1)
    mask = M.packed_patch_mask(plan.doc.cuda(), plan.first.cuda(), window, "dense")
    return 1, plan.doc.shape[0], mask, plan.bounds.cuda()


@pytest.mark.skipif(not (torch.cuda.is_available() and fa4.available()), reason="needs CUDA and flash-attn-4")
@pytest.mark.parametrize(
    ("window", "packed", "kv_heads"),
    [(256, None, 4), (None, None, 2), (None, 50, 4), (64, 50, 4), (None, 0, 4)],
)
def test_kernels_match_float32_reference(window, packed, kv_heads):
    """bf16 FlashAttention-4 against float32 SDPA on the dense mask: output and gradients within
    bf16 rounding (1%), sliding windows, grouped-query heads, packed rows of several lengths
    (packed: that many padding slots after them, unaligned, as fa4 packs; 0: an empty last
    sequence)."""
    torch.manual_seed(0)
    B, T, mask, bounds = cuda_case(window, packed)
    q = torch.randn(B, 4, T, 64, device="cuda")
    k, v = (torch.randn(B, kv_heads, T, 64, device="cuda") for _ in range(2))
    g = torch.randn_like(q)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want = attend(*ref, mask)
    want.backward(g)
    got_in = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    got = fa4.attention(*got_in, window, bounds)
    got.backward(g.bfloat16())
    pairs = [(got, want)] + [(a.grad, b.grad) for a, b in zip(got_in, ref)]
    errors = [((a.float() - b).norm() / b.norm()).item() for a, b in pairs]
    assert max(errors) < 0.01, errors


def test_qkv_fake_shapes():
    """The shapes a compiler sees for the fused q|k|v attention's ops: _causal's output and
    log-sum-exp, the rotated q and k, and y's gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        H, Hkv, D = 6, 2, 32
        for B, bounds in ((2, None), (1, torch.empty(4, dtype=torch.int32))):
            y, cos = torch.empty(B, 64, (H + 2 * Hkv) * D, dtype=torch.bfloat16), torch.empty(B, 64, D // 2)
            out, lse, q, k = torch.ops.blt.fa4_qkv(y, cos, cos, H, Hkv, 16, bounds)
            assert q.shape == (B, 64, H, D) and k.shape == (B, 64, Hkv, D)
            want_out, want_lse = torch.ops.blt.fa4_causal(q if bounds is None else q[0], k, k, 16, bounds)
            assert out.shape == want_out.shape and lse.shape == want_lse.shape and lse.dtype == torch.float32
            dy = torch.ops.blt.fa4_qkv_backward(out, y, q, k, out, lse, cos, cos, 16, bounds)
            assert dy.shape == y.shape and dy.dtype == y.dtype


@pytest.mark.skipif(not (torch.cuda.is_available() and fa4.available()), reason="needs CUDA and flash-attn-4")
@pytest.mark.parametrize(("window", "packed", "kv_heads"), [(256, None, 4), (None, None, 2), (64, 50, 4), (None, 0, 2)])
def test_qkv_attention_matches_float32_reference(window, packed, kv_heads):
    """qkv_attention (v and its gradient read and written in the fused product's output) against
    float32: the product split, q and k rotated (layers.apply_rotary), SDPA on the dense mask.
    Output and y's gradient within bf16 rounding (1%); windows, grouped-query heads, packed rows."""
    from blt.layers import Rotary
    from blt.tests.test_fused_outputs import reference

    torch.manual_seed(0)
    H, D = 4, 64
    B, T, mask, bounds = cuda_case(window, packed)
    rope = Rotary(D, 10000.0).cuda().table(T)
    y = torch.randn(B, T, (H + 2 * kv_heads) * D, device="cuda")
    g = torch.randn(B, T, H * D, device="cuda")

    ref = y.clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in reference(ref, rope, H, kv_heads))
    want = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
    want.backward(g)
    got_in = y.bfloat16().requires_grad_()
    got = fa4.qkv_attention(got_in, rope, H, kv_heads, window, bounds)
    got.backward(g.bfloat16())
    errors = [((a.float() - b).norm() / b.norm()).item() for a, b in ((got, want), (got_in.grad, ref.grad))]
    assert max(errors) < 0.01, errors
