"""Triton kernels that read the fused products' outputs (blt.layers.set_fused_products):
the q|k|v product's split and rotary embedding, and the w1|w3 product's SwiGLU.

With fused products, a self-attention's q, k and v come out of one matrix product as the
column blocks of one (B, T, (H + 2·Hkv)·Dh) tensor, and a feed-forward's w1 x and w3 x as
the two halves of one (B, T, 2·hidden) tensor. Written with tensor ops, the backward
concatenates the gradients of the blocks back into one such tensor. torch.compile turns each
concatenation into one kernel that, for every output element, evaluates every block's branch
(masked loads, the rotation's or SwiGLU's arithmetic, index arithmetic): on an H200 the q|k|v
one ran 4-6x slower than its memory traffic allows (PROGRESS.md, thirteenth round). Here each
program instead works through a block of rows, block by block, forward and backward, touching
every element once.

Same math as layers.apply_rotary and F.silu(h1) * h3, in float32 with one rounding to the
input dtype at the end (as the compiled graph rounds). The kernels run on CUDA, and on CPU
under TRITON_INTERPRET=1 (how the tests check them).

Replaces: the separate q, k, v (w1, w3; k, v) products and the tensor ops after them
(layers.py, fused products off). Equal to it: test_core.py:
test_fused_products_same_function_fewer_products; test_fused_outputs.py:
test_kernels_interpreted_match_reference (CPU), test_kernels_match_reference_on_cuda.
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


ROWS = 16  # rows (positions) per program of the rotary kernel
SWIGLU_BLOCK = (8, 256)  # rows x columns per program of the SwiGLU kernels


if triton is not None:

    @triton.jit
    def _rotate_heads(
        Y, Q, K, V, C, S, N, T, syb, syt, sqb, sqt, skb, skt, svb, svt, scb, sct,
        HQ: tl.constexpr, HKV: tl.constexpr, NV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        SPLIT: tl.constexpr, R: tl.constexpr,
    ):  # fmt: skip
        """Rows r .. r+R-1 of the flattened (B, T). SPLIT: the HQ + 2·HKV heads of D in a row of
        Y are q's, k's and v's; q's and k's rotated by θ into Q and K, v's copied into V.
        Otherwise the reverse: Q and K rotated back by -θ and V copied, into Y. NV: the v heads
        copied, HKV or 0 (v left where it is: V unused). Strides per batch row and position;
        heads D apart in every tensor. BD: D rounded up to a power of 2."""
        r = tl.program_id(0) * R + tl.arange(0, R)
        b, t = r // T, r % T
        m = tl.arange(0, BD // 2)
        d = tl.arange(0, BD)
        pairs = (r < N)[:, None] & (m[None, :] < D // 2)
        elems = (r < N)[:, None] & (d[None, :] < D)
        c = tl.load(C + b[:, None] * scb + t[:, None] * sct + m[None, :], mask=pairs, other=0.0)
        s = tl.load(S + b[:, None] * scb + t[:, None] * sct + m[None, :], mask=pairs, other=0.0)
        if not SPLIT:
            s = -s
        y_rows = Y + b[:, None] * syb + t[:, None] * syt + d[None, :]
        for j in tl.static_range(HQ + HKV + NV):  # the block and head of each column block, at compile time
            if j < HQ:
                o_rows, h = Q + b[:, None] * sqb + t[:, None] * sqt + d[None, :], j
            elif j < HQ + HKV:
                o_rows, h = K + b[:, None] * skb + t[:, None] * skt + d[None, :], j - HQ
            else:
                o_rows, h = V + b[:, None] * svb + t[:, None] * svt + d[None, :], j - HQ - HKV
            if SPLIT:
                src, dst = y_rows + j * D, o_rows + h * D
            else:
                src, dst = o_rows + h * D, y_rows + j * D
            x = tl.load(src, mask=elems, other=0.0)
            if j < HQ + HKV:
                x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (R, BD // 2, 2)))
                x = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (R, BD))
            tl.store(dst, x.to(dst.dtype.element_ty), mask=elems)

    def _launch(y, q, k, v, cos, sin, split):
        """y (B, T, (H + 2·Hkv)·D); q, k, v (B, T, heads·D); all with unit last strides. v None:
        only q's and k's columns of y are read or written."""
        B, T = y.shape[:2]
        D = cos.shape[-1] * 2
        HKV = k.shape[2] // D
        v_at = q if v is None else v
        triton_support.launcher(_rotate_heads)[(triton.cdiv(B * T, ROWS),)](
            y, q, k, v_at, cos, sin, B * T, T, y.stride(0), y.stride(1), q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v_at.stride(0), v_at.stride(1), cos.stride(0), cos.stride(1), HQ=q.shape[2] // D,
            HKV=HKV, NV=0 if v is None else HKV, D=D, BD=triton.next_power_of_2(D), SPLIT=split, R=ROWS,
        )  # fmt: skip

    def rotate_qk(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int):
        """As rotary_split_op, for a caller that reads v in place from y's last Hkv·D columns
        (blt.fa4.qkv_attention): q (B,T,H,D) and k (B,T,Hkv,D) only, one kernel that reads
        and writes their columns alone. Not an op: call it inside one."""
        B, T, _ = y.shape
        D = cos.shape[-1] * 2
        q = torch.empty(B, T, n_heads, D, dtype=y.dtype, device=y.device)
        k = torch.empty(B, T, n_kv, D, dtype=y.dtype, device=y.device)
        _launch(y, q.view(B, T, -1), k.view(B, T, -1), None, cos, sin, True)
        return q, k

    def unrotate_qk(dy: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """rotate_qk's backward: dq (B,T,H,D) and dk (B,T,Hkv,D), contiguous, rotated back (angle
        -θ) into dy's q and k columns; dy's v columns are left as they are."""
        _launch(dy, dq.flatten(2), dk.flatten(2), None, cos, sin, False)

    @triton_op("blt::rotary_split", mutates_args=())
    def rotary_split_op(
        y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y (B, T, (H + 2·Hkv)·D), unit last stride; cos/sin (B, T, D/2) float32 (any strides
        but the last) -> q (B,T,H,D), k, v (B,T,Hkv,D) contiguous, q and k rotated."""
        B, T, _ = y.shape
        D = cos.shape[-1] * 2
        q = torch.empty(B, T, n_heads, D, dtype=y.dtype, device=y.device)
        k, v = (torch.empty(B, T, n_kv, D, dtype=y.dtype, device=y.device) for _ in range(2))
        _launch(y, q.view(B, T, -1), k.view(B, T, -1), v.view(B, T, -1), cos, sin, True)
        return q, k, v

    @triton_op("blt::rotary_split_backward", mutates_args=())
    def rotary_split_backward(
        dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The gradients of q, k, v (B, T, heads, D), unit last strides -> that of y,
        (B, T, (H + 2·Hkv)·D): q's and k's rotated back (angle -θ), v's copied."""
        B, T, H, D = dq.shape
        Hkv = dk.shape[2]
        dy = torch.empty(B, T, (H + 2 * Hkv) * D, dtype=dq.dtype, device=dq.device)
        flat = [g.flatten(2) if g.stride(2) == D else g.contiguous().flatten(2) for g in (dq, dk, dv)]
        _launch(dy, *flat, cos, sin, False)
        return dy

    def _setup(ctx, inputs, output):
        _, cos, sin, _, _ = inputs
        ctx.save_for_backward(cos, sin)

    def _backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        unit = [g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv)]
        return rotary_split_backward(*unit, cos, sin), None, None, None, None

    rotary_split_op.register_autograd(_backward, setup_context=_setup)

    # ---- SwiGLU: silu(h1) * h3 from h = [h1 | h3] ----

    @triton.jit
    def _swiglu_tile(N, F, R: tl.constexpr, BC: tl.constexpr):
        """This program's R x BC tile: rows r, columns c, and its mask. (No pointer passes through
        here: torch.compile's mutation analysis would take it as written, and copy h.)"""
        r = tl.program_id(0) * R + tl.arange(0, R)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        return r, c, (r < N)[:, None] & (c < F)[None, :]

    @triton.jit
    def _swiglu_load(Hh, r, c, mask, F, sh):
        """h1, h3 on the tile, in float32."""
        h_at = Hh + r[:, None] * sh + c[None, :]
        h1 = tl.load(h_at, mask=mask, other=0.0).to(tl.float32)
        return h1, tl.load(h_at + F, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _swiglu_fwd(Hh, O, N, F, sh, so, R: tl.constexpr, BC: tl.constexpr):
        r, c, mask = _swiglu_tile(N, F, R, BC)
        a, b = _swiglu_load(Hh, r, c, mask, F, sh)
        tl.store(O + r[:, None] * so + c[None, :], (a * tl.sigmoid(a) * b).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(Hh, G, DH, N, F, sh, sg, R: tl.constexpr, BC: tl.constexpr):
        """DH = [g · h3 · silu'(h1) | g · silu(h1)], silu'(a) = σ(a)(1 + a(1 - σ(a))); DH has h's strides."""
        r, c, mask = _swiglu_tile(N, F, R, BC)
        a, b = _swiglu_load(Hh, r, c, mask, F, sh)
        g = tl.load(G + r[:, None] * sg + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        d_at = DH + r[:, None] * sh + c[None, :]
        tl.store(d_at, (g * b * sig * (1.0 + a * (1.0 - sig))).to(DH.dtype.element_ty), mask=mask)
        tl.store(d_at + F, (g * a * sig).to(DH.dtype.element_ty), mask=mask)

    def _swiglu_grid(N: int, F: int) -> tuple[int, int]:
        return triton.cdiv(N, SWIGLU_BLOCK[0]), triton.cdiv(F, SWIGLU_BLOCK[1])

    @triton_op("blt::swiglu", mutates_args=())
    def swiglu_op(h: torch.Tensor) -> torch.Tensor:
        """h (N, 2·F) contiguous -> silu(h[:, :F]) * h[:, F:], (N, F)."""
        N, F = h.shape[0], h.shape[1] // 2
        out = torch.empty(N, F, dtype=h.dtype, device=h.device)
        triton_support.launcher(_swiglu_fwd)[_swiglu_grid(N, F)](
            h, out, N, F, h.stride(0), out.stride(0), R=SWIGLU_BLOCK[0], BC=SWIGLU_BLOCK[1]
        )  # fmt: skip
        return out

    @triton_op("blt::swiglu_backward", mutates_args=())
    def swiglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        N, F = h.shape[0], h.shape[1] // 2
        dh = torch.empty_like(h)
        triton_support.launcher(_swiglu_bwd)[_swiglu_grid(N, F)](
            h, grad, dh, N, F, h.stride(0), grad.stride(0), R=SWIGLU_BLOCK[0], BC=SWIGLU_BLOCK[1]
        )  # fmt: skip
        return dh

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _swiglu_grad(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_backward(h, grad.contiguous())

    swiglu_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def rope_tables(rope: tuple[torch.Tensor, torch.Tensor], B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope from Rotary.forward or .table ((T, D/2) or (B, T, D/2)) -> cos, sin as the rotary
    kernel reads them: (B, T, D/2) float32, a (T, D/2) table broadcast over rows (no copy)."""
    cos, sin = (r.float().contiguous().expand(B, T, r.shape[-1]) for r in rope)
    return cos, sin


def rotary_split(y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_heads: int, n_kv: int):
    """y (B, T, (H + 2·Hkv)·D) from the fused q|k|v product; rope from Rotary.forward or
    .table ((T, D/2) or (B, T, D/2)) -> q (B,T,H,D), k, v (B,T,Hkv,D), q and k rotated as
    layers.apply_rotary rotates them."""
    B, T, _ = y.shape
    if y.stride(-1) != 1:
        y = y.contiguous()
    return rotary_split_op(y, *rope_tables(rope, B, T), n_heads, n_kv)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2·F) from the fused w1|w3 product -> silu(h1) * h3, (..., F)."""
    F = h.shape[-1] // 2
    return swiglu_op(h.reshape(-1, 2 * F).contiguous()).view(*h.shape[:-1], F)
