"""Model FLOPs per byte, for MFU and for FLOP-matched comparisons (paper §4, Appendix B).

Counts multiply-adds of every matrix product as 2 FLOPs, attention scores and values
included (with the mean number of keys a query actually sees), embeddings and norms
excluded. Training costs 3x the forward pass for the trained parts (forward + backward);
the frozen entropy model costs one forward pass per byte, in the step unless its entropies were
computed beforehand.
"""

from dataclasses import dataclass

from blt.config import BLTConfig, TransformerConfig
from blt.tokens import VOCAB_SIZE


def mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys seen by a causal query over a sequence of seq_len positions."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions < window see t+1 keys, the rest see `window` keys
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def layer_flops(c: TransformerConfig, context: float) -> float:
    """Forward FLOPs of one transformer layer for one position."""
    d, kv = c.dim, c.kv_heads * c.head_dim
    proj = d * d + 2 * d * kv + d * d  # wq, wk, wv, wo
    ffn = 3 * d * c.hidden
    attn = 2 * context * c.n_heads * c.head_dim  # scores + weighted values
    return 2 * (proj + ffn + attn)


def cross_attn_flops_per_query(c: TransformerConfig, keys: float) -> float:
    """wq and wo for one query, plus its scores and weighted values over `keys` keys."""
    return 2 * (2 * c.dim * c.dim + 2 * keys * c.n_heads * c.head_dim)


def cross_attn_flops_per_key(c: TransformerConfig) -> float:
    """wk and wv for one key/value position."""
    return 2 * 2 * c.dim * c.kv_heads * c.head_dim


@dataclass
class FlopCount:
    encoder: float  # per byte, forward
    global_model: float
    decoder: float
    entropy_model: float

    @property
    def forward(self) -> float:
        """Inference FLOPs per byte of the BLT proper (patching model excluded, as the paper)."""
        return self.encoder + self.global_model + self.decoder

    @property
    def train(self) -> float:
        """Training FLOPs per byte when the step patches: forward + backward of the BLT, forward
        of the entropy model."""
        return self.train_blt + self.entropy_model

    @property
    def train_blt(self) -> float:
        """Training FLOPs per byte of the BLT alone (forward + backward): the step's FLOPs when
        the entropies were computed before training (blt.train --precomputed-entropies)."""
        return 3 * self.forward


def blt_flops_per_byte(cfg: BLTConfig, bytes_per_patch: float, seq_len: int, attention: bool = True) -> FlopCount:
    """FLOPs per byte for windows of seq_len bytes cut into patches of mean size bytes_per_patch.
    attention=False leaves out the attention scores and weighted values: the weight matrices'
    products alone (the "6N" part of training FLOPs)."""
    e, g, d, em, k = cfg.encoder, cfg.global_model, cfg.decoder, cfg.entropy_model, cfg.cross_attn_k
    patches_per_byte = 1.0 / bytes_per_patch
    n_patches = max(seq_len * patches_per_byte, 1.0)

    def context(n, window):  # keys a query sees (none counted without attention)
        return mean_context(n, window) if attention else 0.0

    enc = e.n_layers * layer_flops(e, context(seq_len, e.window))
    enc_cross_layers = e.n_layers if e.cross_attn_all_layers else 1
    keys_per_query = bytes_per_patch * (e.cross_attn_window or 1) if attention else 0.0
    enc += patches_per_byte * 2 * e.dim * e.dim * k  # pooled D -> k·D projection
    enc += enc_cross_layers * (
        cross_attn_flops_per_key(e) + patches_per_byte * k * cross_attn_flops_per_query(e, keys_per_query)
    )

    glob = patches_per_byte * g.n_layers * layer_flops(g, context(int(n_patches), g.window))
    if cfg.global_input_dim != g.dim:
        glob += patches_per_byte * 2 * cfg.global_input_dim * g.dim

    dec = d.n_layers * layer_flops(d, context(seq_len, d.window))
    dec_cross_layers = d.n_layers if d.cross_attn_all_layers else 1
    dec += patches_per_byte * 2 * g.dim * d.dim * k  # patch outputs -> k keys/values
    dec += dec_cross_layers * (
        patches_per_byte * k * cross_attn_flops_per_key(d)
        + cross_attn_flops_per_query(d, k * (d.cross_attn_window or 1) if attention else 0.0)
    )
    dec += 2 * d.dim * VOCAB_SIZE

    ent = em.n_layers * layer_flops(em, context(seq_len, em.window)) + 2 * em.dim * VOCAB_SIZE
    if not cfg.patcher.needs_entropy:
        ent = 0.0
    return FlopCount(enc, glob, dec, ent)


def transformer_flops_per_byte(c: TransformerConfig, seq_len: int) -> float:
    """Forward FLOPs per byte of a plain byte-level transformer LM (the baseline)."""
    return token_lm_flops_per_byte(c, VOCAB_SIZE, seq_len, 1.0)


def token_lm_flops_per_byte(c: TransformerConfig, vocab_size: int, seq_len: int, bytes_per_token: float) -> float:
    """Forward FLOPs per byte of a transformer LM over tokens of `vocab_size` ids (blt.bpe's
    TokenLM; bytes: 260 ids, one byte each): its FLOPs per token over windows of seq_len tokens,
    shared by the bytes_per_token bytes a token stands for (measured on held-out text)."""
    per_token = c.n_layers * layer_flops(c, mean_context(seq_len, c.window)) + 2 * c.dim * vocab_size
    return per_token / bytes_per_token
