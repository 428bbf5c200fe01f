"""The entropy model (paper §2.3): a small causal byte-level transformer whose next-byte
entropy H(x_i | x_<i) decides where patches start. It is trained separately, then frozen.
Patching for a BLT with document masking, it reads within documents (doc_mask), as the official
entropy model's block-causal local attention does; `blt.train_entropy --doc-mask` (the default)
trains it that way too, so that it is read as it was trained.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blt.config import EntropyModelConfig
from blt.layers import RMSNorm, Rotary, TransformerBlock, init_block, init_linear, trunc_normal_
from blt.masks import causal_mask, default_backend, document_ids
from blt.tokens import VOCAB_SIZE


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) over the last dim, computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyModel(nn.Module):
    """vocab_size: the byte vocabulary (260) unless a subclass says otherwise (blt.bpe.TokenLM)."""

    def __init__(self, cfg: EntropyModelConfig, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        # how forward reads a window when not told: within documents or across them. Training
        # sets it (blt.train_entropy --doc-mask); a BLT's patcher passes its own config's choice.
        self.doc_mask = False
        self.init_weights()

    def init_weights(self):
        """Embedding std dim^-0.5, blocks as layers.init_block, output std dim^-0.5."""
        trunc_normal_(self.tok_embeddings.weight, self.cfg.dim ** -0.5)
        for layer in self.layers:
            init_block(layer)
        nn.init.ones_(self.norm.weight)
        init_linear(self.output)

    def forward(self, tokens, positions=None, mask=None, caches=None, doc_mask: bool | None = None):
        """tokens (B,T) -> logits (B,T,vocab_size); logits[:, t] predict token t+1 (a byte).

        positions/mask/caches let the generator run it incrementally; by default the
        whole window is processed with a sliding-window causal mask, within each document
        (masks.document_ids) with doc_mask (None: self.doc_mask).
        """
        B, T = tokens.shape
        if mask is None:
            docs = document_ids(tokens) if (self.doc_mask if doc_mask is None else doc_mask) else None
            mask = causal_mask(T, self.cfg.window, default_backend(tokens.device), tokens.device, docs)
        rope = self.rope.table(T) if positions is None else self.rope(positions)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return self.output(self.norm(h))

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor, doc_mask: bool | None = None) -> torch.Tensor:
        """(B,T) -> (B,T) entropy of the prediction made at each position (for the next byte);
        doc_mask: reading within documents (None: self.doc_mask)."""
        return entropy(self(tokens, doc_mask=doc_mask))

    @property
    def receptive_field(self) -> int | None:
        """How many earlier positions one position's output can depend on: each layer looks
        window - 1 positions back. None without a window (full causal attention)."""
        w = self.cfg.window
        return None if w is None else self.cfg.n_layers * (w - 1)


@torch.no_grad()
def stream_entropies(
    model: EntropyModel, tokens, out, context: int, chunk: int = 8192, batch: int = 8,
    dtype: torch.dtype | None = None, progress=None, doc_mask: bool = False,
) -> None:  # fmt: skip
    """Entropies of a whole token stream (a numpy array, e.g. a memory-mapped shard) into `out`
    (same length): out[i] is the entropy of the prediction the model makes at position i when
    it reads the stream from position i - context - (i mod chunk) on.

    The stream is cut into pieces of `chunk` positions, each run with the `context` positions
    before it; `batch` pieces per forward. With context >= model.receptive_field this is what
    one forward over the whole stream would give (up to float rounding). dtype: autocast to it
    (e.g. torch.bfloat16 on CUDA). progress(n): called with the positions done after each forward.
    doc_mask: within documents (a piece's documents are numbered from its start; only equality
    matters, so this too is what one forward over the stream gives).
    """
    device = next(model.parameters()).device
    n = len(tokens)
    starts = list(range(0, n, chunk))

    def run(windows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(windows.astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model.entropies(x, doc_mask).float().cpu()

    # Pieces whose context and chunk are both whole share one shape and are batched; the ones
    # at either end of the stream (shorter context or chunk) run alone.
    full = [s for s in starts if s >= context and s + chunk <= n]
    edges = [s for s in starts if not (s >= context and s + chunk <= n)]
    span = np.arange(context + chunk)
    for i in range(0, len(full), batch):
        group = np.asarray(full[i : i + batch])
        H = run(np.asarray(tokens[(group - context)[:, None] + span]))[:, context:]
        for s, h in zip(group, H):
            out[s : s + chunk] = h.numpy()
        if progress:
            progress(len(group) * chunk)
    for s in edges:
        lo, hi = max(0, s - context), min(n, s + chunk)
        out[s:hi] = run(np.asarray(tokens[lo:hi])[None])[0, s - lo :].numpy()
        if progress:
            progress(hi - s)
