"""Local encoder (paper §3.2): byte embeddings + hash n-gram embeddings, a few windowed
causal transformer layers over bytes, then cross-attention pooling of bytes into patches.

Pooling (§3.2.2): each patch gets k queries, initialised by max-pooling its bytes' states and
projecting D -> k·D; they cross-attend to the bytes of their own patch only (or to the
bytes of the last `cross_attn_window` patches). The result, (B, P, k·D), feeds the global model.
"""

import torch
from torch import nn

from blt import patch_runs
from blt.config import BLTConfig
from blt.layers import CrossAttention, Rotary, TransformerBlock, init_block, init_linear, trunc_normal_
from blt.masks import PatchRuns, document_starts
from blt.ngram_hash import HashNgramEmbedding
from blt.tokens import VOCAB_SIZE


def max_pool_patches(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int, runs: PatchRuns | None = None):
    """(B,T,D) byte states -> (B,P,D) elementwise max over each patch's bytes (zeros if empty).
    Given the encoder's PatchRuns, on blt.patch_runs's kernel: the same values and gradients
    (split evenly among tied bytes), except where a patch's max is exactly 0, where
    scatter_reduce also hands a share to its zero initial value and the kernel does not."""
    if runs is not None:
        return patch_runs.max_pool(h, runs.start, runs.end)
    B, _, D = h.shape
    out = h.new_zeros(B, num_patches, D)
    index = patch_ids.clamp(0, num_patches - 1)[..., None].expand_as(h)
    return out.scatter_reduce(1, index, h, reduce="amax", include_self=False)


class LocalEncoder(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        e = self.cfg = cfg.encoder
        self.k = cfg.cross_attn_k
        self.double_residual = cfg.cross_attn_double_residual
        self.hash_mean = cfg.hash_embed_mean
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, e.dim)
        self.hash_embeddings = HashNgramEmbedding(e.dim, e.ngram_sizes, e.hash_rows, e.hash_functions)
        self.rope = Rotary(e.head_dim, e.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(e) for _ in range(e.n_layers))
        self.cross_attn = nn.ModuleList(CrossAttention(e) for _ in range(e.n_layers if e.cross_attn_all_layers else 1))
        self.patch_proj = nn.Linear(e.dim, e.dim * self.k, bias=False)
        self.dropout = nn.Dropout(e.dropout)
        # Under autocast, carry the byte-level residual stream (encoder, then decoder) in the
        # autocast dtype (bf16) from the embeddings on, as the official code's bf16 parameters
        # make it; False keeps it float32, as autocast alone does (the transformers port). The
        # global transformer's is bf16 either way: its input comes out of a matrix product.
        # A training choice, not part of the model: not saved.
        self.autocast_residual = False

    def init_weights(self):
        std = self.cfg.dim ** -0.5
        trunc_normal_(self.tok_embeddings.weight, std)
        trunc_normal_(self.hash_embeddings.weight, std)
        for m in (*self.layers, *self.cross_attn):
            init_block(m)
        init_linear(self.patch_proj)

    def embed(self, tokens: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) -> (B,T,D): byte embedding plus its hash n-gram embeddings (eq. 6). docs: (B,T)
        document ids (document masking): no n-gram reaches into an earlier document."""
        doc_pos = None
        if docs is not None:
            doc_pos = torch.arange(tokens.shape[1], device=tokens.device) - document_starts(docs)
        h = self.tok_embeddings(tokens) + self.hash_embeddings(tokens, doc_pos)
        if self.hash_mean:
            h = h / (self.hash_embeddings.num_tables + 1)
        return h

    def has_cross_attn(self, i: int) -> bool:
        return self.cfg.cross_attn_all_layers or i == len(self.layers) - 1

    def cross_attend(self, i: int, queries: torch.Tensor, h: torch.Tensor, mask) -> torch.Tensor:
        """One pooling cross-attention step with its residual(s)."""
        ca = self.cross_attn[i if self.cfg.cross_attn_all_layers else 0]
        out = queries + ca(queries, h, mask)
        return out + queries if self.double_residual else out

    def init_queries(self, h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int, runs: PatchRuns | None = None):
        """(B,T,D) -> (B,P·k,D) pooling queries: max over each patch, projected D -> k·D."""
        B, _, D = h.shape
        return self.patch_proj(max_pool_patches(h, patch_ids, num_patches, runs)).view(B, num_patches * self.k, D)

    def forward(self, tokens, patch_ids, num_patches, self_mask, cross_mask, positions=None, caches=None, docs=None):
        """tokens (B,T), patch_ids (B,T) -> byte states (B,T,D), patch states (B,P,k·D).
        docs: (B,T) document ids, with document masking (the masks say the rest)."""
        B, T = tokens.shape
        rope = self.rope.table(T) if positions is None else self.rope(positions)
        h = self.embed(tokens, docs)
        if self.autocast_residual and torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        h = self.dropout(h)
        queries = None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, self_mask, None if caches is None else caches[i])
            if self.has_cross_attn(i):
                if queries is None:  # initialised once by pooling, as the official code
                    runs = cross_mask if isinstance(cross_mask, PatchRuns) else None
                    queries = self.init_queries(h, patch_ids, num_patches, runs)
                queries = self.cross_attend(i, queries, h, cross_mask)
        return h, queries.view(B, num_patches, -1)
