"""FlashAttention-4's own causal kernels for BLT's self-attentions (blt.train --attention fa4;
the optional flash-attn-4 package, CUDA, 16-bit inputs).

Every self-attention in BLT is causal: the local encoder's, decoder's and entropy model's over
bytes within a sliding window, the global transformer's over patches, with packed rows each
a sequence of its own (blt.packing). FlashAttention-4 has these masks built in: a query tile
visits only the key tiles its window reaches and masks only the tiles on the window's edges,
and packed rows are its variable-length mode (cumulative sequence ends). FlexAttention's FLASH
backend (--attention flash) runs the same CuTe kernels, but with the mask as a block list and
a mask function evaluated on every partial tile. masks.CausalRows carries the mask's shape to
here; blt.layers.attend sends other inputs (float32, CPU) to its FlexAttention fallback.

The kernels run as torch ops, forward and backward (and the same pair for qkv_attention, which
reads the fused q|k|v product directly), so a compiled graph (and its CUDA graph) calls them as
they are; their fake versions give the compiler the output shapes.

Replaces: FlexAttention's kernels for the causal self-attentions (layers.attend). Equal to it:
test_fa4.py: test_kernels_match_float32_reference,
test_qkv_attention_matches_float32_reference, test_causal_rows_stand_for_the_flex_masks;
test_compiled_step.py on CUDA.
"""

import importlib.util
from typing import Optional

import torch

from blt import fused_outputs


def available() -> bool:
    """Whether the flash-attn-4 package (flash_attn.cute) is installed."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # flash_attn absent altogether
        return False


def takes(q: torch.Tensor) -> bool:
    """Whether the kernels run on these inputs: CUDA, 16-bit."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _left(window: int) -> int | None:
    """Our window (a query sees keys q - window + 1 .. q; 0 = no window) as FlashAttention's
    left window size (keys q - left .. q)."""
    return window - 1 if window > 0 else None


@torch.library.custom_op("blt::fa4_causal", mutates_args=())
def _causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, bounds: Optional[torch.Tensor]  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D), k/v (B, T, Hkv, D); or packed, (N, heads, D) with bounds (S+1,) int32,
    the sequences' cumulative ends -> out like q, and the softmax's log-sum-exp per query,
    (B, H, T) or (H, N) float32."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=bounds, cu_seqlens_k=bounds, causal=True, window_size_left=_left(window),
        return_lse=True,
    )[:2]  # fmt: skip
    return out, lse


@_causal.register_fake
def _(q, k, v, window, bounds):
    lse = (q.shape[0], q.shape[2], q.shape[1]) if bounds is None else (q.shape[1], q.shape[0])
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op("blt::fa4_causal_backward", mutates_args=())
def _causal_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    window: int, bounds: Optional[torch.Tensor],  # noqa: UP045 (the op schema's spelling, any torch)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout, lse, causal=True, window_size_left=_left(window), cu_seqlens_q=bounds,
        cu_seqlens_k=bounds,
    )  # fmt: skip
    return dq, dk, dv


@_causal_backward.register_fake
def _(dout, q, k, v, out, lse, window, bounds):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, window, bounds = inputs
    ctx.save_for_backward(q, k, v, *output, bounds)
    ctx.window = window


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bounds = ctx.saved_tensors
    return *_causal_backward(dout, q, k, v, out, lse, ctx.window, bounds), None, None


_causal.register_autograd(_backward, setup_context=_setup)


def attention(q, k, v, window: int | None, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention as blt.layers.attend takes it: q (B,H,T,D), k/v (B,Hkv,T,D) -> (B,H,T,D).
    window: keys q - window + 1 .. q (None: all up to q). bounds: the sequences packed in the
    one row of a B=1 input, as cumulative ends ((S+1,) int32, from 0 to T); None: each row is
    one sequence."""
    # (B, T, heads, D): the layout the products write, so no copy; contiguous as the fakes say
    unit = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    if bounds is not None:
        unit = [x[0] for x in unit]
    out = _causal(*unit, window or 0, bounds)[0]
    return (out[None] if bounds is not None else out).transpose(1, 2)


# ---- the same attention read straight from the fused q|k|v product (set_fused_products) ----
# rotary_split writes q, k and v out of the product's (B, T, (H + 2·Hkv)·D) output for the
# kernels above. FlashAttention-4 reads any row stride, so here v stays where the product wrote
# it, and its gradient is written where the product's backward reads it: one op, forward and
# backward, does the rotation of q and k and the attention, and its rotary kernels move two
# thirds of the bytes rotary_split's do.


def _v_columns(y: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    """v as a view of y's last Hkv·D columns, (B, T, Hkv, D), row stride (H + 2·Hkv)·D."""
    return y[..., y.shape[-1] - n_kv * head_dim :].unflatten(-1, (n_kv, head_dim))


@torch.library.custom_op("blt::fa4_qkv", mutates_args=())
def _qkv(
    y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, window: int,
    bounds: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (B, T, (H + 2·Hkv)·D) contiguous, cos/sin (B, T, D/2) float32 -> the attention's output
    and log-sum-exp as _causal gives them, and the rotated q (B,T,H,D), k (B,T,Hkv,D) (saved
    for the backward). bounds: packed sequences, as in _causal (then B = 1)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    q, k = fused_outputs.rotate_qk(y, cos, sin, n_heads, n_kv)
    qkv = (q, k, _v_columns(y, n_kv, q.shape[-1]))
    if bounds is not None:
        qkv = [x[0] for x in qkv]
    out, lse = _flash_attn_fwd(
        *qkv, cu_seqlens_q=bounds, cu_seqlens_k=bounds, causal=True, window_size_left=_left(window), return_lse=True
    )[:2]  # fmt: skip
    return out, lse, q, k


@_qkv.register_fake
def _(y, cos, sin, n_heads, n_kv, window, bounds):
    B, T, _ = y.shape
    D = cos.shape[-1] * 2
    q, k = y.new_empty(B, T, n_heads, D), y.new_empty(B, T, n_kv, D)
    if bounds is None:
        return q.new_empty(q.shape), q.new_empty(B, n_heads, T, dtype=torch.float32), q, k
    return q.new_empty(T, n_heads, D), q.new_empty(n_heads, T, dtype=torch.float32), q, k


@torch.library.custom_op("blt::fa4_qkv_backward", mutates_args=())
def _qkv_backward(
    dout: torch.Tensor, y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, window: int, bounds: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:  # fmt: skip
    """-> the gradient of y: FlashAttention-4's dv written into its v columns, dq and dk
    rotated back into the others."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dy, dq, dk = torch.empty_like(y), torch.empty_like(q), torch.empty_like(k)
    n_kv, D = k.shape[2], k.shape[3]
    tensors = [q, k, _v_columns(y, n_kv, D), out, dout, dq, dk, _v_columns(dy, n_kv, D)]
    if bounds is not None:  # out and dout are packed already
        tensors = [x if i in (3, 4) else x[0] for i, x in enumerate(tensors)]
    q_, k_, v_, out_, dout_, dq_, dk_, dv_ = tensors
    _flash_attn_bwd(
        q_, k_, v_, out_, dout_, lse, causal=True, window_size_left=_left(window), cu_seqlens_q=bounds,
        cu_seqlens_k=bounds, dq=dq_, dk=dk_, dv=dv_,
    )  # fmt: skip
    fused_outputs.unrotate_qk(dy, dq, dk, cos, sin)
    return dy


@_qkv_backward.register_fake
def _(dout, y, q, k, out, lse, cos, sin, window, bounds):
    return torch.empty_like(y)


def _qkv_setup(ctx, inputs, output):
    y, cos, sin, _, _, window, bounds = inputs
    out, lse, q, k = output
    ctx.save_for_backward(y, q, k, out, lse, cos, sin, bounds)
    ctx.window = window


def _qkv_grad(ctx, dout, _dlse, _dq, _dk):
    y, q, k, out, lse, cos, sin, bounds = ctx.saved_tensors
    return _qkv_backward(dout.contiguous(), y, q, k, out, lse, cos, sin, ctx.window, bounds), *[None] * 6


_qkv.register_autograd(_qkv_grad, setup_context=_qkv_setup)


def qkv_attention(
    y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_heads: int, n_kv: int, window: int | None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The causal self-attention of the fused q|k|v product y (B, T, (H + 2·Hkv)·D) -> (B, T, H·D):
    q and k rotated by rope (as blt.fused_outputs.rotary_split), then attention(q, k, v, window,
    bounds). Needs takes(y) and blt.fused_outputs.available."""
    B, T, _ = y.shape
    out = _qkv(y.contiguous(), *fused_outputs.rope_tables(rope, B, T), n_heads, n_kv, window or 0, bounds)[0]
    return out.view(B, T, -1)
