"""Latent global transformer (paper §3.1): a standard causal transformer over patch
representations. It holds most of the parameters and runs once per patch, not per byte.
Like the reference code it has no final norm: the decoder normalises what it reads.
"""

from torch import nn

from blt.config import BLTConfig
from blt.layers import Rotary, TransformerBlock, init_block, init_linear


class GlobalTransformer(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        g = self.cfg = cfg.global_model
        # A projection exists only when k·d_encoder differs from the global width (§3.2.2).
        self.in_proj = nn.Linear(cfg.global_input_dim, g.dim, bias=False) if cfg.global_input_dim != g.dim else None
        self.rope = Rotary(g.head_dim, g.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(g) for _ in range(g.n_layers))
        self.dropout = nn.Dropout(g.dropout)

    def init_weights(self):
        if self.in_proj is not None:
            init_linear(self.in_proj)
        for layer in self.layers:
            init_block(layer)

    def forward(self, x, mask, positions=None, caches=None, rope=None):
        """x (B,P,k·D_enc) -> (B,P,D_global). Positions 0..P-1, or `positions`, or the cos/sin
        tables of each position given as `rope` (packed rows: blt.packing)."""
        if rope is None:
            rope = self.rope.table(x.shape[1]) if positions is None else self.rope(positions)
        h = self.dropout(self.in_proj(x) if self.in_proj is not None else x)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return h
