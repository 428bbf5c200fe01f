"""Kernels that walk each patch's run of bytes (Triton): the byte <-> patch cross-attentions
for the paper's default windows (§3.2.2, §3.3.1), where each patch's k queries read only that
patch's bytes (encoder) and each byte reads only the k keys of the latest patch whose bytes
are all <= it (decoder); and the encoder's max-pooling of each patch's bytes.

Both masks are block-diagonal with tiny blocks: a patch holds about 4.5 bytes, and a byte
reads k = 2 keys. FlexAttention computes them on 128 x 128 score tiles that are nearly all
masked; here one program walks one patch's run of bytes instead, so nothing masked is
computed, and the backward needs no atomics: every byte belongs to one run and every key
slot to one patch, so each gradient row is written by exactly one program.

A run is given as (start, end) per (row, patch), bytes start..end-1, non-decreasing along
the row:
- encoder: the bytes of patch p (its queries are slots p·k .. p·k+k-1);
- decoder: the bytes whose latest complete patch is p (they read slots p·k .. p·k+k-1).
Bytes in no run (the decoder's bytes before the first complete patch) read nothing and
output zeros, as FlexAttention does for a query row with no visible key.

The kernels run on CUDA, and on CPU under TRITON_INTERPRET=1 (how the tests check them).
Inputs are (B, L, heads, head_dim) with a unit last stride: the projections' output viewed
per head, so the attention output needs no transpose either. Math in float32.
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


def _warps() -> dict:
    """The launch option for NUM_WARPS: none at Triton's default, so that the compiled training
    step launches the kernels as they were measured in it."""
    return {} if NUM_WARPS == 4 else {"num_warps": NUM_WARPS}


def _meta(H: int, Hkv: int, D: int, k: int) -> dict:
    return dict(
        H=H, G=H // Hkv, D=D, KS=k, **_warps(),
        BH=triton.next_power_of_2(H), BD=triton.next_power_of_2(D), BK=triton.next_power_of_2(k),
    )  # fmt: skip


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
    def _tile_offsets(H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        h = tl.arange(0, BH)
        d = tl.arange(0, BD)
        return h, d, (h[:, None] < H) & (d[None, :] < D)

    @triton.jit
    def _slot_tile(X, b, p, sxb, sxs, sxh, heads, d, hd, KS: tl.constexpr, BK: tl.constexpr):
        """Patch p's k slots of X, all heads (heads: each query head's row of X) -> the
        (BK, BH, BD) tile in float32, its mask, and the slot index (BK, 1, 1)."""
        j = tl.arange(0, BK)
        mask = (j[:, None, None] < KS) & hd[None]
        slot = (p * KS + j)[:, None, None]
        tile = tl.load(X + b * sxb + slot * sxs + heads[None, :, None] * sxh + d[None, None, :], mask=mask, other=0.0)
        return tile.to(tl.float32), mask, slot

    @triton.jit
    def _run(RS, RE, b, p, P):
        """Patch p's run of bytes start..end-1 in row b, and where the previous run ended."""
        return tl.load(RS + b * P + p), tl.load(RE + b * P + p), tl.load(RE + b * P + p - 1, mask=p > 0, other=0)

    @triton.jit
    def _patch_keys(K, V, RS, RE, P, skb, sks, skh, svb, svs, svh, h, d, hd, G: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr):
        """A decoder program's patch: its k keys and values (float32 tiles), their mask and slots,
        and its run of bytes."""
        p = tl.program_id(0)
        b = tl.program_id(1)
        k3, mask, slot = _slot_tile(K, b, p, skb, sks, skh, h // G, d, hd, KS, BK)
        v3, mask, slot = _slot_tile(V, b, p, svb, svs, svh, h // G, d, hd, KS, BK)
        rs, re, prev = _run(RS, RE, b, p, P)
        return k3, v3, mask, slot, rs, re, prev

    @triton.jit
    def _key_probs(q, k3, scale: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr):
        """A byte's q (BH, BD) against its patch's k keys (BK, BH, BD) -> softmax (BK, BH)."""
        j = tl.arange(0, BK)
        s = tl.sum(q[None] * k3, axis=2) * scale
        s = tl.where(j[:, None] < KS, s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=0)[None])
        return e / tl.sum(e, axis=0)[None]

    # ---- decoder: bytes (queries) read the k key slots of their latest complete patch ----

    @triton.jit
    def _bytes_read_patches_fwd(
        Q, K, V, O, RS, RE, P,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr,
        BH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        h, d, hd = _tile_offsets(H, D, BH, BD)
        k3, v3, kv_mask, slot, rs, re, prev = _patch_keys(K, V, RS, RE, P, skb, sks, skh, svb, svs, svh, h, d, hd, G, KS, BK)
        q_hd = h[:, None] * sqh + d[None, :]
        o_hd = h[:, None] * soh + d[None, :]
        for t in range(prev, rs):  # bytes before this run that read no patch
            tl.store(O + b * sob + t * sot + o_hd, tl.zeros((BH, BD), tl.float32).to(O.dtype.element_ty), mask=hd)
        for t in range(rs, re):
            q = tl.load(Q + b * sqb + t * sqt + q_hd, mask=hd, other=0.0).to(tl.float32)
            pr = _key_probs(q, k3, scale, KS, BK)
            o = tl.sum(pr[:, :, None] * v3, axis=0)
            tl.store(O + b * sob + t * sot + o_hd, o.to(O.dtype.element_ty), mask=hd)

    @triton.jit
    def _bytes_read_patches_bwd(
        Q, K, V, DO, DQ, DK, DV, RS, RE, P,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sgb, sgs, sgh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr,
        BH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        h, d, hd = _tile_offsets(H, D, BH, BD)
        k3, v3, kv_mask, slot, rs, re, prev = _patch_keys(K, V, RS, RE, P, skb, sks, skh, svb, svs, svh, h, d, hd, G, KS, BK)
        q_hd = h[:, None] * sqh + d[None, :]
        do_hd = h[:, None] * sdoh + d[None, :]
        dq_hd = h[:, None] * sdqh + d[None, :]
        for t in range(prev, rs):
            tl.store(DQ + b * sdqb + t * sdqt + dq_hd, tl.zeros((BH, BD), tl.float32).to(DQ.dtype.element_ty), mask=hd)
        dk3 = tl.zeros((BK, BH, BD), tl.float32)
        dv3 = tl.zeros((BK, BH, BD), tl.float32)
        for t in range(rs, re):
            q = tl.load(Q + b * sqb + t * sqt + q_hd, mask=hd, other=0.0).to(tl.float32)
            do = tl.load(DO + b * sdob + t * sdot + do_hd, mask=hd, other=0.0).to(tl.float32)
            pr = _key_probs(q, k3, scale, KS, BK)
            dp = tl.sum(do[None] * v3, axis=2)
            ds = pr * (dp - tl.sum(pr * dp, axis=0)[None])
            dq = tl.sum(ds[:, :, None] * k3, axis=0) * scale
            tl.store(DQ + b * sdqb + t * sdqt + dq_hd, dq.to(DQ.dtype.element_ty), mask=hd)
            dk3 += ds[:, :, None] * q[None]
            dv3 += pr[:, :, None] * do[None]
        g_off = b * sgb + slot * sgs + h[None, :, None] * sgh + d[None, None, :]  # per query head
        tl.store(DK + g_off, (dk3 * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + g_off, dv3.to(DV.dtype.element_ty), mask=kv_mask)

    # ---- encoder: each patch's k queries read the bytes of that patch ----

    @triton.jit
    def _patches_read_bytes_fwd(
        Q, K, V, O, LSE, RS, RE, P,
        sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sob, sos, soh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr,
        BH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0)
        b = tl.program_id(1)
        h, d, hd = _tile_offsets(H, D, BH, BD)
        j = tl.arange(0, BK)
        q3, q_mask, slot = _slot_tile(Q, b, p, sqb, sqs, sqh, h, d, hd, KS, BK)
        k_hd = (h // G)[:, None] * skh + d[None, :]
        v_hd = (h // G)[:, None] * svh + d[None, :]
        m = tl.full((BK, BH), float("-inf"), tl.float32)
        den = tl.zeros((BK, BH), tl.float32)
        acc = tl.zeros((BK, BH, BD), tl.float32)
        for t in range(tl.load(RS + b * P + p), tl.load(RE + b * P + p)):  # online softmax
            kt = tl.load(K + b * skb + t * skt + k_hd, mask=hd, other=0.0).to(tl.float32)
            vt = tl.load(V + b * svb + t * svt + v_hd, mask=hd, other=0.0).to(tl.float32)
            s = tl.sum(q3 * kt[None], axis=2) * scale
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            den = den * alpha + e
            acc = acc * alpha[:, :, None] + e[:, :, None] * vt[None]
            m = m_new
        has = den > 0  # an empty patch (padding) outputs zeros
        out = tl.where(has[:, :, None], acc / tl.where(has, den, 1.0)[:, :, None], 0.0)
        tl.store(O + b * sob + slot * sos + h[None, :, None] * soh + d[None, None, :], out.to(O.dtype.element_ty), mask=q_mask)
        lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), 0.0)
        tl.store(LSE + (b * P * KS + p * KS + j)[:, None] * H + h[None, :], lse, mask=(j[:, None] < KS) & (h[None, :] < H))

    @triton.jit
    def _patches_read_bytes_bwd(
        Q, K, V, O, DO, LSE, DQ, DK, DV, RS, RE, P,
        sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sob, sos, soh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
        sgb, sgt, sgh,
        scale: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KS: tl.constexpr,
        BH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0)
        b = tl.program_id(1)
        h, d, hd = _tile_offsets(H, D, BH, BD)
        j = tl.arange(0, BK)
        q3, q_mask, slot = _slot_tile(Q, b, p, sqb, sqs, sqh, h, d, hd, KS, BK)
        o3, q_mask, slot = _slot_tile(O, b, p, sob, sos, soh, h, d, hd, KS, BK)
        do3, q_mask, slot = _slot_tile(DO, b, p, sdob, sdos, sdoh, h, d, hd, KS, BK)
        live = (j[:, None] < KS) & (h[None, :] < H)
        lse = tl.load(LSE + (b * P * KS + p * KS + j)[:, None] * H + h[None, :], mask=live, other=0.0)
        delta = tl.sum(do3 * o3, axis=2)  # (BK, BH)
        k_hd = (h // G)[:, None] * skh + d[None, :]
        v_hd = (h // G)[:, None] * svh + d[None, :]
        g_hd = h[:, None] * sgh + d[None, :]  # per query head
        dq3 = tl.zeros((BK, BH, BD), tl.float32)
        for t in range(tl.load(RS + b * P + p), tl.load(RE + b * P + p)):
            kt = tl.load(K + b * skb + t * skt + k_hd, mask=hd, other=0.0).to(tl.float32)
            vt = tl.load(V + b * svb + t * svt + v_hd, mask=hd, other=0.0).to(tl.float32)
            s = tl.sum(q3 * kt[None], axis=2) * scale
            pr = tl.where(live, tl.exp(s - lse), 0.0)
            ds = pr * (tl.sum(do3 * vt[None], axis=2) - delta)
            dq3 += ds[:, :, None] * kt[None]
            dk = tl.sum(ds[:, :, None] * q3, axis=0) * scale
            dv = tl.sum(pr[:, :, None] * do3, axis=0)
            tl.store(DK + b * sgb + t * sgt + g_hd, dk.to(DK.dtype.element_ty), mask=hd)
            tl.store(DV + b * sgb + t * sgt + g_hd, dv.to(DV.dtype.element_ty), mask=hd)
        dq_off = b * sdqb + slot * sdqs + h[None, :, None] * sdqh + d[None, None, :]
        tl.store(DQ + dq_off, (dq3 * scale).to(DQ.dtype.element_ty), mask=q_mask)

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
        triton_support.launcher(_bytes_read_patches_fwd)[(P, B)](
            q, k, v, out, start, end, P, *_strides(q, k, v, out), scale=scale, **_meta(H, k.shape[2], D, k.shape[1] // P)
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
        triton_support.launcher(_bytes_read_patches_bwd)[(P, B)](
            q, k, v, grad, dq, dk, dv, start, end, P, *_strides(q, k, v, grad, dq, dk),
            scale=scale, **_meta(H, Hkv, D, S // P),
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
        triton_support.launcher(_patches_read_bytes_fwd)[(P, B)](
            q, k, v, out, lse, start, end, P, *_strides(q, k, v, out), scale=scale, **_meta(H, k.shape[2], D, S // P)
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
        # zeros: a byte outside every patch (none, when the patches cover the row) gets no gradient
        dk, dv = (torch.zeros(B, T, H, D, dtype=acc, device=q.device) for _ in range(2))
        triton_support.launcher(_patches_read_bytes_bwd)[(P, B)](
            q, k, v, out, grad, lse, dq, dk, dv, start, end, P, *_strides(q, k, v, out, grad, dq, dk),
            scale=scale, **_meta(H, Hkv, D, S // P),
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
