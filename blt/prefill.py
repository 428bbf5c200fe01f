"""A prompt's prefill: its bytes through the model's own modules in blocks, into the engine's caches.

Not in the paper (BLT_LLM.md §14, "Prompts of any length"). There is no length limit: the
prompt is prefilled in blocks of PREFILL_CHUNK bytes, each attending to what the caches keep
of the blocks before it, so memory grows linearly with the prompt (no attention compares
more than PREFILL_PAIRS query-key pairs at once) and so does time, but for the global
model's attention over every patch.

A row is patched first (patch_prompt: the entropy model in blocks, then patcher.patch_starts
over the whole prompt), the engine sizes its caches from the patch counts (Patched), then
the row's bytes run through the encoder, global model and decoder in blocks (RowPrefill),
written straight into the caches. Rows are prefilled one at a time with the model's own
full-forward pieces, so a row's numbers never depend on the batch. After it the entropy
model and the local models see only their sliding windows (bounded memory) and the global
model sees every patch so far (its cache grows by one slot per patch, as BLT.forward's
global context would).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from blt import masks as M
from blt.entropy_model import entropy
from blt.kv_cache import Context
from blt.layers import project
from blt.patcher import lengths_from_starts, patch_starts
from blt.step_layers import cross_kv

# Prompts are prefilled in blocks of at most this many bytes (and of the patches these
# complete), each block attending to what the caches keep of the blocks before it ...
PREFILL_CHUNK = 2048
# ... and no attention of the prefill compares more query-key pairs than this at once (a block
# shrinks where a stack without a window, e.g. the global model's, has many keys behind it).
PREFILL_PAIRS = 1 << 23


def _block_mask(q0: int, n: int, ctx: int, window: int | None, device) -> torch.Tensor:
    """(1,1,n,ctx+n) bool: queries at positions q0..q0+n-1 over keys at q0-ctx..q0+n-1 (the
    `ctx` positions a Context holds, then the block's own), causal, sliding window."""
    q = torch.arange(q0, q0 + n, device=device)[:, None]
    k = torch.arange(q0 - ctx, q0 + n, device=device)[None, :]
    vis = k <= q
    if window is not None:
        vis &= q - k < window
    return vis[None, None]


def _block_len(ctx: int, want: int) -> int:
    """How many queries a prefill block takes, at most `want`: as many as keep queries x keys
    (the ctx held ones and the block's own) within PREFILL_PAIRS, at least one."""
    n = want
    while n > 1 and n * (ctx + n) > PREFILL_PAIRS:
        n = (n + 1) // 2
    return n


@dataclass
class Patched:
    """A prompt after the prefill's first pass (entropy model, patcher): everything the engine
    needs to size its caches, linear in the prompt's length."""

    ids: torch.Tensor  # (L,) long
    H: torch.Tensor | None  # (L,) entropies (entropy-based patching only)
    ent_ctx: list | None  # the entropy model's Context per layer, after the whole prompt
    patch_ids: torch.Tensor  # (L,) patch of each byte
    dec_ids: torch.Tensor  # (L,) masks.decoder_patch_ids
    bounds: list  # patch j holds bytes bounds[j]..bounds[j+1]-1 (P+1 entries)
    P_complete: int  # complete patches (the last one is complete iff byte L would open a patch)

    @property
    def L(self) -> int:
        return self.ids.shape[0]

    @property
    def cur_len(self) -> int:
        """Bytes of the open patch before position L."""
        return self.L - self.bounds[self.P_complete]

    def recent_starts(self, ew: int) -> list:
        """Start positions of the last ew patches, the open one (starting at L if the last is
        complete) included."""
        return self.bounds[max(0, self.P_complete - ew + 1) : self.P_complete + 1]


def patch_prompt(eng, ids: list[int]) -> Patched:
    """The entropy model over the prompt in blocks of at most PREFILL_CHUNK bytes (each
    block attends to the window the Context keeps of the blocks before), then
    patcher.patch_starts over the whole prompt (linear in its length). eng: the Engine
    (its model, patcher settings and thread choice)."""
    dev = eng.device
    t = torch.tensor(ids, dtype=torch.long, device=dev)
    L = len(ids)
    ent_ctx, H = None, None
    if eng.pc.needs_entropy:
        em = eng.model.entropy_model
        ent_ctx = [Context(em.cfg.window, total=L) for _ in em.layers]
        Hs, s = [], 0
        while s < L:
            e = min(L, s + _block_len(ent_ctx[0].n, PREFILL_CHUNK))
            with eng._timed("entropy", e - s):
                mask = _block_mask(s, e - s, ent_ctx[0].n, em.cfg.window, dev)
                pos = torch.arange(s, e, device=dev)
                Hs.append(entropy(em(t[None, s:e], positions=pos, mask=mask, caches=ent_ctx))[0])
            s = e
        H = torch.cat(Hs)
    starts = patch_starts(t[None], eng.pc, None if H is None else H[None])
    lengths = lengths_from_starts(starts[:, :L])
    patch_ids = M.patch_ids_from_lengths(lengths, L)
    dec_ids = M.decoder_patch_ids(patch_ids, starts[:, L])
    P = lengths.shape[1]
    return Patched(t, H, ent_ctx, patch_ids[0], dec_ids[0], [0] + lengths[0].cumsum(0).tolist(),
                   P if bool(starts[0, L]) else P - 1)  # fmt: skip


class RowPrefill:
    """One row's prompt through the model's own modules (BLT.forward's computation) in blocks
    of at most PREFILL_CHUNK bytes, into the caches of the Engine `eng`.

    Per block of bytes: the encoder; for the patches the block completes, pooling (over the
    encoder states kept from the first byte of the next patch's pooling window on), the global
    model (in blocks of patches) and the decoder's patch keys; then the decoder. Every
    attention sees the keys it sees in one forward over the whole prompt: the byte stacks have
    sliding windows (their Context keeps them), the global model's context holds every
    complete patch (or its window), and a patch is pooled once all its bytes have run. The
    decoder runs only over the last n_layers·(window-1)+1 bytes: nothing the engine keeps
    depends on its states before those."""

    def __init__(self, eng, b: int, r: Patched):
        self.eng, self.b, self.r = eng, b, r
        m, cfg = eng.model, eng.cfg
        self.enc, self.gm, self.dec = m.encoder, m.global_model, m.decoder
        self.enc_ctx, self.glob_ctx, self.dec_ctx = (c.contexts(b) for c in (eng.enc, eng.glob, eng.dec))
        dw = cfg.decoder.window
        self.d0 = 0 if dw is None else max(0, r.L - 1 - len(self.dec.layers) * (dw - 1))  # decoder's first byte
        self.held, self.held_from = [None] * len(eng.enc_cross), 0  # per pooling layer: states of bytes held_from..
        self.keys, self.keys_from = None, 0  # decoder patch keys of patches keys_from.., k rows each
        self.done = 0  # complete patches through the global model

    def run(self) -> torch.Tensor:
        eng, r = self.eng, self.r
        L, s, logits = r.L, 0, None
        while s < L:
            e = min(L, s + _block_len(max(self.enc_ctx[0].n, self.dec_ctx[0].n), PREFILL_CHUNK))
            with eng._timed("block", e - s):
                h = self._encoder(s, e)
                self._patches(min(bisect.bisect_right(r.bounds, e) - 1, r.P_complete))  # complete by byte e
                if e > self.d0:
                    logits = self._decoder(h[:, max(s, self.d0) - s :], max(s, self.d0), e)
                self._drop_unread()
            s = e
        self._fill_caches()
        return logits

    def _encoder(self, s: int, e: int) -> torch.Tensor:
        """Bytes s..e-1 through the encoder -> (1, e-s, D); the pooling layers' states held."""
        enc, dev, t = self.enc, self.eng.device, self.r.ids
        lo = max(0, s - self.eng.nmax + 1)  # the hash n-grams read the ids before the block
        h = enc.embed(t[None, lo:e])[:, s - lo :]
        rope = enc.rope(torch.arange(s, e, device=dev))
        mask = _block_mask(s, e - s, self.enc_ctx[0].n, enc.cfg.window, dev)
        j = 0
        for i, layer in enumerate(enc.layers):
            h = layer(h, rope, mask, self.enc_ctx[i])
            if enc.has_cross_attn(i):
                self.held[j] = h[0] if self.held[j] is None else torch.cat((self.held[j], h[0]))
                j += 1
        return h

    def _patches(self, now: int) -> None:
        """Patches done..now-1 (all their bytes encoded): pooling, the global model, the
        decoder's patch keys; in blocks of patches as many as PREFILL_PAIRS allows."""
        eng, r, dev = self.eng, self.r, self.eng.device
        k, ew, bounds, patch_ids = eng.k, eng.ew, r.bounds, r.patch_ids
        while self.done < now:
            done, g = self.done, _block_len(self.glob_ctx[0].n, now - self.done)
            a, b0, b1 = bounds[max(0, done - ew + 1)], bounds[done], bounds[done + g]
            own = self.held[0][None, b0 - self.held_from : b1 - self.held_from]
            queries = self.enc.init_queries(own, patch_ids[None, b0:b1] - done, g)
            d = (done + torch.arange(g * k, device=dev) // k)[:, None] - patch_ids[None, a:b1]
            mask = ((d >= 0) & (d < ew))[None, None]  # query of patch p: bytes of patches p-ew+1..p
            for j, i in enumerate(eng.enc_cross):
                window = self.held[j][None, a - self.held_from : b1 - self.held_from]
                queries = self.enc.cross_attend(i, queries, window, mask)
            gmask = _block_mask(done, g, self.glob_ctx[0].n, self.gm.cfg.window, dev)
            pos = torch.arange(done, done + g, device=dev)
            new = self.dec.patch_keys(self.gm(queries.view(1, g, -1), gmask, positions=pos, caches=self.glob_ctx))[0]
            self.keys = new if self.keys is None else torch.cat((self.keys, new))
            self.done += g

    def _decoder(self, h: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Bytes s..e-1 (encoder states h) through the decoder -> (V,) logits of byte e-1."""
        eng, dec, dev, dec_ids = self.eng, self.dec, self.eng.device, self.r.dec_ids
        k, dw = eng.k, eng.dw
        first = max(0, int(dec_ids[s]) - dw + 1)  # the first patch a byte of the block reads
        kv = self.keys[(first - self.keys_from) * k :]
        d = dec_ids[s:e, None] - (first + torch.arange(kv.shape[0], device=dev) // k)[None, :]
        cmask = ((d >= 0) & (d < dw))[None, None]  # byte t: patches dec_ids[t]-dw+1..dec_ids[t]
        mask = _block_mask(s, e - s, self.dec_ctx[0].n, dec.cfg.window, dev)
        rope = dec.rope(torch.arange(s, e, device=dev))
        for i, layer in enumerate(dec.layers):
            if dec.has_cross_attn(i):
                h = dec.cross_attend(i, h, kv[None], cmask)
            h = layer(h, rope, mask, self.dec_ctx[i])
        return project(h[:, -1:], dec.norm, dec.output)[0][0, 0]

    def _drop_unread(self) -> None:
        """Keep only what later blocks read: the pooling window of the next patch to complete,
        the decoder keys of the last dw complete patches."""
        cut = self.r.bounds[max(0, self.done - self.eng.ew + 1)]
        self.held = [x[cut - self.held_from :] for x in self.held]
        self.held_from = cut
        cut = max(0, self.done - self.eng.dw)
        self.keys = self.keys[(cut - self.keys_from) * self.eng.k :]
        self.keys_from = cut

    def _fill_caches(self) -> None:
        """Hand the engine's caches what the prefill leaves: the self-attention contexts, the
        encoder patch buffer (the open patch's pooling window), the decoder patch store."""
        eng, b, r, dev = self.eng, self.b, self.r, self.eng.device
        k, dw, L = eng.k, eng.dw, r.L
        if r.ent_ctx is not None:
            eng.ent.fill(b, r.ent_ctx, L)
        eng.enc.fill(b, self.enc_ctx, L)
        eng.dec.fill(b, self.dec_ctx, L)
        eng.glob.fill(b, self.glob_ctx, r.P_complete)
        C = eng.buf_pos.shape[1]
        p = torch.arange(self.held_from, L, device=dev)
        for j, hs in enumerate(self.held):
            eng.buf[j][b, p % C] = hs
        eng.buf_pos[b, p % C] = p
        eng.buf_patch[b, p % C] = r.patch_ids[self.held_from :]
        for c in range(self.keys_from, r.P_complete):  # the last dw complete patches
            sl = slice((c % dw) * k, (c % dw + 1) * k)
            keys = self.keys[None, (c - self.keys_from) * k : (c - self.keys_from + 1) * k]
            for j, ca in enumerate(eng.dec_mods):
                kk, vv = cross_kv(ca, keys)
                eng.store_k[j][b, :, sl] = kk[0]
                eng.store_v[j][b, :, sl] = vv[0]
            eng.store_valid[b, sl] = True
