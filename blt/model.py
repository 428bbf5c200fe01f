"""The Byte Latent Transformer (paper §3, Figure 2): local encoder -> global transformer over
patches -> local decoder, with a frozen entropy model deciding the patches.

How bytes, patches and targets line up for one row (k = 1):

    tokens    BOS  O  n  c  e  _  u  p  o  n          (B,T) inputs
    targets    O   n  c  e  _  u  p  o  n  _          (B,T) = the next byte of each input
    patches   [BOS][O  n  c  e  _][u  p  o  n]         patch_lengths = [1, 5, 4]
    encoder   byte states h (B,T,D) and pooled patches (B,P,k·D)
    global    causal over patches -> (B,P,D_global)
    decoder   byte t reads the latest patch whose bytes are all <= t and predicts target t
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blt import masks as M
from blt.config import BLTConfig
from blt.decoder import LocalDecoder
from blt.encoder import LocalEncoder
from blt.entropy_model import EntropyModel
from blt.global_transformer import GlobalTransformer
from blt.packing import packed_patch_count, run_packed
from blt.patcher import Patching, patch
from blt.tokens import BOE_ID, VOCAB_SIZE

LN2 = 0.6931471805599453


@dataclass
class BLTOutput:
    logits: torch.Tensor  # (B,T,260)
    patching: Patching
    loss: torch.Tensor | None = None  # mean nats per target byte (BOE targets ignored)

    @property
    def bpb(self) -> float:
        return self.loss.item() / LN2


def packing_align(backend: str, doc_mask: bool = False) -> int:
    """Packed rows (blt.packing) start on FlexAttention's block boundaries, so that the packed
    mask needs no lookup of each slot's row (masks.packed_patch_mask): its kernels then run as
    fast as on the padded layout's plain causal mask. Dense masks need no alignment, nor
    FlashAttention-4's own kernels (masks.set_fa4), which take the rows' bounds, nor document
    masks, which look up each slot's document anyway."""
    return M.BLOCK if backend == "flex" and not M.uses_fa4() and not doc_mask else 1


class BLT(nn.Module):
    def __init__(self, cfg: BLTConfig, entropy_model: EntropyModel | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = LocalEncoder(cfg)
        self.global_model = GlobalTransformer(cfg)
        self.decoder = LocalDecoder(cfg)
        self.entropy_model = None
        # Run the global transformer on packed rows (blt.packing). Without packed_slots, forward
        # packs into exactly the rows' patches (one host read); train's OneGraph passes a padded
        # count it already has. An execution choice, not part of the model: not saved.
        self.pack_patches = False
        self.init_weights()
        if entropy_model is not None:
            self.set_entropy_model(entropy_model)

    def init_weights(self):
        """Truncated normal (±3σ), as the official code:

        | weight                               | std              |
        |--------------------------------------|------------------|
        | byte and hash n-gram embeddings      | d_encoder^-0.5   |
        | attention wq, wk, wv, wo             | d^-0.5           |
        | feed-forward w1, w3 / w2             | d^-0.5 / hidden^-0.5 |
        | projections, output                  | fan_in^-0.5      |
        | RMSNorm weights                      | 1                |
        """
        self.encoder.init_weights()
        self.global_model.init_weights()
        self.decoder.init_weights()

    def set_entropy_model(self, entropy_model: EntropyModel) -> None:
        """Attach the frozen entropy model used for entropy-based patching."""
        entropy_model.eval().requires_grad_(False)
        self.entropy_model = entropy_model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.entropy_model is not None:
            self.entropy_model.eval()  # frozen: no dropout, ever
        return self

    @torch.no_grad()
    def patch(self, tokens: torch.Tensor) -> Patching:
        return patch(tokens, self.cfg.patcher, self.entropy_model, self.cfg.doc_mask)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        patch_lengths: torch.Tensor | None = None,
        next_starts_patch: torch.Tensor | None = None,
        backend: str | None = None,
        packed_slots: int | None = None,
    ) -> BLTOutput:
        """tokens (B,T) -> BLTOutput. Without patch_lengths the patcher decides the patches;
        with them, next_starts_patch (B,) says whether the window's last patch is complete
        (None: complete; False: the official code's and the HF port's reading of lengths).
        packed_slots: run the global transformer on the rows' patches packed end to end in a
        sequence of this many slots (blt.packing; at least their total, each row's padded to
        packing_align(backend)), not on the padded (B, P) layout: the same outputs, without
        computing the padding. With pack_patches set and no packed_slots, the fewest slots;
        packed_slots=0: the padded layout even so.

        With cfg.doc_mask, nothing crosses the end of a document (an EOS) in the window: given
        patch_lengths must then not let a patch span two (the patcher's never do)."""
        B, T = tokens.shape
        if patch_lengths is None:
            patching = self.patch(tokens)
        else:
            patching = Patching(patch_lengths, next_starts_patch)
        backend = backend or M.default_backend(tokens.device)
        patch_ids = M.patch_ids_from_lengths(patching.patch_lengths, T)
        dec_ids = M.decoder_patch_ids(patch_ids, patching.next_starts_patch)
        P = patching.patch_lengths.shape[1]
        c = self.cfg
        docs = M.document_ids(tokens) if c.doc_mask else None
        masks = M.build_masks(
            patch_ids, dec_ids, P, c.cross_attn_k,
            enc_window=c.encoder.window, dec_window=c.decoder.window, patch_window=c.global_model.window,
            enc_cross_window=c.encoder.cross_attn_window, dec_cross_window=c.decoder.cross_attn_window,
            backend=backend, docs=docs,
        )  # fmt: skip
        h, patches = self.encoder(tokens, patch_ids, P, masks.enc_self, masks.enc_cross, docs=docs)
        align = packing_align(backend, c.doc_mask)
        if packed_slots is None and self.pack_patches:
            packed_slots = packed_patch_count(patching.patch_lengths, align)
        if not packed_slots:
            patch_out = self.global_model(patches, masks.patch_self)
        else:  # a way to run the same computation (blt.packing)
            pdocs = None if docs is None else M.patch_documents(docs, patch_ids, P)
            patch_out = run_packed(self.global_model, patches, patching.patch_lengths, packed_slots, backend, align,
                                   pdocs)  # fmt: skip
        logits = self.decoder(h, patch_out, masks.dec_self, masks.dec_cross)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=BOE_ID)
        return BLTOutput(logits, patching, loss)

    # ---- parameters ----------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts by part (the entropy model is counted separately)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        hash_ = self.encoder.hash_embeddings.weight.numel()
        out = {
            "global": count(self.global_model),
            "local": count(self.encoder) + count(self.decoder) - hash_,
            "hash_tables": hash_,
            "entropy_model": count(self.entropy_model) if self.entropy_model is not None else 0,
        }
        out["total_blt"] = out["global"] + out["local"] + out["hash_tables"]
        return out
