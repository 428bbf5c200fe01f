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

The kernels run as two torch ops, forward and backward, so a compiled graph (and its CUDA
graph) calls them as they are; their fake versions give the compiler the output shapes.
"""

import importlib.util
from typing import Optional

import torch


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
