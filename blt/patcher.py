"""Patching (paper §2): group bytes into patches; pure functions, vectorised over the batch.

Pipeline: tokens (+ entropies from the caller's frozen entropy model) -> `patch_starts`,
a (B, T+1) boolean "byte p opens a patch" -> `Patching` (patch lengths, and whether the
byte after the window would open a patch, which the decoder's causal mask needs; see
masks.py). Position T is the next, not yet seen byte: every rule decides "p opens a patch"
from bytes < p only, so it can be decided for p = T too.

Rows are patched independently (the official patcher flattens a batch into one sequence,
so rows change each other's entropies). Positions 0 (BOS) and 1 always open patches, so
BOS is a patch of its own, as in the official code.

Document masking (doc_mask, BLT_LLM.md §8.1): a document ends with its EOS, and each document
is patched as a row is: its first two bytes (after an EOS: normally BOS and the first byte of
text) open patches, static patching counts from its first byte, and the entropies come from
the entropy model run within documents. So no patch spans two documents, and a document is cut
as it would be alone. Both depend on byte p-1 and p-2 being EOS: bytes < p, as every rule.

Rules, with H[q] = entropy of the prediction made at q (that is, of byte q+1):
    entropy    p opens a patch iff H[p-1] > θ                         (global, eq. 2)
    monotonic  iff H[p-1] - H[p-2] > θ                                (eq. 3)
    combined   iff H[p-1] > θ and H[p-1] - H[p-2] > θ_add             (official "global and monotonic")
    static     every patch_size bytes after BOS
    space      iff byte p-1 is space-like and byte p-2 is not: the first space-like byte after a
               word closes it (the official rule; it counts UTF-8 lead bytes as space-like,
               we count all bytes >= 0x80 as word bytes so multi-byte letters stay whole)
    byte       every byte
`max_patch_length` then splits any longer patch into pieces of that length from its start.
"""

from dataclasses import dataclass

import torch

from blt.config import PatcherConfig
from blt.tokens import EOS_ID, OFFSET


@dataclass
class Patching:
    patch_lengths: torch.Tensor  # (B,P) long, zero-padded on the right; each row sums to T
    next_starts_patch: torch.Tensor  # (B,) bool: would byte T open a new patch?
    entropies: torch.Tensor | None = None  # (B,T) float, entropy-based modes only

    def mean_patch_length(self) -> torch.Tensor:
        """Mean bytes per (non-empty) patch, as a 0-dim device tensor (no host sync)."""
        return self.patch_lengths.sum() / (self.patch_lengths > 0).sum().clamp(min=1)

    @property
    def bytes_per_patch(self) -> float:
        return self.mean_patch_length().item()

    def padded(self, multiple: int) -> "Patching":
        """The same patches with the patch axis zero-padded to a multiple of `multiple`, so
        that the model sees a few shapes instead of one per batch (a compiled model, or one
        CUDA graph per shape). Empty patches change nothing: they come after every real patch
        of their row, the global model is causal, and no byte reads them."""
        P = self.patch_lengths.shape[1]
        extra = -P % multiple
        lengths = torch.nn.functional.pad(self.patch_lengths, (0, extra)) if extra else self.patch_lengths
        return Patching(lengths, self.next_starts_patch, self.entropies)


def _is_word_byte(tokens: torch.Tensor) -> torch.Tensor:
    b = tokens - OFFSET
    alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    return alnum | (b >= 128)  # non-ASCII bytes belong to words (letters of other scripts)


def _document_opens(tokens: torch.Tensor) -> torch.Tensor:
    """(B,T) -> (B,T+1) bool: byte p opens a document (p = 0, or byte p-1 is EOS)."""
    opens = torch.ones(tokens.shape[0], tokens.shape[1] + 1, dtype=torch.bool, device=tokens.device)
    opens[:, 1:] = tokens == EOS_ID
    return opens


def patch_starts(
    tokens: torch.Tensor, cfg: PatcherConfig, entropies: torch.Tensor | None = None, doc_mask: bool = False
) -> torch.Tensor:
    """(B,T) tokens -> (B,T+1) bool, True where byte p opens a patch (p = T: the next byte).
    doc_mask: each document is patched as a row (entropies, if any, computed within documents)."""
    B, T = tokens.shape
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=tokens.device)
    p = torch.arange(T + 1, device=tokens.device)
    opens = _document_opens(tokens) if doc_mask else None
    if cfg.mode == "byte":
        starts[:] = True
    elif cfg.mode == "static":
        first = torch.where(opens, p, 0).cummax(1).values if doc_mask else torch.zeros_like(p)[None]
        starts[:] = (p - first - 1) % cfg.patch_size == 0
    elif cfg.mode == "space":
        space = ~_is_word_byte(tokens)
        starts[:, 2:] = space[:, 1:] & ~space[:, :-1]
    else:
        if entropies is None:
            raise ValueError(f"patching mode {cfg.mode!r} needs entropies from the entropy model")
        H = entropies.float()
        dH = torch.zeros_like(H)
        dH[:, 1:] = H[:, 1:] - H[:, :-1]
        if cfg.mode == "entropy":
            starts[:, 1:] = H > cfg.threshold
        elif cfg.mode == "monotonic":
            starts[:, 2:] = dH[:, 1:] > cfg.threshold
        else:  # combined
            starts[:, 2:] = (H[:, 1:] > cfg.threshold) & (dH[:, 1:] > cfg.threshold_add)
    starts[:, : min(2, T + 1)] = True
    if doc_mask:  # a document's first two bytes, as a row's
        starts |= opens
        starts[:, 1:] |= opens[:, :-1]
    if cfg.max_patch_length is not None:
        starts |= _forced_splits(starts, cfg.max_patch_length)
    return starts


def _forced_splits(starts: torch.Tensor, max_len: int) -> torch.Tensor:
    """Extra starts every max_len bytes inside each patch, counted from the patch's start."""
    p = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    patch_start = torch.where(starts, p, torch.zeros_like(p)).cummax(dim=1).values
    return (p - patch_start) % max_len == 0


def lengths_from_starts(starts: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
    """(B,T) bool starts (column 0 True) -> (B,P) patch lengths, zero-padded on the right.
    P is the largest row's patch count: read from the device (a host sync) unless given."""
    ids = starts.long().cumsum(1) - 1  # (B,T) patch id of each byte, non-decreasing along a row
    P = int(ids[:, -1].max().item()) + 1 if num_patches is None else num_patches
    # bytes with id <= p, by binary search in each sorted row (a scatter-add of ones would
    # contend on every patch's counter), then the differences: each patch's own byte count
    patch = torch.arange(P, device=starts.device).expand(starts.shape[0], P).contiguous()
    ends = torch.searchsorted(ids, patch, right=True)
    return ends.diff(dim=1, prepend=torch.zeros_like(ends[:, :1]))


def model_patch_starts(tokens: torch.Tensor, cfg: PatcherConfig, entropy_model=None, doc_mask: bool = False):
    """(B,T) -> ((B,T+1) starts, entropies or None). Entropy-based modes run `entropy_model`
    (frozen, no grad) on the window, within documents with doc_mask. All on the device, no host
    sync (one compiled graph in train --one-graph)."""
    entropies = None
    if cfg.needs_entropy:
        if entropy_model is None:
            raise ValueError(f"patching mode {cfg.mode!r} needs an entropy model")
        entropies = entropy_model.entropies(tokens, doc_mask)
    return patch_starts(tokens, cfg, entropies, doc_mask), entropies


def patching_from_starts(starts: torch.Tensor, entropies: torch.Tensor | None = None, num_patches: int | None = None) -> Patching:
    """(B,T+1) starts -> Patching. Reads the patch count from the device (one host sync) unless
    num_patches, the largest row's count (starts[:, :T].sum(1).max()), is given."""
    T = starts.shape[1] - 1
    return Patching(lengths_from_starts(starts[:, :T], num_patches), starts[:, T], entropies)


class StartsPatching(Patching):
    """patching_from_starts(starts, num_patches=num_patches), its lengths computed only when
    first read: for a caller that hands the starts themselves to a compiled graph (train's
    --one-graph, whose loss graph computes the lengths inside) and reads the patches at most for
    their mean length. That mean comes from the starts: every row's patches cover its T bytes
    (patch_starts opens a patch at byte 0), so it is B·T over the number of patches."""

    def __init__(self, starts: torch.Tensor, num_patches: int):
        self.starts, self.num_patches, self.entropies = starts, num_patches, None
        self._lengths = None

    @property
    def patch_lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = lengths_from_starts(self.starts[:, :-1], self.num_patches)
        return self._lengths

    @property
    def next_starts_patch(self) -> torch.Tensor:
        return self.starts[:, -1]

    def mean_patch_length(self) -> torch.Tensor:
        B, T = self.starts.shape[0], self.starts.shape[1] - 1
        covered = torch.full((), B * T, dtype=torch.long, device=self.starts.device)
        return covered / self.starts[:, :T].sum().clamp(min=1)


def patch(tokens: torch.Tensor, cfg: PatcherConfig, entropy_model=None, doc_mask: bool = False) -> Patching:
    """Patch a batch. Entropy-based modes run `entropy_model` (frozen, no grad) on the window.
    doc_mask: each document as a row (see the module docstring)."""
    return patching_from_starts(*model_patch_starts(tokens, cfg, entropy_model, doc_mask))


def mean_bytes_per_patch(
    entropies: torch.Tensor, tokens: torch.Tensor, cfg: PatcherConfig, doc_mask: bool = False
) -> float:
    starts = patch_starts(tokens, cfg, entropies, doc_mask)[:, : tokens.shape[1]]
    return tokens.numel() / starts.sum().item()


def calibrate_threshold(
    entropies: torch.Tensor, tokens: torch.Tensor, cfg: PatcherConfig, target: float, iters: int = 60,
    doc_mask: bool = False,
) -> tuple[float, float]:
    """Bisect θ so the mean patch size on (tokens, entropies) is closest to `target` bytes;
    doc_mask: patched as a BLT with document masking patches (entropies read within documents).

    Patch size grows monotonically with θ for the entropy-based rules. Returns (θ, achieved).
    """
    if not cfg.needs_entropy:
        raise ValueError("only entropy-based modes have a threshold to calibrate")
    H = entropies.float()
    lo, hi = float(H.min()) - 1.0, float(H.max()) + 1.0
    if cfg.mode == "monotonic":  # combined thresholds H itself, like entropy
        span = float((H[:, 1:] - H[:, :-1]).abs().max()) if H.shape[1] > 1 else 1.0
        lo, hi = -span - 1.0, span + 1.0

    def size(theta):
        trial = PatcherConfig(**{**cfg.__dict__, "threshold": theta})
        return mean_bytes_per_patch(H, tokens, trial, doc_mask)

    best = (lo, size(lo))
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = size(mid)
        if abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        lo, hi = (mid, hi) if s < target else (lo, mid)
    return best
