"""Local decoder (paper §3.3): byte-level transformer layers, each preceded by a
cross-attention in which bytes (queries) read the global model's patch outputs (keys and
values, k per patch, projected D_global -> k·D). Byte t may read only patches whose bytes
are all <= t (masks.decoder_patch_ids). A final RMSNorm and a linear map give 260 logits.
"""

import torch
from torch import nn

from blt.config import BLTConfig
from blt.layers import CrossAttention, RMSNorm, Rotary, TransformerBlock, init_block, init_linear, project
from blt.tokens import VOCAB_SIZE


class LocalDecoder(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        d = self.cfg = cfg.decoder
        self.k = cfg.cross_attn_k
        self.double_residual = cfg.cross_attn_double_residual
        self.patch_proj = nn.Linear(cfg.global_model.dim, d.dim * self.k, bias=False)
        self.rope = Rotary(d.head_dim, d.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(d) for _ in range(d.n_layers))
        self.cross_attn = nn.ModuleList(CrossAttention(d) for _ in range(d.n_layers if d.cross_attn_all_layers else 1))
        self.norm = RMSNorm(d.dim, d.norm_eps)
        self.output = nn.Linear(d.dim, VOCAB_SIZE, bias=False)
        self.dropout = nn.Dropout(d.dropout)

    def init_weights(self):
        init_linear(self.patch_proj)
        for m in (*self.layers, *self.cross_attn):
            init_block(m)
        nn.init.ones_(self.norm.weight)
        init_linear(self.output)

    def patch_keys(self, patch_out: torch.Tensor) -> torch.Tensor:
        """(B,P,D_global) -> (B,P·k,D) keys/values for the byte cross-attention."""
        B, P, _ = patch_out.shape
        return self.patch_proj(patch_out).view(B, P * self.k, self.cfg.dim)

    def has_cross_attn(self, i: int) -> bool:
        return self.cfg.cross_attn_all_layers or i == 0

    def cross_attend(self, i: int, h: torch.Tensor, kv: torch.Tensor, mask) -> torch.Tensor:
        ca = self.cross_attn[i if self.cfg.cross_attn_all_layers else 0]
        out = h + ca(h, kv, mask)
        return out + h if self.double_residual else out

    def forward(self, h, patch_out, self_mask, cross_mask, positions=None, caches=None):
        """h (B,T,D) encoder byte states, patch_out (B,P,D_global) -> logits (B,T,260)."""
        rope = self.rope.table(h.shape[1]) if positions is None else self.rope(positions)
        kv = self.patch_keys(patch_out)
        h = self.dropout(h)
        for i, layer in enumerate(self.layers):
            if self.has_cross_attn(i):
                h = self.cross_attend(i, h, kv, cross_mask)
            h = layer(h, rope, self_mask, None if caches is None else caches[i])
        return project(h, self.norm, self.output)[0]
