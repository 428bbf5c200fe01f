"""One-position building blocks of the byte step: layers.py's modules with cached keys/values.

Not in the paper (BLT_LLM.md §14, "On a CPU" and "On a GPU"). Each helper computes what its
module computes (layers.TransformerBlock, RMSNorm and RoPE, the cross-attentions, the
encoder's hash n-gram embeddings) for one new position per row, reading and writing the
caches of blt/kv_cache.py; the engine (blt/engine.py) arranges the model's weights into them
once.

A step is a few rows through ~50 matrix products and many small ops. On a CPU the products
are bound by memory bandwidth (every per-byte weight is read from memory for each byte: the
weights do not stay in cache) and the small ops by per-call overhead (hundreds of them), so
the helpers keep each weight in the layout whose product streams fastest, split every
product across the threads (how many: blt/cpu_threads.py), fuse q/k/v and the cross-attention
keys/values into one product each, rotate with one complex multiply, and keep the number of
kernel calls low. Compiled on a GPU, attention over the caches is written out as products and
a softmax (_sdpa).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blt.kv_cache import KVCache


def _sdpa(q, k, v, mask):
    """Attention of a step's few queries over cached keys (mask: bool, True = visible).

    Compiled on a GPU it is written out as products and a softmax, which inductor fuses into
    a few small kernels: SDPA's fused kernels tile over queries, and with one query per row
    most of their tiles are idle while one of them walks every key (45 µs a call on an H200
    in float32, two thirds of a step). Elsewhere, SDPA itself."""
    if not (q.is_cuda and torch.compiler.is_compiling()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return _attention_math(q, k, v, mask)


def _attention_math(q, k, v, mask):
    """SDPA's result (bool mask, grouped-query heads) as plain products in float32."""
    if k.shape[1] != q.shape[1]:  # grouped-query: query head h reads key/value head h // group
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


class Norm:
    """A layers.RMSNorm for steps. In float32 on CPU it computes exactly RMSNorm's numbers
    (x·rsqrt(mean(x²) + eps)·w, bit for bit) in 7 kernel calls that take ~8 us where the module
    takes ~17 us and F.rms_norm ~10 (mostly turning the Python scalars D and eps into tensors,
    done once here). Elsewhere, and in other dtypes (the module rounds to the dtype before
    scaling), the module itself."""

    def __init__(self, norm):
        w = norm.weight.detach()
        self.norm, self.w = norm, w
        self.fast = w.device.type == "cpu" and w.dtype == torch.float32
        self.d = torch.tensor(float(w.shape[0]))  # 0-dim: mean = sum / d, as torch.mean
        self.eps = torch.tensor(norm.eps, dtype=torch.float32)

    def __call__(self, x):
        if not self.fast or x.dtype != torch.float32:
            return self.norm(x)
        r = (x * x).sum(-1, keepdim=True).div_(self.d).add_(self.eps).rsqrt_()
        return (x * r).mul_(self.w)


class Proj:
    """x·Wᵀ for a bias-free nn.Linear (weights given together are concatenated along the
    outputs: one product instead of several), stored in the layout its product is fastest in.

    On CPU a product of a few rows streams the whole weight from memory (the model does not
    stay in cache), which one core does slowly for these small matrices. So the outputs are
    split into one block per thread and the blocks run as one batched product, a thread each
    (2 threads: 2730x512 in 155 instead of 253 us, 256x256 in 22 instead of 31 us). A block
    with more outputs than inputs is stored (in, out/n), which `x @ w` streams ~1.7x faster
    than F.linear's (out, in) (768x256: 56 vs 97 us); with fewer outputs, (out, in) is the
    faster one (256x682: 57 vs 88 us). Each output is still one whole dot product, as in
    F.linear. Elsewhere (the compiled CUDA path): F.linear."""

    def __init__(self, *weights):
        weights = [t.detach() for t in weights]
        self.cpu = weights[0].device.type == "cpu"
        if not self.cpu:
            self.w = torch.cat(weights) if len(weights) > 1 else weights[0]
            return
        inp, out = weights[0].shape[1], sum(t.shape[0] for t in weights)
        threads = torch.get_num_threads()  # one block per thread, of at least 32 outputs
        self.n = max(d for d in range(1, threads + 1) if out % d == 0 and (d == 1 or out // d >= 32))
        if out > inp:  # one (in, out) copy; block j = its columns j·out/n.. (rows `out` apart)
            wt = torch.cat([t.t() for t in weights], dim=1)
            self.w = wt.view(inp, self.n, out // self.n).transpose(0, 1)
        else:  # (out, in) as it is; block j = its rows j·out/n.., read transposed
            w = torch.cat(weights) if len(weights) > 1 else weights[0]
            self.w = w.view(self.n, out // self.n, inp).transpose(1, 2)

    def __call__(self, x):
        if not self.cpu:
            return F.linear(x, self.w)
        lead = x.shape[:-1]
        x3 = x if x.dim() == 3 and x.shape[0] == 1 else x.reshape(1, -1, x.shape[-1])
        y = torch.bmm(x3.expand(self.n, -1, -1), self.w)  # (n, rows, out/n)
        if y.shape[1] > 1:
            y = y.transpose(0, 1)  # a copy below; with one row, the blocks are in order already
        return y.reshape(*lead, -1)


class Block:
    """A TransformerBlock's weights arranged for one-position steps: q/k/v and the two SwiGLU
    input projections fused into one product each (same dot products, fewer kernel calls)."""

    def __init__(self, block):
        a = block.attn
        self.attn_norm, self.ffn_norm = Norm(block.attn_norm), Norm(block.ffn_norm)
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv, a.head_dim
        self.q_kv = (a.n_heads, 2 * a.n_kv)  # the fused output's query heads | key and value heads
        heads = a.n_heads + 2 * a.n_kv
        self.rotated = (torch.arange(heads) < a.n_heads + a.n_kv).view(1, heads, 1).to(a.wq.weight.device)
        self.wqkv = Proj(a.wq.weight, a.wk.weight, a.wv.weight)
        self.wo = Proj(a.wo.weight)
        self.w13 = Proj(block.ffn.w1.weight, block.ffn.w3.weight)
        self.w2 = Proj(block.ffn.w2.weight)


def rope_step(rotary, pos, blk: Block, complex_table: bool | None = None):
    """Rotary factors for one position per row, one per head of a block's fused q/k/v output
    (B, H+2·Hkv, ...): the rotation for the query and key heads, the identity for the value
    heads, so that one product rotates q and k and leaves v as it is.

    CPU: complex (B, H+2·Hkv, Dh/2) cos + i·sin (value heads 1): with each pair (x[2m],
    x[2m+1]) read as x0 + i·x1, the complex product (x0·cos - x1·sin) + i·(x0·sin + x1·cos)
    is layers.apply_rotary's products and sums (bit for bit), in one kernel call. Elsewhere
    (compiled CUDA graphs, real arithmetic): (cos2, sin2), each (B, H+2·Hkv, Dh), with
    x·cos2 + swap(x)·sin2 the same products and sums (value heads: cos 1, sin 0)."""
    cos, sin = rotary(pos[:, None])  # (B,1,Dh/2) float32
    if complex_table is None:
        complex_table = pos.device.type == "cpu"
    if complex_table:
        return torch.where(blk.rotated, torch.complex(cos, sin), 1.0)
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.where(blk.rotated, cos2, 1.0), torch.where(blk.rotated, sin2, 0.0)


def _rotate(y, rope, head_dim: int):
    """A block's fused q/k/v projection (B, 1, (H+2·Hkv)·Dh) -> (B, H+2·Hkv, Dh) heads with q and
    k rotated, v unchanged (float32 math)."""
    B = y.shape[0]
    yf = y.float()
    if isinstance(rope, torch.Tensor):  # complex table (CPU)
        out = torch.view_as_real(torch.view_as_complex(yf.view(B, -1, head_dim // 2, 2)) * rope).view(B, -1, head_dim)
    else:
        cos2, sin2 = rope
        yf = yf.view(B, -1, head_dim)
        out = yf * cos2 + yf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin2
    return out.to(y.dtype)


def block_step(blk: Block, x, rope, cache: KVCache, layer: int, at, mask, n: int):
    """TransformerBlock.forward for one new position per row (eval mode: no dropout); `at`,
    mask and n from KVCache.begin."""
    B = x.shape[0]
    qkv = _rotate(blk.wqkv(blk.attn_norm(x)), rope, blk.head_dim)  # (B, H+2·Hkv, Dh)
    q, new = qkv.split(blk.q_kv, dim=1)
    kv = cache.kv[layer]
    kv[at] = new
    out = _sdpa(q.unsqueeze(2), kv[:, : blk.n_kv, :n], kv[:, blk.n_kv :, :n], mask)
    x = x + blk.wo(out.transpose(1, 2).reshape(B, 1, -1))
    g, u = blk.w13(blk.ffn_norm(x)).chunk(2, dim=-1)
    return x + blk.w2(F.silu(g) * u)


class HashStep:
    """LocalEncoder.embed for the newest position only. Each (function, n) table's rolling hash
    of the last n ids is one row of an int64 coefficient matrix over the last max(n) ids
    (zeros for older ids); int64 products and sums wrap exactly as ngram_hash's do."""

    def __init__(self, enc, nmax, device):
        he = enc.hash_embeddings
        rows = []
        from blt.ngram_hash import PRIMES

        for f in range(he.functions):
            prime = PRIMES[f % len(PRIMES)]
            for n in he.ngram_sizes:
                powers = torch.tensor(prime, dtype=torch.long) ** torch.arange(n)  # as ngram_hash
                rows.append(torch.cat([torch.zeros(nmax - n, dtype=torch.long), powers]))
        self.coef = torch.stack(rows).to(device)  # (tables, nmax)
        self.offset = torch.arange(len(rows), device=device) * he.rows
        self.rows, self.he, self.tok, self.enc = he.rows, he, enc.tok_embeddings, enc

    def __call__(self, win):
        """win (B, nmax) last ids (left-padded with 0) -> (B,1,D)."""
        idx = (win[:, None, :] * self.coef).sum(-1) % self.rows + self.offset  # (B, tables)
        h = self.tok(win[:, -1:]) + F.embedding(idx, self.he.weight).sum(dim=-2, keepdim=True)
        if self.enc.hash_mean:
            h = h / (self.he.num_tables + 1)
        return h


class Cross:
    """A CrossAttention's weights arranged for steps: keys and values from one product."""

    def __init__(self, ca):
        self.q_norm, self.kv_norm = Norm(ca.q_norm), Norm(ca.kv_norm)
        self.n_heads, self.n_kv, self.head_dim = ca.n_heads, ca.n_kv, ca.head_dim
        self.wq, self.wkv, self.wo = Proj(ca.wq.weight), Proj(ca.wk.weight, ca.wv.weight), Proj(ca.wo.weight)


def cross_kv(ca: Cross, kv):
    """CrossAttention's keys/values for (B,K,D) inputs -> (B,Hkv,K,Dh) each."""
    B, K, _ = kv.shape
    k, v = ca.wkv(ca.kv_norm(kv)).view(B, K, 2, ca.n_kv, ca.head_dim).permute(2, 0, 3, 1, 4)
    return k, v


def cross(ca: Cross, x, k, v, mask):
    """CrossAttention.forward with precomputed keys/values (the caller adds the residual)."""
    B, Q, _ = x.shape
    q = ca.wq(ca.q_norm(x)).view(B, Q, ca.n_heads, ca.head_dim).transpose(1, 2)
    return ca.wo(_sdpa(q, k, v, mask).transpose(1, 2).reshape(B, Q, -1))
