"""Transformer building blocks shared by every BLT component (paper §3, following Llama:
pre-norm RMSNorm, rotary position embeddings, SwiGLU feed-forward) and the single
attention entry point with its two backends.

Shape symbols: B batch, H heads, Q queries, K keys, T bytes, P patches, D width.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from blt import fa4, fused_outputs, patch_runs
from blt.config import TransformerConfig
from blt.masks import CausalRows, PatchRuns, set_fa4, uses_fa4

_compiled_flex = None
FLEX_BACKENDS = ("triton", "flash", "fa4")
_flex_options: dict | None = None  # FlexAttention kernel_options; None = torch's Triton kernels
_fused_products = False


def set_flex_backend(name: str) -> None:
    """Which kernels run the attentions on CUDA: torch's own Triton kernels for FlexAttention
    ("triton", the default); FlashAttention-4's CuTe kernels through FlexAttention's
    experimental BACKEND="FLASH" ("flash", same masks and math; see flex_kernel_options for
    where it applies); or FlashAttention-4's own causal kernels for the self-attentions
    ("fa4": sliding windows and packed rows built in, no block lists; blt.fa4), FlexAttention's
    Triton kernels for the rest. "flash" and "fa4" need the optional flash-attn-4 package. Set
    it before the first compiled call: compiled graphs keep the backend they were traced with."""
    global _flex_options
    if name not in FLEX_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {list(FLEX_BACKENDS)}")
    if name != "triton" and not fa4.available():
        raise ValueError(f"attention backend {name!r} needs FlashAttention-4: pip install flash-attn-4")
    _flex_options = {"BACKEND": "FLASH"} if name == "flash" else None
    set_fa4(name == "fa4")


def flex_backend() -> str:
    """The backend set_flex_backend chose."""
    return "flash" if _flex_options else "fa4" if uses_fa4() else "triton"


def flex_kernel_options(dtype: torch.dtype, cross: bool, compiling: bool) -> dict | None:
    """FlexAttention's kernel_options for one call under the chosen backend. The FLASH
    backend takes only 16-bit inputs and static shapes, so it runs only inside a graph being
    compiled (blt.train --one-graph compiles one per padded patch count), and only for the
    self-attentions: on the cross-attentions' masks (a few keys per query) Triton's kernels
    were faster (bench/flex_blocks.py)."""
    if cross or not compiling or dtype not in (torch.bfloat16, torch.float16):
        return None
    return _flex_options


def _flex(q, k, v, block_mask, cross: bool = False):
    """FlexAttention, compiled on CUDA (eager elsewhere, for tests). Sequence lengths change
    with every batch's patch count, so the kernel is compiled for dynamic shapes: a static one
    would hit the recompile limit and fall back to the slow unfused path. Inside a graph being
    compiled, this call is traced into it, with the kernel options of the chosen backend."""
    options = flex_kernel_options(q.dtype, cross, torch.compiler.is_compiling()) if q.is_cuda else None
    fn = compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)


def compiled_flex():
    """torch.compile(flex_attention), made once and outside any graph being traced (inside one,
    plain flex_attention, which the graph compiles). Made while --one-graph traced its loss, the
    wrapper ran uncompiled when called eagerly afterwards (the held-out evaluation), so every
    score was materialised: 32 GiB for 16 rows of 2048 one-byte patches."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, cross: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, q (B,H,Q,Dh), k/v (B,Hkv,K,Dh) -> (B,H,Q,Dh).

    mask: None (every query sees every key), a boolean tensor broadcastable to (B,H,Q,K)
    (True = may attend; dense SDPA backend), a FlexAttention BlockMask, masks.PatchRuns
    (a one-patch cross-attention, on blt.patch_runs's kernels), or masks.CausalRows (a causal
    self-attention, on FlashAttention-4's kernels where they take the inputs). A query row with no
    visible key outputs zeros in every backend (FlexAttention's convention) instead of NaN.
    """
    if isinstance(mask, CausalRows):
        if fa4.takes(q) and k.shape[2] == q.shape[2]:  # (not a cached decoding step)
            return fa4.attention(q, k, v, mask.window, mask.bounds)
        mask = mask.flex()
    if isinstance(mask, PatchRuns):
        read = patch_runs.bytes_read_patches if mask.queries == "bytes" else patch_runs.patches_read_bytes
        return read(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask.start, mask.end).transpose(1, 2)
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, cross)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    visible = mask.any(dim=-1, keepdim=True)  # (B,1,Q,1)
    if bool(visible.all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible)
    return out * visible.to(out.dtype)


def set_fused_products(enabled: bool) -> None:
    """A training-speed switch (blt.train --fused-products). On: the matrix products that read
    one normalised input run as one product over their concatenated weights (q, k, v; w1, w3;
    a cross-attention's k, v), and the RMSNorm gain before them is folded into those weights:
    linear(g ⊙ n(x), W) = linear(n(x), W·diag(g)). The same function, parameters and gradients;
    fewer, larger matrix products, and no reduction over every row for the gain's gradient
    (it comes from the small (out, D) weight gradient instead). Where Triton kernels run, the
    q|k|v output is split and rotated, and SwiGLU applied to the w1|w3 output, by
    blt.fused_outputs' kernels. Off (the default), each product runs on its own, as written.
    Set it before compiling."""
    global _fused_products
    _fused_products = enabled


def project(x: torch.Tensor, norm: "RMSNorm | None", *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(lin(norm(x)) for lin in linears), bias-free linears; norm None: no norm."""
    if not _fused_products:
        h = x if norm is None else norm(x)
        return tuple(lin(h) for lin in linears)
    return fused_product(x, norm, *linears).split([lin.out_features for lin in linears], dim=-1)


def fused_product(x: torch.Tensor, norm: "RMSNorm | None", *linears: nn.Linear) -> torch.Tensor:
    """The outputs of project(x, norm, *linears) side by side, from one matrix product over the
    concatenated weights, the norm's gain folded into them."""
    w = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    if norm is not None:
        w, x = w * norm.weight, norm.normalize(x)
    width = w.shape[0]
    if width % 16 == 0:  # nothing padded, nothing to slice off
        return F.linear(x, w)
    # e.g. the 260 logits: zero rows up to a multiple of 16 get cuBLAS's fast kernels
    return F.linear(x, F.pad(w, (0, 0, 0, -width % 16)))[..., :width]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), computed in float32 (bf16 training), returned in the input dtype."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)  # scaled in the input dtype, as the reference does


class Rotary(nn.Module):
    """Rotary position embeddings with interleaved pairs (x[2m], x[2m+1]), as Meta's code.

    `table(T)` serves positions 0..T-1 from cos/sin tables made once (the official code
    precomputes them too). Inside a compiled graph they are then read: computed from the
    positions instead, sin and cos would be recomputed in every kernel that rotates q or k.
    """

    def __init__(self, head_dim: int, theta: float, positions: int = 4096):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._make_tables(positions)

    def _make_tables(self, n: int) -> None:
        cos, sin = self(torch.arange(n, device=self.inv_freq.device))
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B,T) -> cos, sin of shape (..., T, Dh/2), float32."""
        freqs = positions.float()[..., None] * self.inv_freq
        return freqs.cos(), freqs.sin()

    def table(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, Dh/2) for positions 0..T-1: the same values as forward(arange(T))."""
        if T > self.cos_table.shape[0]:
            if torch.compiler.is_compiling():  # no new buffers while tracing: compute them
                return self(torch.arange(T, device=self.inv_freq.device))
            self._make_tables(max(T, 2 * self.cos_table.shape[0]))
        return self.cos_table[:T], self.sin_table[:T]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B,T,H,Dh), heads after positions as the projections lay them out (rotated in that
    order, the result keeps their memory order: a compiled graph then needs no transposing
    copy, before the attention or in its backward); rope from Rotary.forward with (T,Dh/2) or
    (B,T,Dh/2) tables."""
    cos, sin = rope[0][..., None, :], rope[1][..., None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope, mask, cache=None, norm=None):
        """x (B,T,D), normalised by `norm` first if given. cache, if given, is a callable
        (k, v) -> (k_all, v_all) that stores the new keys/values and returns everything the
        queries may attend (incremental generation)."""
        B, T, _ = x.shape
        if _fused_products and fused_outputs.available(x.device):  # one kernel splits and rotates
            y = fused_product(x, norm, self.wq, self.wk, self.wv)
            if cache is None and isinstance(mask, CausalRows) and fa4.takes(y):  # v read where y has it
                out = fa4.qkv_attention(y, rope, self.n_heads, self.n_kv, mask.window, mask.bounds)
                return self.wo(out)
            q, k, v = (t.transpose(1, 2) for t in fused_outputs.rotary_split(y, rope, self.n_heads, self.n_kv))
        else:
            q, k, v = project(x, norm, self.wq, self.wk, self.wv)
            q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
            k = apply_rotary(k.view(B, T, self.n_kv, self.head_dim), rope).transpose(1, 2)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache(k, v)
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class CrossAttention(nn.Module):
    """Cross-attention between bytes and patches (§3.2.2, §3.3.1): RMSNorm on queries and on
    keys/values, no positional embedding; the mask alone says who sees whom."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.kv_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, kv, mask):
        """x (B,Q,D) queries, kv (B,K,D) -> (B,Q,D); the caller adds the residual."""
        B, Q, _ = x.shape
        (q,) = project(x, self.q_norm, self.wq)
        q = q.view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = project(kv, self.kv_norm, self.wk, self.wv)
        k = k.view(B, -1, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, -1, self.n_kv, self.head_dim).transpose(1, 2)
        out = attend(q, k, v, mask, cross=True)
        return self.wo(out.transpose(1, 2).reshape(B, Q, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, norm=None):
        """x (B,T,D), normalised by `norm` first if given."""
        if _fused_products and fused_outputs.available(x.device):  # one kernel each way
            return self.w2(fused_outputs.swiglu(fused_product(x, norm, self.w1, self.w3)))
        h1, h3 = project(x, norm, self.w1, self.w3)
        return self.w2(F.silu(h1) * h3)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache=None):
        x = x + self.dropout(self.attn(x, rope, mask, cache, norm=self.attn_norm))
        return x + self.dropout(self.ffn(x, norm=self.ffn_norm))


def trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def init_block(block: nn.Module) -> None:
    """Init table of the official code (std truncated at ±3σ):

    | weight                           | std            |
    |----------------------------------|----------------|
    | attention wq/wk/wv/wo            | dim^-0.5       |
    | feed-forward w1, w3 (inputs)     | dim^-0.5       |
    | feed-forward w2 (output)         | hidden^-0.5    |
    | norms                            | 1              |
    """
    for m in block.modules():
        if isinstance(m, (SelfAttention, CrossAttention)):
            std = m.wq.in_features ** -0.5
            for lin in (m.wq, m.wk, m.wv, m.wo):
                trunc_normal_(lin.weight, std)
        elif isinstance(m, FeedForward):
            trunc_normal_(m.w1.weight, m.w1.in_features ** -0.5)
            trunc_normal_(m.w3.weight, m.w3.in_features ** -0.5)
            trunc_normal_(m.w2.weight, m.w2.in_features ** -0.5)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def init_linear(lin: nn.Linear) -> None:
    trunc_normal_(lin.weight, lin.in_features ** -0.5)

