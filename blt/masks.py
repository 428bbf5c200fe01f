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

Four masks (True = may attend):
    enc_self, dec_self (T, T)  causal, sliding window over bytes (encoder, decoder)
    enc_cross  (P·k, T)    patch query j sees the bytes of patch j (or of j-w+1..j)
    patch_self (P, P)      causal over patches (global transformer)
    dec_cross  (T, P·k)    byte t sees patch dec_id[t] (or dec_id[t]-w+1..dec_id[t])

Document masking (config doc_mask): a window packs documents end to end (BOS, bytes, EOS, BOS,
...), and a document ends with its EOS, as the official code's block-causal masks split them.
`document_ids` numbers them per byte; the self-attentions then also require the same document
(a patch's document is its first byte's: the patcher never lets a patch span two), and so do
the cross-attentions with windows wider than one patch. One-patch cross-attentions need
nothing: a patch lies inside one document, and so does the latest complete patch of a byte
(each document's first byte is a patch of its own).

Two backends with identical semantics: dense boolean tensors for SDPA (CPU, reference) and
FlexAttention BlockMasks (CUDA; no T×T tensor is materialised). With the cross-attention
windows at their default (one patch), the flex backend gives the two cross-attentions as
PatchRuns instead: the byte range of each patch, which blt.patch_runs's kernels walk.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from blt import patch_runs
from blt.tokens import EOS_ID

BLOCK = 128  # FlexAttention's block size
_causal_cache: dict = {}  # (T, window, device) -> BlockMask; these depend on shapes only
_patch_kernels = True
_fa4 = False


def set_fa4(enabled: bool) -> None:
    """Whether the flex backend gives the causal self-attentions as CausalRows, for
    FlashAttention-4's own kernels (blt.fa4; layers.set_flex_backend("fa4") sets it)."""
    global _fa4
    _fa4 = enabled


def uses_fa4() -> bool:
    return _fa4


def set_patch_kernels(enabled: bool) -> None:
    """Whether the flex backend runs the one-patch cross-attentions on blt.patch_runs's
    kernels (the default, where they can run) or on FlexAttention."""
    global _patch_kernels
    _patch_kernels = enabled


@dataclass
class PatchRuns:
    """A cross-attention mask given as runs: for each (row, patch p), the bytes start..end-1.
    queries="patches": patch p's k query slots read those bytes (encoder); "bytes": those
    bytes read patch p's k key slots (decoder). Bytes in no run read nothing."""

    start: torch.Tensor  # (B, P) int32
    end: torch.Tensor  # (B, P) int32
    queries: str


@dataclass
class CausalRows:
    """A causal self-attention given by its shape, for FlashAttention-4's own kernels (blt.fa4):
    each query sees the `window` keys up to itself (None: all), within its sequence: a batch
    row, or with `bounds` ((S+1,) int32 cumulative ends) one of the sequences packed in the
    single row. `flex()` builds the same mask as a BlockMask, for inputs those kernels do not
    take (float32, CPU)."""

    window: int | None
    bounds: torch.Tensor | None
    flex: Callable[[], BlockMask]


def runs(ids: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,T) non-decreasing patch index per byte -> start, end (B,P): where each patch's run
    of bytes starts and ends (end exclusive; start == end for a patch no byte has)."""
    p = torch.arange(num_patches, device=ids.device).expand(ids.shape[0], num_patches).contiguous()
    ids = ids.contiguous()
    return torch.searchsorted(ids, p).int(), torch.searchsorted(ids, p, right=True).int()


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


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(B,T) token ids -> (B,T) document of each byte within its row: the number of EOS before
    it. A document ends with its EOS (the official code's tokens_to_seqlen), so the byte after
    an EOS (normally BOS) opens the next one. It depends on earlier bytes only: whether byte t
    starts a document is known before byte t is read."""
    ends = (tokens == EOS_ID).long()
    return ends.cumsum(1) - ends


def document_starts(docs: torch.Tensor) -> torch.Tensor:
    """(B,N) non-decreasing document (or segment) ids -> (B,N) index of the first position of
    each position's document."""
    n = torch.arange(docs.shape[1], device=docs.device)
    opens = torch.ones_like(docs, dtype=torch.bool)
    opens[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return torch.where(opens, n, 0).cummax(1).values


def patch_documents(docs: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B,T) documents, (B,T) patch ids -> (B,P) document of each patch: its first byte's; an
    empty (padding) patch gets the row's last document, so the ids stay non-decreasing."""
    last = docs[:, -1:].expand(-1, num_patches).contiguous()
    return last.scatter_reduce(1, patch_ids.clamp(0, num_patches - 1), docs, reduce="amin")


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


def causal_mask(T: int, window: int | None, backend: str, device, docs: torch.Tensor | None = None):
    """Causal (sliding-window) self-attention over T positions; with docs ((B,T) document ids),
    also within each position's document."""
    if docs is not None:
        return document_causal_mask(docs, window, backend)
    if backend == "flex" and _fa4:
        return CausalRows(window, None, lambda: _causal_block_mask(T, window, device))
    if backend == "flex":
        return _causal_block_mask(T, window, device)
    q = torch.arange(T, device=device)[:, None]
    kv = torch.arange(T, device=device)[None, :]
    return ((kv <= q) & _window_ok(q - kv, window))[None, None]


def document_causal_mask(docs: torch.Tensor, window: int | None, backend: str):
    """Causal (sliding-window) self-attention within each document: docs (B,N) non-decreasing
    ids -> dense (B,1,N,N) or a BlockMask over (B, N). Never CausalRows: FlashAttention-4's
    kernels (set_fa4) would need each row's documents as variable-length sequences, whose count
    changes with every batch, so document masks run on FlexAttention's kernels."""
    N = docs.shape[1]

    def mod(b, h, q, kv):
        return (kv <= q) & (docs[b, q] == docs[b, kv]) & _window_ok(q - kv, window)

    if backend != "flex":
        n = torch.arange(N, device=docs.device)
        return ((n[None, None, :] <= n[None, :, None]) & (docs[:, :, None] == docs[:, None, :])
                & _window_ok(n[:, None] - n[None, :], window))[:, None]  # fmt: skip
    return block_mask(*_segment_blocks(document_starts(docs), window), mask_mod=mod, seq_lengths=(N, N))


def _causal_block_mask(T: int, window: int | None, device) -> BlockMask:
    if torch.compiler.is_compiling():
        # Traced into a compiled graph (train --one-graph): its output must not be cached,
        # a CUDA graph's next replay would overwrite it.
        return _causal_blocks(T, window, device)
    key = (T, window, str(device))
    if key not in _causal_cache:
        if len(_causal_cache) > 256:
            _causal_cache.clear()
        _causal_cache[key] = _causal_blocks(T, window, device)
    return _causal_cache[key]


def _causal_blocks(T: int, window: int | None, device) -> BlockMask:
    """create_block_mask's causal (sliding-window) BlockMask over T positions, its block lists
    computed from the geometry instead of by evaluating the mask at every pair."""
    zeros = torch.zeros(T, dtype=torch.long, device=device)
    return packed_patch_mask(zeros, zeros, window, "flex", aligned=True)


def packed_patch_mask(
    doc: torch.Tensor, first: torch.Tensor, window: int | None, backend: str, aligned: bool = False,
    bounds: torch.Tensor | None = None,
):  # fmt: skip
    """Causal (sliding-window) self-attention over packed patch slots (blt.packing), within each
    slot's own row only. doc (N,): row of each slot (non-decreasing; with document masking, its
    row's document: packing.document_segments); first (N,): first slot of that row. aligned:
    every row starts on a multiple of BLOCK (packing_plan's align), so no block holds two rows'
    slots and the flex mask lists only blocks inside a row; in a compiled graph its mask_mod is
    then plain causality, with no lookup of any slot's row. bounds: the rows' cumulative slot
    ends (PatchPacking.bounds), for FlashAttention-4's kernels (set_fa4), which then get the
    mask as CausalRows."""
    if backend == "flex" and _fa4 and bounds is not None:
        return CausalRows(window, bounds, lambda: packed_patch_mask(doc, first, window, backend, aligned))
    N = doc.shape[0]

    def mod(b, h, q, kv):
        return (kv <= q) & (doc[q] == doc[kv]) & _window_ok(q - kv, window)

    def causal(b, h, q, kv):
        return (kv <= q) & _window_ok(q - kv, window)

    if backend != "flex":
        q = torch.arange(N, device=doc.device)
        return mod(None, None, q[:, None], q[None, :])[None, None]
    blocks = _segment_blocks(first[None], window)
    # Aligned rows: inside the listed blocks, plain causality is the whole mask. Only a compiled
    # kernel reads the block lists (eager FlexAttention applies mask_mod to every pair), so the
    # mask_mod without the row test is for graphs being compiled only.
    mask_mod = causal if aligned and torch.compiler.is_compiling() else mod
    return block_mask(*blocks, mask_mod=mask_mod, seq_lengths=(N, N))


def _segment_blocks(first: torch.Tensor, window: int | None) -> list[torch.Tensor]:
    """The block lists of causal (sliding-window) attention within segments: first (B,N), the
    first position of each position's segment (a row of packed patches, a document) ->
    kv_num, kv_idx, full_num, full_idx for masks.block_mask, each (B, 1, ...)."""
    N = first.shape[1]
    # Query block [q0, q1] reads keys from its first query's segment start (or window) up to q1.
    # Key blocks wholly before q0, inside q1's segment and within the window of q1 are full:
    # every pair is visible. What stays partial is the range below those, and the diagonal block.
    nb = -(-N // BLOCK)
    i = torch.arange(nb, device=first.device)
    q0, q1 = i * BLOCK, (i * BLOCK + BLOCK - 1).clamp(max=N - 1)
    lo = first[:, q0] if window is None else torch.maximum(first[:, q0], q0 - window + 1)
    lo_b = lo // BLOCK
    full_lo = torch.maximum(-(-first[:, q1] // BLOCK), lo_b)  # first full key block
    if window is not None:
        full_lo = torch.maximum(full_lo, -(-(q1 - window + 1) // BLOCK))
    n_full = (i - full_lo).clamp(min=0)
    part_end = torch.where(n_full > 0, full_lo, i)  # partial: lo_b .. part_end-1, then i
    t = torch.arange(nb, device=first.device)
    below = t < (part_end - lo_b)[..., None]
    part_idx = torch.where(below, lo_b[..., None] + t, i[:, None])
    full_idx = (full_lo[..., None] + t).clamp(max=nb - 1)
    return [x[:, None].int() for x in (part_end - lo_b + 1, part_idx, n_full, full_idx)]  # (B, H=1, ...)


def _dense_to_lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., Q, K) 0/1 block table -> (number of listed blocks (..., Q), block lists (..., Q, K)):
    each row's listed blocks in increasing order, then its unlisted ones. This is what
    FlexAttention gets from a stable descending argsort; a cumulative sum and a scatter give it
    here, because inductor cannot compile a sort inside its combined kernels once a row has more
    than 64 blocks (--one-graph failed so on packed patch masks of 65 blocks)."""
    K = dense.shape[-1]
    col = torch.arange(K, device=dense.device)
    taken = dense.cumsum(-1)
    count = taken[..., -1:]
    position = torch.where(dense > 0, taken - 1, count + col - taken)  # unlisted after the listed
    lists = torch.empty_like(dense).scatter_(-1, position.long(), col.to(dense.dtype).expand_as(dense).contiguous())
    return count[..., 0].int(), lists.int()


def _transpose_lists(num: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists by query block ((..., Q), (..., Q, K)) -> the same blocks listed by key block
    ((..., K), (..., K, Q)), which the backward pass walks."""
    K = idx.shape[-1]
    dense = torch.zeros(*idx.shape[:-1], K + 1, dtype=torch.int32, device=idx.device)
    listed = torch.arange(K, device=idx.device) < num[..., None]
    dense.scatter_(-1, torch.where(listed, idx, K).long(), 1)
    return _dense_to_lists(dense[..., :K].transpose(-2, -1))


def block_mask(kv_num, kv_idx, full_num, full_idx, mask_mod, seq_lengths: tuple[int, int]) -> BlockMask:
    """BlockMask.from_kv_blocks without its sort (see _dense_to_lists): the key-side lists are
    given, the query-side ones derived. kv_idx and full_idx list every key block (width K)."""
    q_num, q_idx = _transpose_lists(kv_num, kv_idx)
    full_q_num, full_q_idx = _transpose_lists(full_num, full_idx)
    return BlockMask(
        seq_lengths=seq_lengths, kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num,
        full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod,
    )  # fmt: skip


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
    docs: torch.Tensor | None = None,
) -> BLTMasks:
    """All masks of one BLT forward. patch_ids/dec_ids: (B,T); backend 'dense' or 'flex';
    docs: (B,T) document_ids for document masking (None: none)."""
    B, T = patch_ids.shape
    device = patch_ids.device
    ew = enc_cross_window or 1
    dw = dec_cross_window or 1
    pdocs = None if docs is None else patch_documents(docs, patch_ids, num_patches)
    enc_self = causal_mask(T, enc_window, backend, device, docs)
    dec_self = enc_self if dec_window == enc_window else causal_mask(T, dec_window, backend, device, docs)
    patch_self = causal_mask(num_patches, patch_window, backend, device, pdocs)
    # Wider cross windows reach earlier patches, which may hold earlier documents.
    cross_docs = pdocs is not None and (ew > 1 or dw > 1)
    if backend == "flex" and ew == 1 and dw == 1 and _patch_kernels and patch_runs.available(device):
        enc = PatchRuns(*runs(patch_ids, num_patches), queries="patches")
        dec = PatchRuns(*runs(dec_ids, num_patches), queries="bytes")
    elif backend == "flex":

        def enc_mod(b, h, q, kv):
            d = q // k - patch_ids[b, kv]
            ok = (d >= 0) & (d < ew)
            return ok & (pdocs[b, q // k] == docs[b, kv]) if cross_docs else ok

        def dec_mod(b, h, q, kv):
            d = dec_ids[b, q] - kv // k
            ok = (d >= 0) & (d < dw)
            return ok & (docs[b, q] == pdocs[b, kv // k]) if cross_docs else ok

        enc, dec = _cross_block_masks(enc_mod, dec_mod, patch_ids, dec_ids, num_patches, k, ew, dw)
    else:
        qp = torch.arange(num_patches * k, device=device) // k  # (P·k,)
        d = qp[None, :, None] - patch_ids[:, None, :]  # (B, P·k, T)
        enc = (d >= 0) & (d < ew)
        d = dec_ids[:, :, None] - qp[None, None, :]  # (B, T, P·k)
        dec = (d >= 0) & (d < dw)
        if cross_docs:
            same = pdocs[:, qp][:, :, None] == docs[:, None, :]  # (B, P·k, T)
            enc, dec = enc & same, dec & same.transpose(1, 2)
        enc, dec = enc[:, None], dec[:, None]
    return BLTMasks(enc_self, enc, patch_self, dec, dec_self)


def _from_ranges(mask_mod, lo: torch.Tensor, hi: torch.Tensor, Q: int, K: int) -> BlockMask:
    """BlockMask whose query block i may touch key positions lo[:, i]..hi[:, i] (inclusive)."""
    nkb = -(-K // BLOCK)
    lo_b, hi_b = lo.clamp(min=0) // BLOCK, hi.clamp(max=K - 1) // BLOCK
    num = torch.where(hi >= lo, hi_b - lo_b + 1, 0).clamp(0, nkb)
    idx = (lo_b[..., None] + torch.arange(nkb, device=lo.device)).clamp(max=nkb - 1)
    num, idx = num[:, None].int(), idx[:, None].int()
    # no key block is fully visible to a whole query block; saying so (zero full blocks) is what
    # FlashAttention-4's kernels need to take a block mask
    return block_mask(num, idx, torch.zeros_like(num), torch.zeros_like(idx), mask_mod, (Q, K))


def _cross_block_masks(enc_mod, dec_mod, patch_ids, dec_ids, P, k, ew, dw):
    """Encoder/decoder cross-attention BlockMasks built straight from patch ranges.

    create_block_mask would evaluate the mask at all B·P·k·T points; patches are contiguous
    byte ranges, so each query block's key range follows from a few gathers instead.
    """
    B, T = patch_ids.shape
    dev = patch_ids.device
    counts = torch.zeros(B, P + 1, dtype=torch.long, device=dev).scatter_add_(
        1, patch_ids.clamp(min=0), torch.ones_like(patch_ids)
    )[:, :P]
    ends = counts.cumsum(1) - 1  # last byte of each patch
    starts = ends - counts + 1
    # encoder: query block rows q0..q1 hold patches q0//k..q1//k, which read bytes of patches p0-ew+1..p1
    q0 = torch.arange(0, P * k, BLOCK, device=dev)
    q1 = (q0 + BLOCK - 1).clamp(max=P * k - 1)
    p0, p1 = (q0 // k - ew + 1).clamp(min=0), q1 // k
    enc = _from_ranges(enc_mod, starts[:, p0], ends[:, p1], P * k, T)
    # decoder: bytes t0..t1 read patch keys of patches dec[t0]-dw+1 .. dec[t1] (dec ids never decrease)
    t0 = torch.arange(0, T, BLOCK, device=dev)
    t1 = (t0 + BLOCK - 1).clamp(max=T - 1)
    lo = (dec_ids[:, t0] - dw + 1).clamp(min=0) * k
    hi = (dec_ids[:, t1] + 1) * k - 1
    dec = _from_ranges(dec_mod, lo, hi, T, P * k)
    return enc, dec


def default_backend(device) -> str:
    """FlexAttention on CUDA, dense SDPA masks elsewhere."""
    return "flex" if torch.device(device).type == "cuda" else "dense"
