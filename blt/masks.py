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
`next_starts_patch=None` treats the window's last patch as complete. The official code and
the HF port, given lengths that sum to T, never show the last patch to any byte
(`next_starts_patch=False`); their entropy patcher appends a zero-length patch when byte T
would open one, which amounts to our `next_starts_patch=True`.

Five masks (True = may attend):
    enc_self, dec_self (T, T)  causal, sliding window over bytes (encoder, decoder)
    enc_cross  (P·k, T)    patch query j sees the bytes of patch j (or of j-w+1..j)
    patch_self (P, P)      causal over patches (global transformer)
    dec_cross  (T, P·k)    byte t sees patch dec_id[t] (or dec_id[t]-w+1..dec_id[t])

Two backends with identical semantics: dense boolean tensors for SDPA (CPU, reference), and
"flex" (CUDA; no T×T tensor is materialised): FlexAttention BlockMasks for the three
self-attentions, and for the two cross-attentions, where a byte meets only k·w patch slots,
the short lists of CrossLists.
"""

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import create_block_mask

_causal_cache: dict = {}  # (T, window, device) -> BlockMask; these depend on shapes only


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


def _causal_mod(window):
    def mod(b, h, q, kv):
        return (kv <= q) & _window_ok(q - kv, window)

    return mod


def causal_mask(T: int, window: int | None, backend: str, device, kv_len: int | None = None):
    """Causal (sliding-window) self-attention over T positions."""
    if backend == "flex":
        key = (T, window, str(device))
        if torch.compiler.is_compiling():
            # Traced into a compiled graph (train --one-graph): its output must not be cached,
            # a CUDA graph's next replay would overwrite it.
            return create_block_mask(_causal_mod(window), None, None, T, T, device=device)
        if key not in _causal_cache:
            if len(_causal_cache) > 256:
                _causal_cache.clear()
            _causal_cache[key] = create_block_mask(_causal_mod(window), None, None, T, T, device=device)
        return _causal_cache[key]
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

        enc, dec = cross_lists(patch_ids, dec_ids, num_patches, k, ew, dw)
    else:
        qp = torch.arange(num_patches * k, device=device) // k  # (P·k,)
        d = qp[None, :, None] - patch_ids[:, None, :]  # (B, P·k, T)
        enc = ((d >= 0) & (d < ew))[:, None]
        d = dec_ids[:, :, None] - qp[None, None, :]  # (B, T, P·k)
        dec = ((d >= 0) & (d < dw))[:, None]
    return BLTMasks(enc_self, enc, patch_self, dec, dec_self)


@dataclass
class CrossLists:
    """A cross-attention mask stored as short lists instead of a Q×K grid.

    Every byte meets only a few patch slots: the decoder's byte t reads the k slots of each of
    its dw latest complete patches, and the encoder's byte t is read by the k query slots of
    each of the ew patches from its own on. So each byte lists its n = k·w partners:
    index (B,T,n) holds their positions on the patch side and valid (B,T,n) whether each is
    real (a partner before patch 0 or past the last one is listed, clamped, and not valid).
    byte_queries: True when the bytes are the queries (decoder), False when they are the keys
    (encoder). layers.attend computes these attentions with gathers and scatters: linear in T,
    with no block of mostly-masked keys to pay for, as a 128×128 FlexAttention tile would.
    """

    index: torch.Tensor
    valid: torch.Tensor
    byte_queries: bool
    num_slots: int  # P·k, the size of the patch side

    def dense(self) -> torch.Tensor:
        """The same mask as a (B,1,Q,K) boolean tensor (what the dense backend builds)."""
        B, T, _ = self.index.shape
        grid = torch.zeros(B, T, self.num_slots, dtype=torch.long, device=self.index.device)
        grid = grid.scatter_reduce(2, self.index, self.valid.long(), reduce="amax").bool()
        return (grid if self.byte_queries else grid.transpose(1, 2))[:, None]


def cross_lists(patch_ids: torch.Tensor, dec_ids: torch.Tensor, P: int, k: int, ew: int, dw: int):
    """The encoder and decoder cross-attention masks as CrossLists (see build_masks)."""
    dev = patch_ids.device
    slot = torch.arange(k, device=dev)

    def lists(patches, valid):  # (B,T,w) patch indices -> (B,T,w·k) slot indices
        index = (patches.clamp(0, P - 1)[..., None] * k + slot).flatten(2)
        return index, valid[..., None].expand(*valid.shape, k).flatten(2)

    enc_patches = patch_ids[..., None] + torch.arange(ew, device=dev)  # patches that read byte t
    dec_patches = dec_ids[..., None] - torch.arange(dw, device=dev)  # patches byte t reads
    enc = CrossLists(*lists(enc_patches, enc_patches < P), byte_queries=False, num_slots=P * k)
    dec = CrossLists(*lists(dec_patches, dec_patches >= 0), byte_queries=True, num_slots=P * k)
    return enc, dec


def default_backend(device) -> str:
    """FlexAttention on CUDA, dense SDPA masks elsewhere."""
    return "flex" if torch.device(device).type == "cuda" else "dense"
