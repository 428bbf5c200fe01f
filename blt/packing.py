"""The global transformer's rows packed end to end: a way to run it, not a change to the model.

Rows of a batch hold different numbers of patches. In the (B, P) layout every row is padded
to the longest one (and `--one-graph` pads P further, to a few recurring shapes), so the
global transformer, which does most of the model's arithmetic, also runs on the padding.
Packed, each row's patches sit one after the other in a single sequence of N slots (N at
least their total; the slots past it are padding), and each row is its own document: a patch
attends causally only within its row (masks.packed_patch_mask), at its own position in the
row. The outputs are those of the (B, P) layout, without the padding's work:

    (B, P) layout                    packed (N = 8)
    row 0: a0 a1 a2  .  .            a0 a1 a2 b0 b1 b2 b3 -
    row 1: b0 b1 b2 b3  .            doc  0  0  0  1  1  1  1  2     (2 = padding)
                                     pos  0  1  2  0  1  2  3  0

A row's patches end at its last non-empty patch; an empty patch before it keeps its slot,
so that every patch keeps its position.

With `align` > 1 each row's segment is padded to a multiple of `align` slots, so every row
starts on a multiple of it. Aligned to FlexAttention's block size, no block of the mask spans
two rows: the blocks a row may read are listed, and inside them plain causality is the whole
mask, so the attention kernels need not look up any slot's row (masks.packed_patch_mask).

With document masking (pdocs given), a patch attends only within its own document of its row:
each (row, document) is a segment of its own, found by a lookup of each slot's segment, as the
documents do not start on block boundaries; FlashAttention-4's kernels, which would need their
bounds, are not used then (masks.document_causal_mask says why).

Replaces: the global transformer on rows padded to the longest (model.BLT.forward's plain
path). Equal to it: test_core.py: test_packed_global_transformer_matches_padded,
test_packed_patch_mask; test_train.py: test_packed_training_matches_padded.
"""

from dataclasses import dataclass

import torch

from blt import masks as M


@dataclass
class PatchPacking:
    doc: torch.Tensor  # (N,) row of each slot's segment; B for the padding slots at the end
    pos: torch.Tensor  # (N,) index of each slot's patch within its row (0 for padding)
    src: torch.Tensor  # (N,) index of each slot's patch in the flattened (B·P) layout
    first: torch.Tensor  # (N,) first slot of each slot's row (of the end padding: its first slot)
    dest: torch.Tensor  # (B, P) slot of each patch of the (B, P) layout
    kept: torch.Tensor  # (B, P) bool: the patch has a slot (it is not trailing padding)
    valid: torch.Tensor  # (N,) bool: the slot holds a patch (not a row's or the end's padding)
    bounds: torch.Tensor  # (B+2,) int32: 0, where each row's segment ends, N (the end padding last)


def row_patch_counts(patch_lengths: torch.Tensor) -> torch.Tensor:
    """(B, P) -> (B,) patches per row, up to its last non-empty one."""
    j = torch.arange(patch_lengths.shape[1], device=patch_lengths.device)
    return ((patch_lengths > 0) * (j + 1)).amax(1)


def aligned_slot_count(counts: torch.Tensor, align: int = 1) -> torch.Tensor:
    """(B,) patches per row -> the slots their segments take, each padded to a multiple of align."""
    return (-(-counts // align) * align).sum()


def packed_patch_count(patch_lengths: torch.Tensor, align: int = 1) -> int:
    """The fewest slots packing_plan takes with this alignment (reads the device)."""
    return int(aligned_slot_count(row_patch_counts(patch_lengths), align))


@torch.library.custom_op("blt::slot_rows", mutates_args=())
def slot_rows(ends: torch.Tensor, slots: int) -> torch.Tensor:
    """(B,) cumulative row ends -> (slots,) int32 row of each slot (B past the last row).

    A library op rather than an inline torch.searchsorted so that a compiler keeps its result as
    a buffer: the packed mask's mask_mod reads it, and torch 2.11's inductor otherwise inlines a
    computed capture into the attention kernel, which FlashAttention-4's kernels (CuTe DSL)
    cannot express."""
    slot = torch.arange(slots, device=ends.device)
    return torch.searchsorted(ends, slot, right=True).int()


@slot_rows.register_fake
def _(ends: torch.Tensor, slots: int) -> torch.Tensor:
    return ends.new_empty(slots, dtype=torch.int32)


def packing_plan(patch_lengths: torch.Tensor, slots: int, align: int = 1) -> PatchPacking:
    """(B, P) patch lengths -> where each row's patches go in a sequence of `slots` slots, each
    row's segment padded to a multiple of `align`. `slots` must be at least
    packed_patch_count(patch_lengths, align)."""
    B, P = patch_lengths.shape
    device = patch_lengths.device
    j = torch.arange(P, device=device)
    n = row_patch_counts(patch_lengths)
    segment = -(-n // align) * align
    ends = segment.cumsum(0)
    starts = ends - segment
    slot = torch.arange(slots, device=device)
    doc = slot_rows(ends, slots)  # rows whose segment ends at or before the slot
    row = doc.long().clamp(max=B - 1)
    in_row = doc < B
    pos = slot - starts[row]
    valid = in_row & (pos < n[row])
    pos = torch.where(valid, pos, 0)
    first = torch.where(in_row, starts[row], ends[-1])
    kept = j[None] < n[:, None]
    dest = (starts[:, None] + j[None]).clamp(max=slots - 1)
    bounds = torch.cat([ends.new_zeros(1), ends, ends.new_full((1,), slots)]).int()
    return PatchPacking(doc, pos, torch.where(valid, row * P + pos, 0), first, dest, kept, valid, bounds)


def pack(x: torch.Tensor, plan: PatchPacking) -> torch.Tensor:
    """(B, P, D) -> (1, N, D): each patch in its slot, zeros in the padding slots."""
    flat = x.reshape(-1, x.shape[-1])[plan.src]
    return torch.where(plan.valid[:, None], flat, 0).unsqueeze(0)


def unpack(y: torch.Tensor, plan: PatchPacking) -> torch.Tensor:
    """(1, N, D) -> (B, P, D): each patch's output back in its row, zeros for trailing padding."""
    return torch.where(plan.kept[..., None], y[0][plan.dest], 0)


def document_segments(plan: PatchPacking, pdocs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) document of each patch -> (N,) segment of each slot, one per (row, document), and
    (N,) its first slot. Padding slots form segments of their own."""
    P = pdocs.shape[1]
    row = plan.doc.long() * (P + 1)
    segment = torch.where(plan.valid, row + pdocs.reshape(-1)[plan.src], row + P)
    return segment, M.document_starts(segment[None])[0]


def run_packed(global_model, patches: torch.Tensor, patch_lengths: torch.Tensor, slots: int, backend: str,
               align: int = 1, pdocs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The global transformer on the rows' patches (B, P, D) packed into `slots` slots, each row
    aligned to `align` -> (B, P, D_global): what it gives on the padded (B, P) layout, without
    computing the padding. Each patch keeps its rotary position within its row. pdocs: (B, P)
    document of each patch (masks.patch_documents), for document masking."""
    plan = packing_plan(patch_lengths, slots, align)
    window = global_model.cfg.window
    if pdocs is None:
        aligned = align == M.BLOCK
        mask = M.packed_patch_mask(plan.doc, plan.first, window, backend, aligned=aligned, bounds=plan.bounds)
    else:
        mask = M.packed_patch_mask(*document_segments(plan, pdocs), window, backend)
    cos, sin = global_model.rope.table(patches.shape[1])
    return unpack(global_model(pack(patches, plan), mask, rope=(cos[plan.pos], sin[plan.pos])), plan)
