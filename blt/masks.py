"""Every attention mask of BLT, built once per forward from patch ids (paper §3.2-3.3).

A worked example (k = cross_attn_k = 1), bytes 0..7 of "<BOS>the cat" cut into patches:

    byte       t :  0    1  2  3  4  5  6  7
    token        :  BOS  t  h  e  _  c  a  t
    patch_ids    :  0    1  1  1  1  2  2  2        patch 0 is BOS alone
    decoder ids  :  0    0  0  0  1  1  1  2?       byte t predicts t+1: it may use only
                                                    patches whose bytes are all <= t

Byte 4 ('_') is the last byte of patch 1, so the decoder at 4 (predicting 'c') may see
patch 1; the decoder at 3 ('e') may not, because patch 1 also holds byte 4. At the last
byte of the window (7) the patcher says whether byte 8 would open a new patch
(`next_starts_patch`); if so patch 2 is complete and visible, otherwise byte 7 sees patch 1.
The official code and the HF port always treat the window's last patch as complete; pass
`next_starts_patch=None` for that behaviour.

Four masks (True = may attend):
    enc_self, dec_self (T, T)  causal, sliding window over bytes (encoder, decoder)
    enc_cross  (P·k, T)    patch query j sees the bytes of patch j (or of j-w+1..j)
    patch_self (P, P)      causal over patches (global transformer)
    dec_cross  (T, P·k)    byte t sees patch dec_id[t] (or dec_id[t]-w+1..dec_id[t])

Two backends with identical semantics: dense boolean tensors for SDPA (CPU, reference) and
FlexAttention BlockMasks (CUDA; no T×T tensor is materialised).
"""

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import create_block_mask


def patch_ids_from_lengths(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,P) patch lengths (zero-padded on the right) -> (B,T) index of each byte's patch."""
    B = patch_lengths.shape[0]
    starts = (patch_lengths.cumsum(-1) - patch_lengths).clamp(max=seq_len)
    marks = torch.zeros(B, seq_len + 1, dtype=torch.long, device=patch_lengths.device)
    marks.scatter_add_(1, starts.long(), (patch_lengths > 0).long())
    return marks[:, :seq_len].cumsum(-1) - 1


def decoder_patch_ids(patch_ids: torch.Tensor, next_starts_patch: torch.Tensor | None = None) -> torch.Tensor:
    """(B,T) -> (B,T) index of the latest patch whose bytes are all <= t (-1: none yet).

    Byte t's own patch is complete exactly when byte t+1 opens a new patch.
    """
    last = torch.ones_like(patch_ids, dtype=torch.bool)
    last[:, :-1] = patch_ids[:, 1:] != patch_ids[:, :-1]
    if next_starts_patch is not None:
        last[:, -1] = next_starts_patch
    return patch_ids - 1 + last.long()


@dataclass
class BLTMasks:
    enc_self: object
    enc_cross: object
    patch_self: object
    dec_cross: object
    dec_self: object


def _window_ok(diff, window):
    """diff = query index - key index (>= 0 already required)."""
    return diff < window if window is not None else torch.ones_like(diff, dtype=torch.bool)


def causal_mask(T: int, window: int | None, backend: str, device, kv_len: int | None = None):
    """Causal (sliding-window) self-attention over T positions."""
    if backend == "flex":

        def mod(b, h, q, kv):
            return (kv <= q) & _window_ok(q - kv, window)

        return create_block_mask(mod, None, None, T, T, device=device)
    q = torch.arange(T, device=device)[:, None]
    kv = torch.arange(T, device=device)[None, :]
    return ((kv <= q) & _window_ok(q - kv, window))[None, None]


def build_masks(
    patch_ids: torch.Tensor,
    dec_ids: torch.Tensor,
    num_patches: int,
    k: int,
    enc_window: int | None,
    dec_window: int | None,
    patch_window: int | None,
    enc_cross_window: int | None,
    dec_cross_window: int | None,
    backend: str,
) -> BLTMasks:
    """All masks of one BLT forward. patch_ids/dec_ids: (B,T); backend 'dense' or 'flex'."""
    B, T = patch_ids.shape
    device = patch_ids.device
    ew = enc_cross_window or 1
    dw = dec_cross_window or 1
    enc_self = causal_mask(T, enc_window, backend, device)
    dec_self = enc_self if dec_window == enc_window else causal_mask(T, dec_window, backend, device)
    patch_self = causal_mask(num_patches, patch_window, backend, device)
    if backend == "flex":

        def enc_mod(b, h, q, kv):
            d = q // k - patch_ids[b, kv]
            return (d >= 0) & (d < ew)

        def dec_mod(b, h, q, kv):
            d = dec_ids[b, q] - kv // k
            return (d >= 0) & (d < dw)

        enc = create_block_mask(enc_mod, B, None, num_patches * k, T, device=device)
        dec = create_block_mask(dec_mod, B, None, T, num_patches * k, device=device)
    else:
        qp = torch.arange(num_patches * k, device=device) // k  # (P·k,)
        d = qp[None, :, None] - patch_ids[:, None, :]  # (B, P·k, T)
        enc = ((d >= 0) & (d < ew))[:, None]
        d = dec_ids[:, :, None] - qp[None, None, :]  # (B, T, P·k)
        dec = ((d >= 0) & (d < dw))[:, None]
    return BLTMasks(enc_self, enc, patch_self, dec, dec_self)


def default_backend(device) -> str:
    """FlexAttention on CUDA, dense SDPA masks elsewhere."""
    return "flex" if torch.device(device).type == "cuda" else "dense"
