"""Key/value caches of the generation engine's transformer stacks, for rows at their own positions.

Not in the paper (BLT_LLM.md §14, incremental generation). Layout (preallocated, batch-first,
per-row positions):
  * entropy model / encoder / decoder self-attention: rings of exactly `window` slots per
    layer, slot = position % window, with each slot's position stored; memory is bounded
    by the window however long the text gets (window None: one slot per position).
  * global transformer: one slot per patch, slot = patch index (grown only when needed:
    KVCache.ensure; a ring of `window` slots if global_model.window is set).

Every slot records the position it holds, so the attention masks are built per row from
those positions (no padding anywhere: rows of different lengths never see each other's
slots or positions). A prompt's prefill (blt/prefill.py) attends through one Context per
layer, block by block; KVCache.fill then takes over what they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys/values of one transformer stack for B rows at per-row positions.

    window w: a ring of w slots (slot = position % w); window None: slot = position, with
    `ensure` growing the capacity. `pos` holds each slot's position (-1: empty), from which
    the per-row attention masks are built, so rows never need aligned positions. A layer keeps
    its keys and values in one (B, 2·Hkv, S, Dh) tensor (keys first): a step stores both with
    one indexed write.
    """

    def __init__(self, n_layers, B, n_kv, head_dim, window, capacity, device, dtype):
        self.window, self.n_kv = window, n_kv
        cap = window if window is not None else capacity
        self.kv = [torch.zeros(B, 2 * n_kv, cap, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = torch.full((B, cap), -1, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    def ensure(self, needed: int) -> bool:
        """Room for slot index needed-1 (full caches only; rings never grow). True if it grew."""
        if self.window is not None or needed <= self.capacity:
            return False
        # grow by a quarter (at least 256 slots): old and new together hold 2.25x while copying,
        # where doubling would hold 3x (a long prompt's global cache is large)
        extra = max(needed, self.capacity + max(self.capacity // 4, 256)) - self.capacity
        self.kv = [F.pad(t, (0, 0, 0, extra)) for t in self.kv]
        self.pos = F.pad(self.pos, (0, extra), value=-1)
        return True

    def slot(self, pos):
        return pos % self.capacity if self.window is not None else pos

    def begin(self, pos, rows, top=None):
        """Claim the slot of position pos (B,) for every row -> (at, mask, n): `kv[layer][at] =
        (B, 2·Hkv, Dh)` stores this position's keys and values; attention reads the first n
        slots, mask (B,1,1,n) saying which (None: all of them).

        top: max(pos), known on the host; None under CUDA graphs (fixed shapes: n = capacity).
        A row's slots fill in position order and a ring wraps only once full, so no slot past
        top holds anything yet: n = top+1 (at most the capacity). With one row those n slots
        are then exactly its visible keys (no mask), and its slot is a plain index."""
        if top is not None and pos.shape[0] == 1:
            slot = self.slot(top)
            self.pos[:, slot] = pos
            return (slice(None), slice(None), slot), None, min(self.capacity, top + 1)
        slot = self.slot(pos)
        self.pos[rows, slot] = pos
        n = self.capacity if top is None else min(self.capacity, top + 1)
        p = self.pos[:, :n]
        vis = (p >= 0) & (p <= pos[:, None])
        if self.window is not None:
            vis &= (pos[:, None] - p) < self.window
        return (rows, slice(None), slot), vis[:, None, None, :], n

    def contexts(self, row: int) -> list:
        """One Context per layer to prefill row `row` through; without a window they write
        their keys/values straight into this cache's slots (slot = position)."""
        return [Context(self.window, kv[row] if self.window is None else None) for kv in self.kv]

    def fill(self, row: int, contexts: list, n: int) -> None:
        """Take over what `contexts` (one per layer) hold after prefilling positions 0..n-1 of
        row `row`: a ring keeps the last `window` positions."""
        if self.window is not None:
            m = contexts[0].n  # they hold positions n-m..n-1
            keep = min(m, self.capacity)
            p = torch.arange(n - keep, n, device=self.pos.device)
            s = self.slot(p)
            for kv, c in zip(self.kv, contexts):
                k, v = c.held()
                kv[row, : self.n_kv, s] = k[:, m - keep :].to(kv.dtype)
                kv[row, self.n_kv :, s] = v[:, m - keep :].to(kv.dtype)
            self.pos[row, s] = p
        else:
            self.ensure(n)
            p = torch.arange(n, device=self.pos.device)
            for kv, c in zip(self.kv, contexts):
                if c.store is None or c.store.data_ptr() != kv[row].data_ptr():  # not written in place
                    k, v = c.held()
                    kv[row, : self.n_kv, :n] = k.to(kv.dtype)
                    kv[row, self.n_kv :, :n] = v.to(kv.dtype)
            self.pos[row, :n] = p

    def select(self, idx) -> None:
        self.kv = [t.index_select(0, idx) for t in self.kv]
        self.pos = self.pos.index_select(0, idx)


class Context:
    """A SelfAttention cache callable for prefilling in blocks: it puts the keys/values of the
    positions before the block that the block may attend in front of the block's own, and
    keeps the last `window` positions of both for the next block. Without a window it keeps
    every position, in `store` (2·Hkv, capacity, Dh), keys first, as a KVCache row lays them
    out (KVCache.contexts gives its own row: written in place), or in one it allocates for
    `total` positions."""

    def __init__(self, window: int | None, store: torch.Tensor | None = None, total: int = 0):
        self.window, self.store, self.total = window, store, total
        self.k = self.v = None
        self.n = 0  # positions held

    def __call__(self, k, v):
        """k, v (1, Hkv, m, Dh) of the block's m positions -> every key/value they may attend."""
        m, h = k.shape[2], k.shape[1]
        if self.window is None:
            if self.store is None:
                self.store = k.new_empty(2 * h, self.total, k.shape[3])
            self.store[:h, self.n : self.n + m] = k[0]
            self.store[h:, self.n : self.n + m] = v[0]
            self.n += m
            return self.store[None, :h, : self.n], self.store[None, h:, : self.n]
        if self.n:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.n = min(self.window, k.shape[2])
        self.k, self.v = k[:, :, -self.n :], v[:, :, -self.n :]
        return k, v

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hkv, n, Dh) keys and values of the last n positions seen."""
        if self.window is None:
            h = self.store.shape[0] // 2
            return self.store[:h, : self.n], self.store[h:, : self.n]
        return self.k[0], self.v[0]
