"""blt.patch_runs: the kernels that walk each patch's run of bytes.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported, hence in a child process); without Triton those tests are skipped. On CUDA they are
checked against FlexAttention, in float32 and bfloat16.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blt import masks as M
from blt.encoder import max_pool_patches

ROOT = Path(__file__).resolve().parents[2]
has_triton = importlib.util.find_spec("triton") is not None


def random_lengths(B: int, T: int, P: int, generator: torch.Generator) -> torch.Tensor:
    """(B, P) patch lengths summing to T per row, 1-5 bytes each, zero-padded on the right."""
    out = torch.zeros(B, P, dtype=torch.long)
    for b in range(B):
        left, p = T, 0
        while left > 0:
            n = left if p == P - 1 else min(left, int(torch.randint(1, 6, (1,), generator=generator)))
            out[b, p], left, p = n, left - n, p + 1
    return out


def test_runs_are_the_bytes_of_each_index():
    g = torch.Generator().manual_seed(0)
    lengths = random_lengths(3, 40, 20, g)
    ids = M.patch_ids_from_lengths(lengths, 40)
    for ids_ in (ids, M.decoder_patch_ids(ids, torch.tensor([True, False, True]))):
        start, end = M.runs(ids_, 20)
        for b in range(3):
            for p in range(20):
                where = (ids_[b] == p).nonzero().flatten()
                if len(where):
                    assert (start[b, p], end[b, p]) == (where[0], where[-1] + 1)
                else:
                    assert start[b, p] == end[b, p]
        assert torch.equal(end[:, -1], torch.full((3,), 40, dtype=torch.int32))  # the last run ends the row


def interpreter_loops_over_loaded_bounds() -> bool:
    """Whether this Triton's interpreter runs a loop whose bounds were loaded from memory, as
    every kernel here does (Triton 3.6's interpreter cannot; compiled kernels can)."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(X, O):
        n = 0
        for _ in range(tl.load(X), tl.load(X + 1)):
            n += 1
        tl.store(O, n)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](torch.tensor([2, 5], dtype=torch.int32), out)
    except Exception:  # the interpreter's error type differs between versions
        return False
    return int(out) == 3


CHECKS = textwrap.dedent(
    """
    import sys
    import torch
    from blt import masks as M, patch_runs
    from blt.config import tiny
    from blt.encoder import max_pool_patches
    from blt.entropy_model import EntropyModel
    from blt.layers import attend
    from blt.model import BLT
    from blt.tests.test_patch_runs import interpreter_loops_over_loaded_bounds, random_lengths

    assert patch_runs.available("cpu")
    if not interpreter_loops_over_loaded_bounds():
        print("skip")
        sys.exit(0)
    g = torch.Generator().manual_seed(0)
    B, T, P, k = 3, 40, 20, 2
    lengths = random_lengths(B, T, P, g)  # rows end in empty (padding) patches
    assert (lengths == 0).any()
    ids = M.patch_ids_from_lengths(lengths, T)
    dec = M.decoder_patch_ids(ids, torch.tensor([True, False, True]))
    dense = M.build_masks(ids, dec, P, k, None, None, None, None, None, "dense")
    runs = M.build_masks(ids, dec, P, k, None, None, None, None, None, "flex")
    assert isinstance(runs.enc_cross, M.PatchRuns) and isinstance(runs.dec_cross, M.PatchRuns)

    def grads(out, inputs, grad):
        return torch.autograd.grad(out, inputs, grad)

    def check(name):
        if name == "max_pool":
            # many ties; no zeros: where a patch's max is exactly 0, scatter_reduce also gives a
            # share of the gradient to its zero initial value (include_self=False or not)
            x = (torch.randn(B, T, 200, generator=g) * 2).round() + 0.5
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref, out = max_pool_patches(a, ids, P), max_pool_patches(b, ids, P, runs.enc_cross)
            gr = torch.randn(ref.shape, generator=g)
            assert torch.equal(ref, out)
            assert torch.equal(*grads(ref, a, gr), *grads(out, b, gr))
            x = torch.zeros(1, 3, 1, requires_grad=True)  # one patch, its max (0) held by all three
            pooled = max_pool_patches(x, None, 1, M.PatchRuns(torch.tensor([[0]]).int(), torch.tensor([[3]]).int(), "patches"))
            assert torch.equal(grads(pooled, x, torch.ones(1, 1, 1))[0], torch.full((1, 3, 1), 1 / 3))
            return
        for H, Hkv in ((4, 4), (4, 2)):  # grouped-query heads too
            Q, K = (T, P * k) if name == "decoder" else (P * k, T)
            mask_dense, mask_runs = (dense.dec_cross, runs.dec_cross) if name == "decoder" else (dense.enc_cross, runs.enc_cross)
            q = torch.randn(B, H, Q, 16, generator=g, requires_grad=True)
            kk, v = (torch.randn(B, Hkv, K, 16, generator=g, requires_grad=True) for _ in range(2))
            ref, out = attend(q, kk, v, mask_dense), attend(q, kk, v, mask_runs)
            gr = torch.randn(ref.shape, generator=g)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(grads(out, (q, kk, v), gr), grads(ref, (q, kk, v), gr)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            if name == "decoder":  # bytes before the first complete patch read nothing
                assert (out[0, :, : int(runs.dec_cross.start[0, 0])] == 0).all()

    def check_model():
        torch.manual_seed(0)
        cfg = tiny()
        # patches of 4 bytes, so the encoder's softmax has several keys (an untrained entropy
        # model cuts mostly 1-byte patches)
        cfg.patcher.mode = "static"
        model = BLT(cfg, EntropyModel(cfg.entropy_model)).eval()
        x = torch.randint(4, 260, (2, 65))
        x[:, 0] = 1
        with torch.no_grad():  # FlexAttention runs no backward on CPU: forward only here
            ref = model(x[:, :-1], x[:, 1:], backend="dense")
            out = model(x[:, :-1], x[:, 1:], backend="flex")
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)

    def check_gaps():
        # runs with gaps between them and bytes after the last one (each kernel program owns the
        # gap before its runs; the last program owns the row's tail): those bytes read nothing
        # (decoder: zero output) and get no gradient (encoder: zero key/value gradients)
        B, T, P, k, H = 2, 150, 40, 2, 4
        bounds = torch.sort(torch.randint(0, T - 5, (B, 2 * P), generator=g), dim=1).values.int()
        start, end = bounds[:, 0::2].contiguous(), bounds[:, 1::2].contiguous()
        t = torch.arange(T)
        slot_run = lambda x: x.repeat_interleave(k, dim=1)[:, :, None]  # (B, P·k, 1)
        inside = (t >= slot_run(start)) & (t < slot_run(end))  # (B, P·k, T)
        for queries, dense in (("bytes", inside.transpose(1, 2)), ("patches", inside)):
            Q, K = dense.shape[1:]
            q = torch.randn(B, H, Q, 16, generator=g, requires_grad=True)
            kk, v = (torch.randn(B, H, K, 16, generator=g, requires_grad=True) for _ in range(2))
            ref, out = attend(q, kk, v, dense[:, None]), attend(q, kk, v, M.PatchRuns(start, end, queries))
            gr = torch.randn(ref.shape, generator=g)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(grads(out, (q, kk, v), gr), grads(ref, (q, kk, v), gr)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (end[:, -1] < T).all() and not inside.any(1)[:, -5:].any()
        # the max-pool on the same runs, against a loop over the patches (ties: integer values)
        x = (torch.randn(B, T, 70, generator=g) * 2).round().requires_grad_()
        gr = torch.randn(B, P, 70, generator=g)
        out = patch_runs.max_pool(x, start, end)
        (dx,) = grads(out, x, gr)
        ref, ref_dx = torch.zeros(B, P, 70), torch.zeros(B, T, 70)
        for b in range(B):
            for p in range(P):
                s, e = int(start[b, p]), int(end[b, p])
                if e > s:
                    run = x.detach()[b, s:e]
                    ref[b, p] = run.max(0).values
                    top = (run == ref[b, p]).float()
                    ref_dx[b, s:e] += top * gr[b, p] / top.sum(0)
        assert torch.equal(out, ref) and torch.allclose(dx, ref_dx, atol=1e-6)

    name = sys.argv[1]
    {"model": check_model, "gaps": check_gaps}.get(name, lambda: check(name))()
    print("ok", name)
    """
)


@pytest.mark.skipif(not has_triton, reason="needs Triton (its interpreter runs the kernels on CPU)")
@pytest.mark.parametrize("name", ["decoder", "encoder", "gaps", "max_pool", "model"])
def test_kernels_interpreted_match_reference(name):
    """The decoder and encoder cross-attentions (values and gradients of q, k, v) against dense
    SDPA with the masks, also on runs with gaps and a tail that no run covers; the max-pool
    against scatter_reduce's amax, ties included; a tiny BLT's
    logits with the kernels against the dense reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS, name], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout.strip() == "skip":
        pytest.skip("this Triton's interpreter cannot loop over bounds loaded from memory (the CUDA test covers the kernels)")
    assert done.returncode == 0 and f"ok {name}" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_flex_attention_on_cuda():
    """At the bench preset's shapes (6 heads of 64, k = 2, about 3 bytes a patch): outputs and
    gradients of the kernels against FlexAttention with the same masks. In float32 they agree
    closely. In bfloat16 both are compared with the float32 result: the kernels' root-mean-square
    error is of FlexAttention's size (the largest single errors differ by chance: the two round
    different intermediates)."""
    from blt.layers import attend

    g = torch.Generator().manual_seed(0)
    B, T, P, k, H = 2, 2048, 512, 2, 6
    lengths = random_lengths(B, T, P, g).cuda()
    ids = M.patch_ids_from_lengths(lengths, T)
    dec = M.decoder_patch_ids(ids, torch.tensor([True, False], device="cuda"))
    M.set_patch_kernels(False)
    try:
        flex = M.build_masks(ids, dec, P, k, None, None, None, None, None, "flex")
    finally:
        M.set_patch_kernels(True)
    runs = M.build_masks(ids, dec, P, k, None, None, None, None, None, "flex")
    assert isinstance(runs.dec_cross, M.PatchRuns) and not isinstance(flex.dec_cross, M.PatchRuns)

    def run(mask, inputs, grad):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = attend(*inputs, mask, cross=True)
        return [out.float(), *(d.float() for d in torch.autograd.grad(out, inputs, grad.to(out.dtype)))]

    for queries in ("bytes", "patches"):
        Q, K = (T, P * k) if queries == "bytes" else (P * k, T)
        mask_flex, mask_runs = (flex.dec_cross, runs.dec_cross) if queries == "bytes" else (flex.enc_cross, runs.enc_cross)
        # the layout the projections give: (B, L, H, D) viewed as (B, H, L, D)
        q = torch.randn(B, Q, H, 64, device="cuda").transpose(1, 2)
        kk, v = (torch.randn(B, K, H, 64, device="cuda").transpose(1, 2) for _ in range(2))
        grad = torch.randn(B, Q, H, 64, device="cuda").transpose(1, 2)
        truth = run(mask_flex, (q, kk, v), grad)
        for a, b, name in zip(run(mask_runs, (q, kk, v), grad), truth, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{queries} {name} float32")
        half = [x.bfloat16() for x in (q, kk, v)]
        ours, theirs = run(mask_runs, half, grad), run(mask_flex, half, grad)
        for a, b, t, name in zip(ours, theirs, truth, ("out", "dq", "dk", "dv")):
            err, err_flex = ((x - t).square().mean().sqrt().item() / t.square().mean().sqrt().item() for x in (a, b))
            assert err < 1e-2 and err <= 1.5 * err_flex, f"{queries} {name} bfloat16: relative RMS error {err}, FlexAttention's {err_flex}"
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, T, 384, device="cuda", dtype=dtype, requires_grad=True)
        ref, out = max_pool_patches(x, ids, P), max_pool_patches(x, ids, P, runs.enc_cross)
        assert torch.equal(out, ref)
        gr = torch.randn_like(ref)
        torch.testing.assert_close(*torch.autograd.grad(out, x, gr), *torch.autograd.grad(ref, x, gr))
