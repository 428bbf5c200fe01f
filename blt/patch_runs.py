"""Kernels that walk each patch's run of bytes (Triton): the byte <-> patch cross-attentions
for the paper's default windows (§3.2.2, §3.3.1), where each patch's k queries read only that
patch's bytes (encoder) and each byte reads only the k keys of the latest patch whose bytes
are all <= it (decoder); and the encoder's max-pooling of each patch's bytes.

Both masks are block-diagonal with tiny blocks: a patch holds about 4.5 bytes, and a byte
reads k = 2 keys. FlexAttention computes them on 128 x 128 score tiles that are nearly all
masked. Here one program takes one head of PATCHES_PER_PROGRAM consecutive patches (their
k·PATCHES_PER_PROGRAM key or query slots) and the bytes of their runs, in chunks of
BYTES_PER_CHUNK: scores of a chunk against the slots are one small matrix product, masked by
the runs, as in FlashAttention. The backward needs no atomics: every byte belongs to one
program's runs and every slot to one program's patches, so each gradient row is written by
exactly one program.

A run is given as (start, end) per (row, patch), bytes start..end-1, non-decreasing along
the row:
- encoder: the bytes of patch p (its queries are slots p·k .. p·k+k-1);
- decoder: the bytes whose latest complete patch is p (they read slots p·k .. p·k+k-1).
Bytes in no run (the decoder's bytes before the first complete patch) read nothing and
output zeros, as FlexAttention does for a query row with no visible key.

The kernels run on CUDA, and on CPU under TRITON_INTERPRET=1 (how the tests check them).
Inputs are (B, L, heads, head_dim) with a unit last stride: the projections' output viewed
per head, so the attention output needs no transpose either. Softmax in float32; the
products take the inputs' dtype (16-bit inputs: probabilities rounded to it, as FlashAttention
and FlexAttention do; float32 inputs: full float32 products), accumulating in float32.

Replaces: FlexAttention (and the dense masks) for the one-patch cross-attentions, and the
masked max over each patch's bytes. Equal to it: test_patch_runs.py:
test_kernels_interpreted_match_reference (CPU), test_kernels_match_flex_attention_on_cuda;
test_compiled_step.py on CUDA.
"""


import torch

from blt import triton_support

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op
except ImportError:  # no Triton (CPU-only torch), or a torch without triton_op
    triton = None


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on tensors of this device (blt.triton_support)."""
    return triton is not None and triton_support.available(device)


# Warps of each program: Triton's default, overall the fastest of 1, 2, 4 and 8 for these kernels
# on an H200 (bench/patch_kernels.py sweeps it).
NUM_WARPS = 4
# The cross-attention kernels: each program takes one head of this many consecutive patches (their
# key or query slots) and walks the bytes of their runs in chunks of BYTES_PER_CHUNK. 8 and 16: of
# 8/16/32 x 16/32/64 the fastest for the four cross-attention kernels together on an H200 (cold L2,
# 4.5 bytes a patch; one call of each 177 µs against 191 µs for 16 and 32; bench/patch_kernels.py).
PATCHES_PER_PROGRAM = 8
BYTES_PER_CHUNK = 16


def _warps() -> dict:
    """The launch option for NUM_WARPS: none at Triton's default, so that the compiled training
    step launches the kernels as they were measured in it."""
    return {} if NUM_WARPS == 4 else {"num_warps": NUM_WARPS}


def _meta(Hkv: int, q: torch.Tensor, k: int) -> dict:
    """Launch constants for q (B, L, H, D) and k key/query slots per patch."""
    H, D = q.shape[2], q.shape[3]
    return dict(
        G=H // Hkv, D=D, KS=k, PP=PATCHES_PER_PROGRAM, BS=max(16, triton.next_power_of_2(PATCHES_PER_PROGRAM * k)),
        BD=max(16, triton.next_power_of_2(D)), R=BYTES_PER_CHUNK, IEEE=q.dtype == torch.float32,
        **_warps(),
    )  # fmt: skip


def _grid(q: torch.Tensor, P: int) -> tuple[int, int, int]:
    return triton.cdiv(P, PATCHES_PER_PROGRAM), q.shape[0], q.shape[2]


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _group_sum(g: torch.Tensor, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, H, D) per-query-head key gradients -> (B, L, Hkv, D): heads sharing a key summed."""
    B, L, H, D = g.shape
    if H != Hkv:
        g = g.view(B, L, Hkv, H // Hkv, D).sum(3)
    return g.to(dtype)


if triton is not None:

    @triton.jit
    def _tile(P, KS: tl.constexpr, PP: tl.constexpr, BS: tl.constexpr):
        """This program's row b, head h, and tile of patches p0 .. p0+PP-1: per slot row i (its
        patch p0 + i // KS, slot p0·KS + i) the slot and whether it exists. Each kernel then loads
        the bytes lo..hi-1 the tile owns itself (from the previous tile's last run end, the gap
        before a run included, to its own last run end, or to T for the last tile): read through
        a helper, they would bound stores, and torch.compile's mutation analysis would then take
        the run ends as written and copy them before every call (tests/test_kernel_writes.py)."""
        p0 = tl.program_id(0) * PP
        i = tl.arange(0, BS)
        ok = (i < PP * KS) & (p0 + i // KS < P)
        return tl.program_id(1), tl.program_id(2), p0, p0 * KS + i, ok

    @triton.jit
    def _tile_runs(RS, RE, b, slot, ok, P, KS: tl.constexpr):
        """Per slot its patch's run rs..re-1 (empty for missing slots)."""
        return tl.load(RS + b * P + slot // KS, mask=ok, other=0), tl.load(RE + b * P + slot // KS, mask=ok, other=0)

    @triton.jit
    def _rows(X, b, rows, h, sxb, sxr, sxh, ok, D: tl.constexpr, BD: tl.constexpr):
        """Pointers to rows `rows` of head h in row b of X (B, L, heads, D), and their mask."""
        d = tl.arange(0, BD)
        return X + b * sxb + rows[:, None] * sxr + h * sxh + d[None, :], ok[:, None] & (d[None, :] < D)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b accumulated in float32; IEEE (float32 inputs): full float32 products, not TF32."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _masked_scores(a, bt, vis, scale, IEEE: tl.constexpr):
        """a @ bt.T · scale where visible, -inf elsewhere."""
        return tl.where(vis, _dot(a, tl.trans(bt), IEEE) * scale, float("-inf"))

    @triton.jit
    def _softmax_rows(s):
        """Softmax of each row of s; a row with nothing visible (all -inf) gives zeros."""
        m = tl.max(s, axis=1)
        e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        den = tl.sum(e, axis=1)
        return e / tl.where(den > 0, den, 1.0)[:, None]

    # ---- decoder: bytes (queries) read the k key slots of their latest complete patch ----

    @triton.jit
    def _bytes_read_patches_fwd(
        Q, K, V, O, RS, RE, P, T,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
        scale: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr, PP: tl.constexpr, BS: tl.constexpr,
        BD: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b, h, p0, slot, ok = _tile(P, KS, PP, BS)
        rs, re = _tile_runs(RS, RE, b, slot, ok, P, KS)
        lo = tl.load(RE + b * P + p0 - 1, mask=p0 > 0, other=0)
        hi = tl.where(p0 + PP >= P, T, tl.load(RE + b * P + tl.minimum(p0 + PP, P) - 1))
        k_at, k_ok = _rows(K, b, slot, h // G, skb, sks, skh, ok, D, BD)
        v_at, v_ok = _rows(V, b, slot, h // G, svb, svs, svh, ok, D, BD)
        kt, vt = tl.load(k_at, mask=k_ok, other=0.0), tl.load(v_at, mask=v_ok, other=0.0)
        for t0 in range(lo, hi, R):
            t = t0 + tl.arange(0, R)
            q_at, q_ok = _rows(Q, b, t, h, sqb, sqt, sqh, t < hi, D, BD)
            vis = (t[:, None] >= rs[None, :]) & (t[:, None] < re[None, :])  # (bytes, slots)
            pr = _softmax_rows(_masked_scores(tl.load(q_at, mask=q_ok, other=0.0), kt, vis, scale, IEEE))
            o = _dot(pr.to(vt.dtype), vt, IEEE)  # a byte that reads no patch: zeros
            o_at, o_ok = _rows(O, b, t, h, sob, sot, soh, t < hi, D, BD)
            tl.store(o_at, o.to(O.dtype.element_ty), mask=o_ok)

    @triton.jit
    def _bytes_read_patches_bwd(
        Q, K, V, DO, DQ, DK, DV, RS, RE, P, T,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sgb, sgs, sgh,
        scale: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr, PP: tl.constexpr, BS: tl.constexpr,
        BD: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b, h, p0, slot, ok = _tile(P, KS, PP, BS)
        rs, re = _tile_runs(RS, RE, b, slot, ok, P, KS)
        lo = tl.load(RE + b * P + p0 - 1, mask=p0 > 0, other=0)
        hi = tl.where(p0 + PP >= P, T, tl.load(RE + b * P + tl.minimum(p0 + PP, P) - 1))
        k_at, k_ok = _rows(K, b, slot, h // G, skb, sks, skh, ok, D, BD)
        v_at, v_ok = _rows(V, b, slot, h // G, svb, svs, svh, ok, D, BD)
        kt, vt = tl.load(k_at, mask=k_ok, other=0.0), tl.load(v_at, mask=v_ok, other=0.0)
        dk = tl.zeros((BS, BD), tl.float32)
        dv = tl.zeros((BS, BD), tl.float32)
        for t0 in range(lo, hi, R):
            t = t0 + tl.arange(0, R)
            q_at, q_ok = _rows(Q, b, t, h, sqb, sqt, sqh, t < hi, D, BD)
            do_at, do_ok = _rows(DO, b, t, h, sdob, sdot, sdoh, t < hi, D, BD)
            q, do = tl.load(q_at, mask=q_ok, other=0.0), tl.load(do_at, mask=do_ok, other=0.0)
            vis = (t[:, None] >= rs[None, :]) & (t[:, None] < re[None, :])
            pr = _softmax_rows(_masked_scores(q, kt, vis, scale, IEEE))
            dp = _dot(do, tl.trans(vt), IEEE)
            ds = pr * (dp - tl.sum(pr * dp, axis=1)[:, None])
            dq = _dot(ds.to(kt.dtype), kt, IEEE) * scale
            dq_at, dq_ok = _rows(DQ, b, t, h, sdqb, sdqt, sdqh, t < hi, D, BD)
            tl.store(dq_at, dq.to(DQ.dtype.element_ty), mask=dq_ok)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
            dv += _dot(tl.trans(pr.to(do.dtype)), do, IEEE)
        g_at, g_ok = _rows(DK, b, slot, h, sgb, sgs, sgh, ok, D, BD)  # per query head
        tl.store(g_at, (dk * scale).to(DK.dtype.element_ty), mask=g_ok)
        g_at, g_ok = _rows(DV, b, slot, h, sgb, sgs, sgh, ok, D, BD)
        tl.store(g_at, dv.to(DV.dtype.element_ty), mask=g_ok)

    # ---- encoder: each patch's k queries read the bytes of that patch ----

    @triton.jit
    def _patches_read_bytes_fwd(
        Q, K, V, O, LSE, RS, RE, P, T,
        sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sob, sos, soh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr, PP: tl.constexpr,
        BS: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b, h, p0, slot, ok = _tile(P, KS, PP, BS)
        rs, re = _tile_runs(RS, RE, b, slot, ok, P, KS)
        lo = tl.load(RE + b * P + p0 - 1, mask=p0 > 0, other=0)
        hi = tl.where(p0 + PP >= P, T, tl.load(RE + b * P + tl.minimum(p0 + PP, P) - 1))
        q_at, q_ok = _rows(Q, b, slot, h, sqb, sqs, sqh, ok, D, BD)
        qt = tl.load(q_at, mask=q_ok, other=0.0)
        m = tl.full((BS,), float("-inf"), tl.float32)
        den = tl.zeros((BS,), tl.float32)
        acc = tl.zeros((BS, BD), tl.float32)
        for t0 in range(lo, hi, R):  # online softmax over chunks of the tile's bytes
            t = t0 + tl.arange(0, R)
            k_at, k_ok = _rows(K, b, t, h // G, skb, skt, skh, t < hi, D, BD)
            v_at, v_ok = _rows(V, b, t, h // G, svb, svt, svh, t < hi, D, BD)
            vis = (t[None, :] >= rs[:, None]) & (t[None, :] < re[:, None])  # (slots, bytes)
            s = _masked_scores(qt, tl.load(k_at, mask=k_ok, other=0.0), vis, scale, IEEE)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(s - m_safe[:, None])
            den = den * alpha + tl.sum(e, axis=1)
            vt = tl.load(v_at, mask=v_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(e.to(vt.dtype), vt, IEEE)
            m = m_new
        has = den > 0  # an empty patch (padding) outputs zeros
        out = acc / tl.where(has, den, 1.0)[:, None]
        o_at, o_ok = _rows(O, b, slot, h, sob, sos, soh, ok, D, BD)
        tl.store(o_at, out.to(O.dtype.element_ty), mask=o_ok)
        tl.store(LSE + (b * P * KS + slot) * H + h, tl.where(has, m + tl.log(tl.where(has, den, 1.0)), 0.0), mask=ok)

    @triton.jit
    def _patches_read_bytes_bwd(
        Q, K, V, O, DO, LSE, DQ, DK, DV, RS, RE, P, T,
        sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sob, sos, soh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
        sgb, sgt, sgh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr, PP: tl.constexpr,
        BS: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b, h, p0, slot, ok = _tile(P, KS, PP, BS)
        rs, re = _tile_runs(RS, RE, b, slot, ok, P, KS)
        lo = tl.load(RE + b * P + p0 - 1, mask=p0 > 0, other=0)
        hi = tl.where(p0 + PP >= P, T, tl.load(RE + b * P + tl.minimum(p0 + PP, P) - 1))
        q_at, q_ok = _rows(Q, b, slot, h, sqb, sqs, sqh, ok, D, BD)
        o_at, o_ok = _rows(O, b, slot, h, sob, sos, soh, ok, D, BD)
        do_at, do_ok = _rows(DO, b, slot, h, sdob, sdos, sdoh, ok, D, BD)
        qt, dout = tl.load(q_at, mask=q_ok, other=0.0), tl.load(do_at, mask=do_ok, other=0.0)
        delta = tl.sum(dout.to(tl.float32) * tl.load(o_at, mask=o_ok, other=0.0).to(tl.float32), axis=1)
        lse = tl.load(LSE + (b * P * KS + slot) * H + h, mask=ok, other=0.0)
        dq = tl.zeros((BS, BD), tl.float32)
        for t0 in range(lo, hi, R):  # every byte of the tile: its key and value gradients, zeros outside the runs
            t = t0 + tl.arange(0, R)
            k_at, k_ok = _rows(K, b, t, h // G, skb, skt, skh, t < hi, D, BD)
            v_at, v_ok = _rows(V, b, t, h // G, svb, svt, svh, t < hi, D, BD)
            kt, vt = tl.load(k_at, mask=k_ok, other=0.0), tl.load(v_at, mask=v_ok, other=0.0)
            vis = (t[None, :] >= rs[:, None]) & (t[None, :] < re[:, None])
            pr = tl.where(vis, tl.exp(_masked_scores(qt, kt, vis, scale, IEEE) - lse[:, None]), 0.0)
            ds = pr * (_dot(dout, tl.trans(vt), IEEE) - delta[:, None])
            dq += _dot(ds.to(kt.dtype), kt, IEEE)
            dk_at, dk_ok = _rows(DK, b, t, h, sgb, sgt, sgh, t < hi, D, BD)  # per query head
            tl.store(dk_at, (_dot(tl.trans(ds.to(qt.dtype)), qt, IEEE) * scale).to(DK.dtype.element_ty), mask=dk_ok)
            dv_at, dv_ok = _rows(DV, b, t, h, sgb, sgt, sgh, t < hi, D, BD)
            tl.store(dv_at, _dot(tl.trans(pr.to(dout.dtype)), dout, IEEE).to(DV.dtype.element_ty), mask=dv_ok)
        dq_at, dq_ok = _rows(DQ, b, slot, h, sdqb, sdqs, sdqh, ok, D, BD)
        tl.store(dq_at, (dq * scale).to(DQ.dtype.element_ty), mask=dq_ok)

    # ---- max-pooling each patch's bytes (the encoder's initial patch queries) ----

    @triton.jit
    def _patch_max_fwd(X, O, RS, RE, P, sxb, sxt, sob, sop, D: tl.constexpr, BD: tl.constexpr):
        p = tl.program_id(0)
        b = tl.program_id(1)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        m = tl.full((BD,), float("-inf"), tl.float32)
        rs = tl.load(RS + b * P + p)
        re = tl.load(RE + b * P + p)
        for t in range(rs, re):
            m = tl.maximum(m, tl.load(X + b * sxb + t * sxt + d, mask=d < D, other=0.0).to(tl.float32))
        m = tl.where(re > rs, m, 0.0)  # an empty patch pools to zeros
        tl.store(O + b * sob + p * sop + d, m.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def _patch_max_bwd(X, O, G, DX, RS, RE, P, sxb, sxt, sob, sop, D: tl.constexpr, BD: tl.constexpr):
        """Each patch's gradient goes to the bytes that hold its maximum, split evenly among ties
        (as scatter_reduce's amax). O, G and DX share X's strides but for the patch axis."""
        p = tl.program_id(0)
        b = tl.program_id(1)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        m = tl.load(O + b * sob + p * sop + d, mask=d < D, other=0.0).to(tl.float32)
        g = tl.load(G + b * sob + p * sop + d, mask=d < D, other=0.0).to(tl.float32)
        rs = tl.load(RS + b * P + p)
        re = tl.load(RE + b * P + p)
        ties = tl.zeros((BD,), tl.float32)
        for t in range(rs, re):
            ties += tl.where(tl.load(X + b * sxb + t * sxt + d, mask=d < D, other=0.0).to(tl.float32) == m, 1.0, 0.0)
        share = g / tl.maximum(ties, 1.0)
        for t in range(rs, re):
            x = tl.load(X + b * sxb + t * sxt + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(DX + b * sxb + t * sxt + d, tl.where(x == m, share, 0.0).to(DX.dtype.element_ty), mask=d < D)

    @triton_op("blt::patch_max", mutates_args=())
    def patch_max(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """x (B,T,D) contiguous, runs (B,P) -> (B,P,D): the max over each patch's bytes."""
        B, T, D = x.shape
        P = start.shape[1]
        out = torch.empty(B, P, D, dtype=x.dtype, device=x.device)
        triton_support.launcher(_patch_max_fwd)[(P, B, triton.cdiv(D, 128))](x, out, start, end, P, T * D, D, P * D, D, D=D, BD=128, **_warps())
        return out

    @triton_op("blt::patch_max_backward", mutates_args=())
    def patch_max_backward(
        x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, out: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        B, T, D = x.shape
        P = start.shape[1]
        dx = torch.zeros_like(x)  # bytes in no patch (none, when the patches cover the row)
        triton_support.launcher(_patch_max_bwd)[(P, B, triton.cdiv(D, 128))](
            x, out, grad, dx, start, end, P, T * D, D, P * D, D, D=D, BD=128, **_warps()
        )  # fmt: skip
        return dx

    def _patch_max_setup(ctx, inputs, output):
        x, start, end = inputs
        ctx.save_for_backward(x, start, end, output)

    def _patch_max_grad(ctx, grad):
        x, start, end, out = ctx.saved_tensors
        return patch_max_backward(x, start, end, out, grad.contiguous()), None, None

    patch_max.register_autograd(_patch_max_grad, setup_context=_patch_max_setup)

    def _strides(*xs):
        return [s for x in xs for s in x.stride()[:3]]

    # ---- the ops: compiled graphs see the kernels (triton_op), autograd sees the backward ----

    @triton_op("blt::byte_patch_attention", mutates_args=())
    def byte_patch_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Decoder: q (B,T,H,D) bytes, k/v (B,P·k,Hkv,D) patch slots, runs (B,P) -> (B,T,H,D)."""
        B, T, H, D = q.shape
        P = start.shape[1]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        triton_support.launcher(_bytes_read_patches_fwd)[_grid(q, P)](
            q, k, v, out, start, end, P, T, *_strides(q, k, v, out), scale=scale, **_meta(k.shape[2], q, k.shape[1] // P)
        )  # fmt: skip
        return out

    @triton_op("blt::byte_patch_attention_backward", mutates_args=())
    def byte_patch_attention_backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor, scale: float,
        grad: torch.Tensor,
    ) -> list[torch.Tensor]:  # fmt: skip
        B, T, H, D = q.shape
        S, Hkv, P = k.shape[1], k.shape[2], start.shape[1]
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        acc = torch.float32 if Hkv != H else k.dtype
        dk, dv = (torch.empty(B, S, H, D, dtype=acc, device=q.device) for _ in range(2))
        triton_support.launcher(_bytes_read_patches_bwd)[_grid(q, P)](
            q, k, v, grad, dq, dk, dv, start, end, P, T, *_strides(q, k, v, grad, dq, dk),
            scale=scale, **_meta(Hkv, q, S // P),
        )  # fmt: skip
        return [dq, _group_sum(dk, Hkv, k.dtype), _group_sum(dv, Hkv, v.dtype)]

    @triton_op("blt::patch_byte_attention", mutates_args=())
    def patch_byte_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder: q (B,P·k,H,D) patch queries, k/v (B,T,Hkv,D) bytes, runs (B,P) -> (B,P·k,H,D) and
        the log-sum-exp of each query's scores (B,P·k,H), float32, for the backward."""
        B, S, H, D = q.shape
        P = start.shape[1]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, S, H, dtype=torch.float32, device=q.device)
        T = k.shape[1]
        triton_support.launcher(_patches_read_bytes_fwd)[_grid(q, P)](
            q, k, v, out, lse, start, end, P, T, *_strides(q, k, v, out), scale=scale, H=H, **_meta(k.shape[2], q, S // P)
        )  # fmt: skip
        return out, lse

    @triton_op("blt::patch_byte_attention_backward", mutates_args=())
    def patch_byte_attention_backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor, scale: float,
        out: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
    ) -> list[torch.Tensor]:  # fmt: skip
        B, S, H, D = q.shape
        T, Hkv, P = k.shape[1], k.shape[2], start.shape[1]
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        acc = torch.float32 if Hkv != H else k.dtype
        dk, dv = (torch.empty(B, T, H, D, dtype=acc, device=q.device) for _ in range(2))  # the tiles cover every byte
        triton_support.launcher(_patches_read_bytes_bwd)[_grid(q, P)](
            q, k, v, out, grad, lse, dq, dk, dv, start, end, P, T, *_strides(q, k, v, out, grad, dq, dk),
            scale=scale, H=H, **_meta(Hkv, q, S // P),
        )  # fmt: skip
        return [dq, _group_sum(dk, Hkv, k.dtype), _group_sum(dv, Hkv, v.dtype)]

    def _bytes_read_setup(ctx, inputs, output):
        q, k, v, start, end, scale = inputs
        ctx.save_for_backward(q, k, v, start, end)
        ctx.scale = scale

    def _bytes_read_backward(ctx, grad):
        q, k, v, start, end = ctx.saved_tensors
        dq, dk, dv = byte_patch_attention_backward(q, k, v, start, end, ctx.scale, _unit_last(grad))
        return dq, dk, dv, None, None, None

    def _patches_read_setup(ctx, inputs, output):
        q, k, v, start, end, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, start, end, out, lse)
        ctx.scale = scale

    def _patches_read_backward(ctx, grad, _grad_lse):
        q, k, v, start, end, out, lse = ctx.saved_tensors
        dq, dk, dv = patch_byte_attention_backward(q, k, v, start, end, ctx.scale, out, lse, _unit_last(grad))
        return dq, dk, dv, None, None, None

    byte_patch_attention.register_autograd(_bytes_read_backward, setup_context=_bytes_read_setup)
    patch_byte_attention.register_autograd(_patches_read_backward, setup_context=_patches_read_setup)


def bytes_read_patches(q, k, v, start, end) -> torch.Tensor:
    """Decoder cross-attention. q (B,T,H,D), k/v (B,P·k,Hkv,D), start/end (B,P): the bytes
    start..end-1 read patch p's k slots -> (B,T,H,D)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return byte_patch_attention(q, k, v, start, end, q.shape[-1] ** -0.5)


def patches_read_bytes(q, k, v, start, end) -> torch.Tensor:
    """Encoder cross-attention. q (B,P·k,H,D), k/v (B,T,Hkv,D), start/end (B,P): patch p's
    queries read the bytes start..end-1 -> (B,P·k,H,D)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return patch_byte_attention(q, k, v, start, end, q.shape[-1] ** -0.5)[0]


def max_pool(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """x (B,T,D), runs (B,P) -> (B,P,D): the elementwise max over each patch's bytes (zeros for
    an empty patch)."""
    return patch_max(x.contiguous(), start, end)
