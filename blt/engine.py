"""The KV-cached generation engine: a byte at a time per row, the global model once per patch.

Not in the paper (BLT_LLM.md §14): the official code re-runs the entropy model and the whole
BLT over the prefix for every new byte. The engine (`Engine`) produces, byte for byte, what
`generate_uncached` (blt/generate.py) produces that way (logits equal to float noise, ~1e-6),
but per byte it runs only:

  1. the entropy model, one position (KV cache)   -> H_t; with H_{t-1}, the last two bytes,
     the position and the current patch length it decides whether byte t+1 opens a patch,
     with exactly `patcher.patch_starts`' rules for every mode (and max_patch_length);
  2. the local encoder, one position (KV cache; the hash n-grams need the last max(n) ids);
     the byte's state after each pooling layer goes into a small per-row patch buffer;
  3. only when byte t+1 opens a patch (byte t's patch is complete): max-pool the patch's
     bytes, the encoder's cross-attention over them (or over the last `cross_attn_window`
     patches), ONE global-transformer step for that patch (KV cache over patches), and
     `decoder.patch_keys` -> the decoder's cross-attention keys/values (projected once per
     patch, per cross-attention layer, kept for the last `dec cross_attn_window` patches);
  4. the local decoder, one position (KV cache; cross-attention over the latest complete
     patch, as masks.decoder_patch_ids) -> logits for byte t+1.

Each step runs through the one-position helpers of blt/step_layers.py. Besides the caches
of blt/kv_cache.py (preallocated, batch-first, per-row positions) the engine keeps:
  * encoder patch buffer: the byte states of the current patch (plus the previous w-1 with
    an encoder cross_attn_window w), a ring over byte positions that doubles if a patch
    outgrows it (never, with max_patch_length).
  * decoder patch store: k·w_dec projected keys/values per cross-attention layer.

Batching: every row has its own position counter and its own patching, and each cache
slot records the position it holds, so rows of different lengths step together without
padding. Prompts are prefilled one row at a time (blt/prefill.py), then the rows step
together. When some rows complete a patch and others do not, the global step runs for the
whole batch and the other rows' results are dropped (their cache write lands in the slot
their own next patch will overwrite before reading it). Finished rows are dropped from the
batch (keep; compiled: they keep stepping, ignored).

compile=True (CUDA only; ignored elsewhere): the whole byte step -- steps 1-4, with the patch
step of 3 run every byte and its results kept only where a patch completes -- is compiled
with torch.compile(mode="reduce-overhead") into one CUDA graph over static cache tensors
(the compiled function is an nn.Module holding the engine, and every engine tensor is one
of its buffers: see _StepModule). The generation loop then samples inside that graph too
(Engine.start_sampling / launch): the graph reads its own logits and writes the next ones,
so it has no input from the host at all, and the host reads each step's bytes and patch
flags one step late (blt/generate.py's `pipelined`), launching step t+1 before it waits for
step t. The host's counters lag a step, which the capacity checks allow for. The caches'
capacities are rounded up to buckets (`bucket`), so that prompts of other lengths and other
max_new reuse the compiled step instead of compiling one for their own shapes.

Document masking (cfg.doc_mask): nothing before a document reaches it, so a prompt is cut to
its last document (`last_document`) and the engine sees one document, which generation never
leaves (EOS ends a row). The continuation is the full forward's over the whole prompt: only
the rotary positions differ, by a shift that leaves every relative position, and so the
logits to float noise.

On CPU the engine's work runs on the threads its ThreadChoosers pick (blt/cpu_threads.py):
one for the prefill's entropy-model blocks, one for its byte blocks, one for the steps.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import torch
from torch import nn

from blt.cpu_threads import MAX_AUTO_THREADS, ThreadChooser, cores, cpu_threads
from blt.entropy_model import entropy
from blt.kv_cache import KVCache
from blt.patcher import _is_word_byte
from blt.prefill import Patched, RowPrefill, patch_prompt
from blt.sampling import sample_next
from blt.step_layers import Block, Cross, HashStep, Norm, Proj, block_step, cross, cross_kv, rope_step
from blt.tokens import EOS_ID

_STEP_OBJECTS = (KVCache, Norm, Proj, Block, HashStep, Cross)  # hold tensors the step reads

# A compiled step (its dynamo guards, inductor's code, its CUDA graphs) is specific to the
# shapes of the caches it reads, so a compiled engine rounds every capacity that depends on
# the prompt or max_new up to a bucket: the next power of two, at least CAPACITY_FLOOR.
# Prompts and max_new within a bucket then reuse one compiled step (in the process, and from
# inductor's on-disk cache in the next); there are log2 buckets, each at most twice the slots
# needed. Under CUDA graphs a step attends over every slot (masked), so the floor is what the
# local stacks' 512-byte windows cost already; it holds the CLI's usual runs (a short prompt
# and --max-new up to ~500: one slot per byte and patch) in one bucket.
CAPACITY_FLOOR = 512


def bucket(n: int) -> int:
    """The capacity a compiled engine allocates for n slots: max(CAPACITY_FLOOR, next power of 2)."""
    return max(CAPACITY_FLOOR, 1 << (n - 1).bit_length())


def _step_tensors(obj, prefix=""):
    """(name, tensor) for every tensor held by obj's attributes, directly, in lists, or inside the
    step objects (caches and step helpers) it holds, not inside the model's own modules; names
    as "enc__kv_1", "dec_blocks_0__wqkv__w"."""
    for key, value in vars(obj).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            name = f"{prefix}{key}" + (f"_{i}" if values is value else "")
            if isinstance(v, torch.Tensor):
                yield name, v
            elif isinstance(v, _STEP_OBJECTS):
                yield from _step_tensors(v, name + "__")


class _StepModule(nn.Module):
    """What compile=True compiles: an nn.Module whose forward is the engine's fused byte step.

    Every engine tensor (per-row state, caches, step weights) is registered here as a buffer
    (again whenever the engine re-creates one), and the step reaches each through this module
    (self.engine.pos, self.engine.enc.kv[0], self.engine.dec_out.w, ...). Dynamo treats both,
    a module's buffers and any tensor reached through a module, as static inputs: CUDA graphs
    use them in place, and cudagraph trees let a graph update them in place, as gpt-fast's KV
    cache buffers. Compiled as the engine's bound method they were ordinary inputs, static only
    through torch._dynamo.mark_static_address, and with them marked so, torch 2.11 (H200)
    skipped CUDA graphs ("mutated inputs", one per state tensor). The engine stays a plain
    object: its eager step reads plain attributes (an nn.Module's are slower to read, ~2% of a
    tiny-preset step)."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def register(self) -> None:
        """(Re-)register the engine's current tensors as (non-persistent) buffers."""
        self._buffers.clear()
        self._non_persistent_buffers_set.clear()
        for name, t in _step_tensors(self.engine):
            assert name not in self._buffers, name
            self.register_buffer(name, t, persistent=False)

    def forward(self, ids=None):
        return self.engine._step_impl(ids)


def last_document(ids: list[int]) -> list[int]:
    """A prompt's last document (after its last EOS): under document masking, all that the
    continuation reads. A prompt ending with EOS is refused: the next byte would open a document
    without its BOS."""
    if ids[-1] == EOS_ID:
        raise ValueError("with document masking a prompt may not end with EOS (the next byte would open a new "
                         "document without BOS): end it with BOS to start a document")  # fmt: skip
    return ids[max((i + 1 for i, t in enumerate(ids) if t == EOS_ID), default=0) :]


class Engine:
    """Incremental BLT inference for B rows. `prefill()` -> (B,V) logits for each row's next
    byte; `step(ids)` feeds one byte per row and returns the logits for the byte after it."""

    def __init__(self, model, prompts: list[list[int]], max_new: int, compile: bool = False,
                 fuse: bool | None = None, threads: int | None = None):  # fmt: skip
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token id")
        if model.training:
            raise ValueError("Engine needs a model in eval mode (model.eval())")
        self.model = model
        cfg = self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.B = len(prompts)
        self.prompts = [last_document(p) if cfg.doc_mask else list(p) for p in prompts]
        # CPU threads: `threads`, or None: 1 or up to MAX_AUTO_THREADS, chosen while running by
        # timing the work (ThreadChooser), separately for the prefill's entropy-model blocks, its
        # byte blocks and the steps (the caller applies the steps' choice: timed_step).
        # The step helpers split their products for the most threads.
        self.threads = threads or min(cores(), MAX_AUTO_THREADS)
        choices = (threads,) if threads else (1, self.threads)
        blocks = dict(every=2, trial=1, first=1)
        self.choosers = {"entropy": ThreadChooser(choices, **blocks), "block": ThreadChooser(choices, **blocks),
                         "step": ThreadChooser(choices)}  # fmt: skip
        self.max_new = max_new
        pc = self.pc = cfg.patcher
        if pc.needs_entropy and model.entropy_model is None:
            raise ValueError(f"patching mode {pc.mode!r} needs an entropy model")
        enc, dec = model.encoder, model.decoder
        self.k = cfg.cross_attn_k
        self.ew = cfg.encoder.cross_attn_window or 1
        self.dw = cfg.decoder.cross_attn_window or 1
        self.enc_cross = [i for i in range(len(enc.layers)) if enc.has_cross_attn(i)]
        self.dec_cross = [i for i in range(len(dec.layers)) if dec.has_cross_attn(i)]
        self.nmax = max(cfg.encoder.ngram_sizes)
        self.patches = 0  # completed while stepping
        self.global_steps = 0
        self.active: list[bool] = [True] * self.B
        self.compiled = bool(compile) and self.device.type == "cuda"
        # fuse: run the patch step every byte, masked (one graph per byte; default: when compiled)
        self.fuse = self.compiled if fuse is None else bool(fuse)
        self._fused, self._step_module = self._step_impl, None
        self.sampling = None  # (temperature, top_k, top_p) once start_sampling() is called
        if self.compiled:
            self._compile(mode="reduce-overhead")

    def _compile(self, **options) -> None:
        """Compile the fused step through a _StepModule (see there), with dynamic=False."""
        self._step_module = _StepModule(self)
        self._fused = torch.compile(self._step_module, dynamic=False, **options)

    def _tensors_changed(self) -> None:
        """Tensors were allocated or re-created: re-register them with the compiled step."""
        if self._step_module is not None:
            self._step_module.register()

    # ---- prefill ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Run every row's prompt into the caches -> (B,V) logits for each row's next byte.

        Time and memory grow linearly with the prompt (the global model's attention aside,
        which holds every patch): a row is patched first (prefill.patch_prompt: the entropy
        model in blocks), the caches are sized from the patch counts, then its bytes run through
        the encoder, global model and decoder in blocks (_prefill_row), written straight into
        the caches."""
        rows = [patch_prompt(self, p) for p in self.prompts]
        self._allocate(rows)
        return torch.stack([self._prefill_row(b, r) for b, r in enumerate(rows)])

    @contextmanager
    def _timed(self, kind: str, work: int):
        """A prefill block of `work` bytes on CPU runs on the threads its ThreadChooser picks, and
        is timed for it."""
        if self.device.type != "cpu":
            yield
            return
        chooser = self.choosers[kind]
        with cpu_threads(chooser.threads):
            t0 = time.perf_counter()
            yield
            chooser.record((time.perf_counter() - t0) / work)

    def _prefill_row(self, b: int, r: Patched) -> torch.Tensor:
        """Row b's prompt into the caches (RowPrefill) -> (V,) logits for its next byte."""
        return RowPrefill(self, b, r).run()

    def _allocate(self, rows: list[Patched]) -> None:
        cfg, B, dev, dt = self.cfg, self.B, self.device, self.dtype
        Lmax = max(r.L for r in rows)
        # compiled: capacities rounded up to a bucket (one compiled step for the prompts and
        # max_new of a bucket); eager steps read only the slots filled so far: exact sizes
        size = bucket if self.compiled else int
        full_cap = size(Lmax + self.max_new + 1)  # local stacks without a window: one slot per position

        def stack(c, n_layers):
            return KVCache(n_layers, B, c.kv_heads, c.head_dim, c.window, full_cap, dev, dt)

        self.rows_idx = torch.arange(B, device=dev)
        self.ent = stack(cfg.entropy_model, cfg.entropy_model.n_layers) if self.pc.needs_entropy else None
        self.enc = stack(cfg.encoder, cfg.encoder.n_layers)
        self.dec = stack(cfg.decoder, cfg.decoder.n_layers)
        g = cfg.global_model
        pmax = max(r.P_complete for r in rows)
        # a patch completes at most once per byte: compiled graphs get that bound up front; else
        # as many as growing the cache (a copy beside the old one: a long prompt's is large)
        # would cost anyway, an eighth of the prompt's, or 256
        extra = self.max_new + 1 if self.fuse else min(self.max_new, max(256, pmax // 8)) + 1
        self.glob = KVCache(g.n_layers, B, g.kv_heads, g.head_dim, g.window, size(pmax + extra), dev, dt)

        # per-row scalars, updated in place by the step functions
        self.pos = torch.tensor([r.L for r in rows], dtype=torch.long, device=dev)
        self.cur_patch = torch.tensor([r.P_complete for r in rows], dtype=torch.long, device=dev)
        self.cur_len = torch.tensor([r.cur_len for r in rows], dtype=torch.long, device=dev)
        self.H_prev = torch.stack([r.H[-1] for r in rows]).float() if self.ent is not None else None
        win = torch.zeros(B, self.nmax, dtype=torch.long, device=dev)
        prev = torch.zeros(B, dtype=torch.long, device=dev)
        for b, p in enumerate(self.prompts):
            tail = p[-(self.nmax - 1) :] if self.nmax > 1 else []
            if tail:
                win[b, self.nmax - len(tail) :] = torch.tensor(tail, device=dev)
            prev[b] = p[-1]
        self.win, self.prev_tok = win, prev  # win[:, -1] is the last byte seen
        # host bookkeeping (what the buffer must keep; no device reads needed)
        self.h_pos = [r.L for r in rows]
        self.h_starts = [deque(r.recent_starts(self.ew), maxlen=self.ew) for r in rows]
        self.h_patches = [r.P_complete for r in rows]

        # encoder patch buffer: ring over byte positions (filled by _prefill_row)
        D = cfg.encoder.dim
        need = max(r.L - r.recent_starts(self.ew)[0] + 1 for r in rows)
        base = self.ew * (self.pc.max_patch_length or (64 if self.fuse else 16))  # fused: graphs keep it
        C = max(base, 1 << (need - 1).bit_length())  # a power of two: few shapes for compiled steps
        self.buf = [torch.zeros(B, C, D, device=dev, dtype=dt) for _ in self.enc_cross]
        self.buf_pos = torch.full((B, C), -1, dtype=torch.long, device=dev)
        self.buf_patch = torch.full((B, C), -1, dtype=torch.long, device=dev)

        with cpu_threads(self.threads):  # the step helpers split their products for the steps' threads
            self._step_helpers()
        self._bounds()
        self._tensors_changed()

    def _step_helpers(self) -> None:
        """The model's weights arranged for one-position steps (Block, Cross, Proj, Norm),
        and the decoder's patch store."""
        m, cfg, B, dev, dt = self.model, self.cfg, self.B, self.device, self.dtype
        # decoder patch store: the last dw complete patches, k keys each, per cross layer
        dec = m.decoder
        self.dec_mods = [Cross(dec.cross_attn[i if cfg.decoder.cross_attn_all_layers else 0]) for i in self.dec_cross]
        dc = cfg.decoder
        S = self.dw * self.k
        self.store_k = [torch.zeros(B, dc.kv_heads, S, dc.head_dim, device=dev, dtype=dt) for _ in self.dec_mods]
        self.store_v = [torch.zeros_like(t) for t in self.store_k]
        self.store_valid = torch.zeros(B, S, dtype=torch.bool, device=dev)
        self.store_ring = torch.arange(S, device=dev) // self.k  # ring index of each slot
        self.ent_blocks = [Block(b) for b in m.entropy_model.layers] if self.ent is not None else []
        self.enc_blocks = [Block(b) for b in m.encoder.layers]
        self.glob_blocks = [Block(b) for b in m.global_model.layers]
        self.dec_blocks = [Block(b) for b in m.decoder.layers]
        self.hash_step = HashStep(m.encoder, self.nmax, dev)
        enc, gm = m.encoder, m.global_model
        self.enc_mods = [Cross(enc.cross_attn[i if cfg.encoder.cross_attn_all_layers else 0]) for i in self.enc_cross]
        self.ent_out = Proj(m.entropy_model.output.weight) if self.ent is not None else None
        self.ent_norm = Norm(m.entropy_model.norm) if self.ent is not None else None
        self.enc_patch_proj = Proj(enc.patch_proj.weight)
        self.glob_in = Proj(gm.in_proj.weight) if gm.in_proj is not None else None
        self.dec_patch_proj = Proj(dec.patch_proj.weight)
        self.dec_out = Proj(dec.output.weight)
        self.dec_norm = Norm(dec.norm)

    # ---- one byte per row -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,) long: the byte at each row's next position -> (B,V) logits for the byte after."""
        ids = ids.to(self.device, torch.long).view(self.B)
        self._ensure_buffer()
        if self.glob.ensure(max(self.h_patches) + 1):  # every row writes its open patch's slot
            self._tensors_changed()
        self._bounds()
        if self.fuse:
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits, start_next = self._fused(ids)
            flags = start_next.tolist()
            logits = logits.clone()
        else:
            start_next, h = self._front_impl(ids)
            flags = start_next.tolist()
            if any(flags):
                self._patch_step(start_next)
            logits = self._back_impl(h, start_next)
        self.note(flags)
        return logits

    def note(self, flags: list) -> None:
        """Host bookkeeping of one step, from its patch flags (which rows completed a patch)."""
        if any(flags):
            self.global_steps += 1
            self.patches += sum(1 for f, a in zip(flags, self.active) if f and a)
        for b, f in enumerate(flags):
            self.h_pos[b] += 1
            if f:
                self.h_starts[b].append(self.h_pos[b])
                self.h_patches[b] += 1

    # ---- sampling on the device, the host one step behind (compiled engines) ---------------
    def start_sampling(self, logits, temperature=0.0, top_k=None, top_p=None, seeds=None) -> None:
        """Sample inside the step from now on (launch()): logits (B,V) from prefill(); the
        sampling settings are fixed for the engine's life (they are part of the graph)."""
        if not self.fuse:
            raise RuntimeError("start_sampling needs a fused engine (compile=True or fuse=True)")
        self.sampling = (float(temperature), top_k or None, top_p)
        self.logits_buf = logits.float().clone()
        self.sample_idx = torch.zeros((), dtype=torch.long, device=self.device)  # byte index
        self.seeds = seeds.to(self.device) if seeds is not None else torch.zeros(self.B, dtype=torch.long, device=self.device)
        self._tensors_changed()

    @torch.no_grad()
    def launch(self) -> torch.Tensor:
        """Sample every row's next byte from the current logits and feed it, without waiting
        for the device: -> (2,B) long [bytes, patch flags] of this step. The host reads it
        later (see pipelined()) and must pass the flags to note() in launch order; until then
        the host's counters lag one step behind, hence the margins of the capacity checks."""
        self._ensure_buffer(lag=1)
        if self.glob.ensure(max(self.h_patches) + 2):
            self._tensors_changed()
        self.top_pos = self.top_patch = None  # the host's counters are a step old: read every
        self.store_full = False  # slot, masked, as under CUDA graphs
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self._fused()

    def _step_impl(self, ids=None):
        """What the compiled module runs: the fused step on given ids, or (ids None) a sampled
        step: sample from logits_buf, feed the bytes, keep the new logits in logits_buf."""
        if ids is not None:
            return self._fused_impl(ids)
        temperature, top_k, top_p = self.sampling
        tok = sample_next(self.logits_buf, temperature, top_k, top_p, self.seeds if temperature > 0 else None,
                          self.sample_idx)  # fmt: skip
        logits, start_next = self._fused_impl(tok)
        self.logits_buf.copy_(logits)
        self.sample_idx.add_(1)
        return torch.stack([tok, start_next.long()])

    def _bounds(self) -> None:
        """What the host knows of this step: the largest byte position and patch index (the
        caches' attention reads only the slots filled so far) and whether every row's decoder
        patch store is full (no cross-attention mask). Under CUDA graphs, none of it: shapes
        stay fixed."""
        eager = not self.compiled
        self.top_pos = max(self.h_pos) if eager else None
        self.top_patch = max(self.h_patches) if eager else None
        self.store_full = eager and min(self.h_patches) >= self.dw

    def _fused_impl(self, ids):
        """The compiled step: the patch step runs every byte, its results kept only for rows
        whose patch completes (on a GPU this costs less than a host round trip and a branch)."""
        start_next, h = self._front_impl(ids)
        self._patch_step(start_next)
        return self._back_impl(h, start_next), start_next

    def _ensure_buffer(self, lag: int = 0) -> None:
        """Grow the encoder patch buffer if a row's needed bytes would not fit (host-side check)."""
        C = self.buf_pos.shape[1]
        need = max(p - s[0] + 1 for p, s in zip(self.h_pos, self.h_starts)) + lag
        if self.pc.max_patch_length is not None:  # the last ew patches never hold more bytes
            need = min(need, self.ew * self.pc.max_patch_length)
        if need <= C:
            return
        C2 = max(2 * C, 1 << (need - 1).bit_length())
        valid = self.buf_pos >= 0
        slot = torch.where(valid, self.buf_pos % C2, torch.full_like(self.buf_pos, C2))
        B = self.B

        def move(src, fill):
            shape = (B, C2 + 1) + tuple(src.shape[2:])
            out = torch.full(shape, fill, dtype=src.dtype, device=src.device)
            idx = slot.view(B, C, *([1] * (src.dim() - 2))).expand_as(src)
            return out.scatter(1, idx, src)[:, :C2]

        self.buf = [move(t, 0) for t in self.buf]
        self.buf_pos, self.buf_patch = move(self.buf_pos, -1), move(self.buf_patch, -1)
        self._tensors_changed()

    def _decide(self, ids, H):
        """patcher.patch_starts for p = pos+1 (the next byte), from bytes <= pos only."""
        pc = self.pc
        nxt = self.pos + 1
        if pc.mode == "byte":
            s = torch.ones_like(nxt, dtype=torch.bool)
        elif pc.mode == "static":
            s = (nxt - 1) % pc.patch_size == 0
        elif pc.mode == "space":
            s = ~_is_word_byte(ids) & _is_word_byte(self.prev_tok)
        elif pc.mode == "entropy":
            s = H > pc.threshold
        elif pc.mode == "monotonic":
            s = (H - self.H_prev) > pc.threshold
        else:  # combined
            s = (H > pc.threshold) & ((H - self.H_prev) > pc.threshold_add)
        s = s | (nxt <= 1)
        if pc.max_patch_length is not None:
            s = s | (self.cur_len + 1 == pc.max_patch_length)
        return s

    def _front_impl(self, ids):
        """Entropy model step, patch decision, encoder step, patch-buffer write."""
        m, rows, pos = self.model, self.rows_idx, self.pos
        H = None
        if self.ent is not None:
            em = m.entropy_model
            rope = rope_step(em.rope, pos, self.ent_blocks[0])
            at, mask, n = self.ent.begin(pos, rows, self.top_pos)
            x = em.tok_embeddings(ids[:, None])
            for i, blk in enumerate(self.ent_blocks):
                x = block_step(blk, x, rope, self.ent, i, at, mask, n)
            H = entropy(self.ent_out(self.ent_norm(x)))[:, 0]
        start_next = self._decide(ids, H)
        if H is not None:
            self.H_prev.copy_(H)
        self.prev_tok.copy_(ids)
        self.win.copy_(torch.cat([self.win[:, 1:], ids[:, None]], dim=1))
        enc = m.encoder
        x = self.hash_step(self.win)
        rope = rope_step(enc.rope, pos, self.enc_blocks[0])
        at, mask, n = self.enc.begin(pos, rows, self.top_pos)
        bslot = pos % self.buf_pos.shape[1]
        j = 0
        for i, blk in enumerate(self.enc_blocks):
            x = block_step(blk, x, rope, self.enc, i, at, mask, n)
            if enc.has_cross_attn(i):
                self.buf[j][rows, bslot] = x[:, 0]
                j += 1
        self.buf_pos[rows, bslot] = pos
        self.buf_patch[rows, bslot] = self.cur_patch
        return start_next, x

    def _patch_step(self, start_next):
        """Pool the current patch of every row, one global step, store the decoder keys; rows
        whose patch is not complete compute too but their results are not kept."""
        m, rows, cur, k = self.model, self.rows_idx, self.cur_patch, self.k
        enc = m.encoder
        B = self.B
        own = self.buf_patch == cur[:, None]
        seen = (self.buf_pos >= 0) & (self.buf_patch <= cur[:, None]) & (self.buf_patch > (cur - self.ew)[:, None])
        seen = seen[:, None, None, :]
        queries = None
        for j, i in enumerate(self.enc_cross):
            hb = self.buf[j]
            if queries is None:
                pooled = hb.masked_fill(~own[..., None], float("-inf")).amax(1)
                queries = self.enc_patch_proj(pooled).view(B, k, -1)
            kk, vv = cross_kv(self.enc_mods[j], hb)
            out = queries + cross(self.enc_mods[j], queries, kk, vv, seen)
            queries = out + queries if enc.double_residual else out
        gm = m.global_model
        x = queries.reshape(B, 1, -1)
        x = self.glob_in(x) if self.glob_in is not None else x
        rope = rope_step(gm.rope, cur, self.glob_blocks[0])
        at, mask, n = self.glob.begin(cur, rows, self.top_patch)
        for i, blk in enumerate(self.glob_blocks):
            x = block_step(blk, x, rope, self.glob, i, at, mask, n)
        keys = self.dec_patch_proj(x).view(B, k, -1)  # decoder.patch_keys
        write = start_next[:, None] & (self.store_ring[None] == (cur % self.dw)[:, None])  # (B,S)
        w4 = write[:, None, :, None]
        for j, ca in enumerate(self.dec_mods):
            kk, vv = cross_kv(ca, keys)
            self.store_k[j].copy_(torch.where(w4, kk.repeat(1, 1, self.dw, 1), self.store_k[j]))
            self.store_v[j].copy_(torch.where(w4, vv.repeat(1, 1, self.dw, 1), self.store_v[j]))
        self.store_valid.bitwise_or_(write)  # in place, no attribute store in the compiled step

    def _back_impl(self, h, start_next):
        """Decoder step -> logits; then advance the per-row counters."""
        m, rows, pos = self.model, self.rows_idx, self.pos
        dec = m.decoder
        rope = rope_step(dec.rope, pos, self.dec_blocks[0])
        at, mask, n = self.dec.begin(pos, rows, self.top_pos)
        cmask = None if self.store_full else self.store_valid[:, None, None, :]
        j = 0
        for i, blk in enumerate(self.dec_blocks):
            if dec.has_cross_attn(i):
                out = h + cross(self.dec_mods[j], h, self.store_k[j], self.store_v[j], cmask)
                h = out + h if dec.double_residual else out
                j += 1
            h = block_step(blk, h, rope, self.dec, i, at, mask, n)
        logits = self.dec_out(self.dec_norm(h))[:, 0]
        self.cur_len.copy_(torch.where(start_next, torch.zeros_like(self.cur_len), self.cur_len + 1))
        self.cur_patch.add_(start_next.long())
        self.pos.add_(1)
        return logits

    # ---- batch management -------------------------------------------------------------------
    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished rows), keeping the order given. Not with
        compile=True: CUDA graphs keep their batch size (finished rows just keep stepping)."""
        if self.compiled:
            raise RuntimeError("Engine.keep is not available with compile=True")
        if rows == list(range(self.B)):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for c in (self.ent, self.enc, self.dec, self.glob):
            if c is not None:
                c.select(idx)
        sel = lambda t: t.index_select(0, idx)  # noqa: E731
        self.pos, self.cur_patch, self.cur_len = sel(self.pos), sel(self.cur_patch), sel(self.cur_len)
        if self.H_prev is not None:
            self.H_prev = sel(self.H_prev)
        self.win, self.prev_tok = sel(self.win), sel(self.prev_tok)
        self.buf = [sel(t) for t in self.buf]
        self.buf_pos, self.buf_patch = sel(self.buf_pos), sel(self.buf_patch)
        self.store_k = [sel(t) for t in self.store_k]
        self.store_v = [sel(t) for t in self.store_v]
        self.store_valid = sel(self.store_valid)
        self.h_pos = [self.h_pos[r] for r in rows]
        self.h_starts = [self.h_starts[r] for r in rows]
        self.h_patches = [self.h_patches[r] for r in rows]
        self.active = [self.active[r] for r in rows]
        self.B = len(rows)
        self.rows_idx = torch.arange(self.B, device=self.device)
        self._tensors_changed()
