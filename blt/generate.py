"""Byte generation for BLT: an exact KV-cached engine, the plain uncached oracle, and a CLI.

    python -m blt.generate --prompt "Once upon a time" --max-new 300 --temperature 0.7 --stats

The engine (`Engine`) produces, byte for byte, what `generate_uncached` produces by running
`BLT.forward` over the whole prefix for every new byte (logits equal to float noise, ~1e-6),
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

Cache layout (all preallocated, batch-first, per-row positions):
  * entropy model / encoder / decoder self-attention: rings of exactly `window` slots per
    layer, slot = position % window, with each slot's position stored; memory is bounded
    by the window however long the text gets (window None: one slot per position).
  * global transformer: one slot per patch, slot = patch index (grows by doubling only
    when needed; a ring of `window` slots if global_model.window is set).
  * encoder patch buffer: the byte states of the current patch (plus the previous w-1 with
    an encoder cross_attn_window w), a ring over byte positions that doubles if a patch
    outgrows it (never, with max_patch_length).
  * decoder patch store: k·w_dec projected keys/values per cross-attention layer.

compile=True (CUDA only; ignored elsewhere): the whole byte step -- steps 1-4, with the patch
step of 3 run every byte and its results kept only where a patch completes -- is compiled
with torch.compile(mode="reduce-overhead") into one CUDA graph over static cache tensors
(the compiled function is an nn.Module holding the engine, and every engine tensor is one
of its buffers: see _StepModule). generate_ids then samples inside that graph too
(Engine.start_sampling / launch): the graph reads its own logits and writes the next ones,
so it has no input from the host at all, and the host reads each step's bytes and patch
flags one step late (`pipelined`), launching step t+1 before it waits for step t. The host's
counters lag a step, which the capacity checks allow for; a row's stop is seen a step late.

On CPU a step is bound by memory bandwidth (every per-byte weight is read from memory for
each byte) and by per-call overhead (hundreds of small ops), so the step helpers keep each
weight in the layout whose product streams fastest, split every product across the threads,
and skip what the host already knows (empty cache slots, masks of a single row). How many
threads: 1 or 2, chosen while running by timing the work (ThreadChooser): a second thread
is faster on idle cores and many times slower beside another busy process.

Batching: every row has its own position counter and its own patching, and each cache
slot records the position it holds, so the masks are built per row from those positions
(no padding anywhere: rows of different lengths never see each other's slots or
positions). Prompts are prefilled one row at a time with the model's own full-forward
pieces (so a row's numbers never depend on the batch), then the rows step together. When
some rows complete a patch and others do not, the global step runs for the whole batch and
the other rows' results are dropped (their cache write lands in the slot their own next
patch will overwrite before reading it). Rows finish independently (EOS or a stop string)
and are then dropped from the batch (compiled: they keep stepping, ignored). Sampling is one
batched Gumbel-max draw per byte whose noise is a hash of (row seed, byte index, byte value)
(row_uniforms; row seed = seed + row), so a row samples the same bytes in a batch as alone.

Prompts: text is encoded as BOS + UTF-8 bytes; an empty prompt generates from BOS alone.
Id lists are used as given (an empty one becomes [BOS]). There is no length limit: the
prompt is prefilled in blocks of PREFILL_CHUNK bytes (Engine.prefill, _RowPrefill), each
attending to what the caches keep of the blocks before it, so memory grows linearly with the
prompt (no attention compares more than PREFILL_PAIRS query-key pairs at once) and so does
time, but for the global model's attention over every patch. After it the entropy model and
the local models see only their sliding windows (bounded memory) and the global model sees
every patch so far (its cache grows by one slot per patch, as BLT.forward's global context
would).

The sampler never emits the ids BOE, BOS and BPE (they are not text); EOS ends a row.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blt import masks as M
from blt.entropy_model import entropy
from blt.layers import project
from blt.patcher import _is_word_byte, lengths_from_starts, patch_starts
from blt.tokens import BOE_ID, BOS_ID, BPE_ID, EOS_ID, OFFSET, VOCAB_SIZE, StreamDecoder, encode

DEFAULT_STOP = ("<|endoftext|>",)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints"
NEVER_SAMPLED = (BOE_ID, BOS_ID, BPE_ID)
# Prompts are prefilled in blocks of at most this many bytes (and of the patches these
# complete), each block attending to what the caches keep of the blocks before it ...
PREFILL_CHUNK = 2048
# ... and no attention of the prefill compares more query-key pairs than this at once (a block
# shrinks where a stack without a window, e.g. the global model's, has many keys behind it).
PREFILL_PAIRS = 1 << 23
# The most CPU threads the engine gives its work on its own (ThreadChooser picks 1 or this
# many, capped by the cores; Engine(threads=N) fixes N).
MAX_AUTO_THREADS = 2
SEED_MAX = 2**63 - 1  # row seeds (seed + row) are int64


@dataclass
class GenerationStats:
    bytes: int  # bytes sampled, all rows (a stop string's bytes included, EOS not)
    seconds: float  # prefill + generation, wall clock
    bytes_per_s: float
    patches: int  # patches completed while generating, all rows (prompt patches not counted)
    global_steps: int  # one-patch global-transformer calls while generating (batched: one per call)

    def line(self) -> str:
        return (f"bytes={self.bytes} seconds={self.seconds:.4f} bytes_per_s={self.bytes_per_s:.2f} "
                f"patches={self.patches} global_steps={self.global_steps}")


# ---- sampling -------------------------------------------------------------------------------


def check_sampling_args(max_new, temperature, top_k, top_p) -> None:
    """Raise a one-line ValueError for an unusable sampling setting."""
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new must be an integer >= 0, got {max_new!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_seed(seed, rows: int = 1) -> None:
    """Raise a one-line ValueError for a seed the rows' int64 seeds (seed + row) cannot hold."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX - (rows - 1):
        raise ValueError(f"seed must be an integer in [0, 2**63 - {rows}] (None: random), got {seed!r}")


@contextmanager
def restored_threads():
    """torch's thread count, whatever the body sets, restored after it."""
    old = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextmanager
def cpu_threads(n: int | None):
    """torch.set_num_threads(n) for the duration (None: leave it)."""
    with restored_threads():
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        yield


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadChooser:
    """Picks the CPU threads of a repeated piece of work (a byte step, a prefill block) by
    timing it while it runs, as the machine's load comes and goes. The per-byte step is
    hundreds of small products: on 2 idle cores a second thread makes it ~15% faster, beside
    one busy process 5-60x slower (each product waits for the thread the OS has descheduled;
    bench/generate_speed.py --cpu-load); the prefill's large products gain more on idle cores
    and lose as much beside a busy process.

    It starts on the fewest threads (never the slow choice) and tries the other after `first`
    units of work, then every `every` units: for `trial` of them, and keeps it if their median time beats the
    current choice's (its last `trial` timings) by 5%. A trial stops at once on a unit over
    1.5x the current median; a lost trial makes `every` 4x longer (up to 64x), a won one
    resets it: beside a busy process, trials of more threads soon become rare.
    On more than the fewest threads, a unit over 2x the median (load came) starts a trial of
    the fewest at once. Timings: seconds per unit of work, given by the caller to record()."""

    def __init__(self, choices, every: int = 32, trial: int = 8, first: int = 8):
        self.choices = sorted(set(choices))
        self.cur = self.choices[0]
        self.base_every = self.every = every
        self.countdown = first
        self.trial_len = trial
        self.times = {n: deque(maxlen=trial) for n in self.choices}
        self.trying, self.trial_times = None, []

    @property
    def threads(self) -> int:
        return self.trying or self.cur

    def record(self, seconds: float, comparable: bool = True) -> None:
        """One unit of work took `seconds` on self.threads threads; comparable=False: a unit
        unlike the others (e.g. a step that also ran the global model), not timed."""
        if self.trying is None:
            if not comparable:
                return
            cur = self.times[self.cur]
            load_came = self.cur != self.choices[0] and len(cur) > 0 and seconds > 2 * statistics.median(cur)
            cur.append(seconds)
            self.countdown -= 1
            if len(self.choices) > 1 and (self.countdown <= 0 or load_came):
                self.trying = self.choices[0] if self.cur != self.choices[0] else self.choices[-1]
                self.trial_times = []
            return
        if not comparable:
            return
        base = statistics.median(self.times[self.cur])
        self.trial_times.append(seconds)
        if seconds > 1.5 * base:
            won = False
        elif len(self.trial_times) >= self.trial_len:
            won = statistics.median(self.trial_times) < 0.95 * base
        else:
            return
        if won:
            self.times[self.trying].extend(self.trial_times)
            self.cur, self.every = self.trying, self.base_every
        else:
            self.every = min(4 * self.every, 64 * self.base_every)
        self.trying, self.countdown = None, self.every


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values
    below 2**32. The multiplier is below 2**27, so no product overflows int64: signed
    overflow is undefined in C++, and a compiler may miscompile code that relies on it."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step, V: int) -> torch.Tensor:
    """Counter-based random numbers: (B,) int64 row seeds and a step (int or 0-dim tensor) ->
    (B,V) float32 in (0, 1), value v of row b a hash of (seed_b, step, v). A row gets the same
    numbers in any batch, with no generator state: one batched op per byte, and nothing a
    CUDA graph could not replay."""
    seeds = seeds.to(torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _mix32(((lo * 0x2545F491) & _M32) + hi + (step & _M32) * 0x1B873593 & _M32)  # (B,)
    # v enters unscaled: compiled, arange(V) and any constant product of it become a kernel's
    # index expression, computed in int32 (v * 0x9E3779B1 broke Triton's compilation on CUDA)
    v = torch.arange(V, dtype=torch.int64, device=seeds.device)
    z = _mix32(_mix32((h[:, None] + v) & _M32))
    return ((z >> 9).float() + 0.5) * (1.0 / (1 << 23))  # 23 bits: exact in float32


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, seeds=None, step=0) -> torch.Tensor:
    """(B,V) logits -> (B,) ids. temperature 0: greedy. BOE/BOS/BPE are never sampled.

    seeds: (B,) int64 tensor, one seed per row, sampled with `step` (the index of the byte
    being sampled) by the Gumbel-max trick, argmax(logits/T + Gumbel noise), the noise from
    row_uniforms: the draw is an exact sample of softmax(logits/T) restricted to top-k/top-p,
    and reproducible per row. None: noise from torch's default generator."""
    logits = logits.float().clone()
    logits[:, list(NEVER_SAMPLED)] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest head reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    if seeds is None:
        u = torch.rand_like(logits).clamp_(min=1e-12, max=1 - 1e-7)
    else:
        u = row_uniforms(seeds.to(logits.device), step, logits.shape[-1])
    return (logits - (-u.log()).log()).argmax(-1)


# ---- caches ---------------------------------------------------------------------------------


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
        """One _Context per layer to prefill row `row` through; without a window they write
        their keys/values straight into this cache's slots (slot = position)."""
        return [_Context(self.window, kv[row] if self.window is None else None) for kv in self.kv]

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


class _Context:
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


def _block_mask(q0: int, n: int, ctx: int, window: int | None, device) -> torch.Tensor:
    """(1,1,n,ctx+n) bool: queries at positions q0..q0+n-1 over keys at q0-ctx..q0+n-1 (the
    `ctx` positions a _Context holds, then the block's own), causal, sliding window."""
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


# ---- one-position building blocks (mirror layers.py with cached keys/values) ---------------
#
# A step is a few rows through ~50 matrix products and many small ops. On a CPU the products
# are bound by memory bandwidth (the weights do not stay in cache) and the small ops by
# per-call overhead, so the helpers below store each weight in the layout that streams fastest
# and keep the number of kernel calls low.


def _sdpa(q, k, v, mask):
    """Attention of a step's few queries over cached keys (mask: bool, True = visible).

    Compiled on a GPU it is written out as products and a softmax, which inductor fuses into
    a few small kernels: SDPA's fused kernels tile over queries, and with one query per row
    most of their tiles are idle while one of them walks every key (45 µs a call on an H200
    in float32, two thirds of a step). Elsewhere, SDPA itself."""
    if not (q.is_cuda and torch.compiler.is_compiling()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return _attention_math(q, k, v, mask)


def _attention_math(q, k, v, mask):
    """SDPA's result (bool mask, grouped-query heads) as plain products in float32."""
    if k.shape[1] != q.shape[1]:  # grouped-query: query head h reads key/value head h // group
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


class _Norm:
    """A layers.RMSNorm for steps. In float32 on CPU it computes exactly RMSNorm's numbers
    (x·rsqrt(mean(x²) + eps)·w, bit for bit) in 7 kernel calls that take ~8 us where the module
    takes ~17 us and F.rms_norm ~10 (mostly turning the Python scalars D and eps into tensors,
    done once here). Elsewhere, and in other dtypes (the module rounds to the dtype before
    scaling), the module itself."""

    def __init__(self, norm):
        w = norm.weight.detach()
        self.norm, self.w = norm, w
        self.fast = w.device.type == "cpu" and w.dtype == torch.float32
        self.d = torch.tensor(float(w.shape[0]))  # 0-dim: mean = sum / d, as torch.mean
        self.eps = torch.tensor(norm.eps, dtype=torch.float32)

    def __call__(self, x):
        if not self.fast or x.dtype != torch.float32:
            return self.norm(x)
        r = (x * x).sum(-1, keepdim=True).div_(self.d).add_(self.eps).rsqrt_()
        return (x * r).mul_(self.w)


class _Proj:
    """x·Wᵀ for a bias-free nn.Linear (weights given together are concatenated along the
    outputs: one product instead of several), stored in the layout its product is fastest in.

    On CPU a product of a few rows streams the whole weight from memory (the model does not
    stay in cache), which one core does slowly for these small matrices. So the outputs are
    split into one block per thread and the blocks run as one batched product, a thread each
    (2 threads: 2730x512 in 155 instead of 253 us, 256x256 in 22 instead of 31 us). A block
    with more outputs than inputs is stored (in, out/n), which `x @ w` streams ~1.7x faster
    than F.linear's (out, in) (768x256: 56 vs 97 us); with fewer outputs, (out, in) is the
    faster one (256x682: 57 vs 88 us). Each output is still one whole dot product, as in
    F.linear. Elsewhere (the compiled CUDA path): F.linear."""

    def __init__(self, *weights):
        weights = [t.detach() for t in weights]
        self.cpu = weights[0].device.type == "cpu"
        if not self.cpu:
            self.w = torch.cat(weights) if len(weights) > 1 else weights[0]
            return
        inp, out = weights[0].shape[1], sum(t.shape[0] for t in weights)
        threads = torch.get_num_threads()  # one block per thread, of at least 32 outputs
        self.n = max(d for d in range(1, threads + 1) if out % d == 0 and (d == 1 or out // d >= 32))
        if out > inp:  # one (in, out) copy; block j = its columns j·out/n.. (rows `out` apart)
            wt = torch.cat([t.t() for t in weights], dim=1)
            self.w = wt.view(inp, self.n, out // self.n).transpose(0, 1)
        else:  # (out, in) as it is; block j = its rows j·out/n.., read transposed
            w = torch.cat(weights) if len(weights) > 1 else weights[0]
            self.w = w.view(self.n, out // self.n, inp).transpose(1, 2)

    def __call__(self, x):
        if not self.cpu:
            return F.linear(x, self.w)
        lead = x.shape[:-1]
        x3 = x if x.dim() == 3 and x.shape[0] == 1 else x.reshape(1, -1, x.shape[-1])
        y = torch.bmm(x3.expand(self.n, -1, -1), self.w)  # (n, rows, out/n)
        if y.shape[1] > 1:
            y = y.transpose(0, 1)  # a copy below; with one row, the blocks are in order already
        return y.reshape(*lead, -1)


class _Block:
    """A TransformerBlock's weights arranged for one-position steps: q/k/v and the two SwiGLU
    input projections fused into one product each (same dot products, fewer kernel calls)."""

    def __init__(self, block):
        a = block.attn
        self.attn_norm, self.ffn_norm = _Norm(block.attn_norm), _Norm(block.ffn_norm)
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv, a.head_dim
        self.q_kv = (a.n_heads, 2 * a.n_kv)  # the fused output's query heads | key and value heads
        heads = a.n_heads + 2 * a.n_kv
        self.rotated = (torch.arange(heads) < a.n_heads + a.n_kv).view(1, heads, 1).to(a.wq.weight.device)
        self.wqkv = _Proj(a.wq.weight, a.wk.weight, a.wv.weight)
        self.wo = _Proj(a.wo.weight)
        self.w13 = _Proj(block.ffn.w1.weight, block.ffn.w3.weight)
        self.w2 = _Proj(block.ffn.w2.weight)


def _rope_step(rotary, pos, blk: _Block, complex_table: bool | None = None):
    """Rotary factors for one position per row, one per head of a block's fused q/k/v output
    (B, H+2·Hkv, ...): the rotation for the query and key heads, the identity for the value
    heads, so that one product rotates q and k and leaves v as it is.

    CPU: complex (B, H+2·Hkv, Dh/2) cos + i·sin (value heads 1): with each pair (x[2m],
    x[2m+1]) read as x0 + i·x1, the complex product (x0·cos - x1·sin) + i·(x0·sin + x1·cos)
    is layers.apply_rotary's products and sums (bit for bit), in one kernel call. Elsewhere
    (compiled CUDA graphs, real arithmetic): (cos2, sin2), each (B, H+2·Hkv, Dh), with
    x·cos2 + swap(x)·sin2 the same products and sums (value heads: cos 1, sin 0)."""
    cos, sin = rotary(pos[:, None])  # (B,1,Dh/2) float32
    if complex_table is None:
        complex_table = pos.device.type == "cpu"
    if complex_table:
        return torch.where(blk.rotated, torch.complex(cos, sin), 1.0)
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.where(blk.rotated, cos2, 1.0), torch.where(blk.rotated, sin2, 0.0)


def _rotate(y, rope, head_dim: int):
    """A block's fused q/k/v projection (B, 1, (H+2·Hkv)·Dh) -> (B, H+2·Hkv, Dh) heads with q and
    k rotated, v unchanged (float32 math)."""
    B = y.shape[0]
    yf = y.float()
    if isinstance(rope, torch.Tensor):  # complex table (CPU)
        out = torch.view_as_real(torch.view_as_complex(yf.view(B, -1, head_dim // 2, 2)) * rope).view(B, -1, head_dim)
    else:
        cos2, sin2 = rope
        yf = yf.view(B, -1, head_dim)
        out = yf * cos2 + yf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin2
    return out.to(y.dtype)


def _block_step(blk: _Block, x, rope, cache: KVCache, layer: int, at, mask, n: int):
    """TransformerBlock.forward for one new position per row (eval mode: no dropout); `at`,
    mask and n from KVCache.begin."""
    B = x.shape[0]
    qkv = _rotate(blk.wqkv(blk.attn_norm(x)), rope, blk.head_dim)  # (B, H+2·Hkv, Dh)
    q, new = qkv.split(blk.q_kv, dim=1)
    kv = cache.kv[layer]
    kv[at] = new
    out = _sdpa(q.unsqueeze(2), kv[:, : blk.n_kv, :n], kv[:, blk.n_kv :, :n], mask)
    x = x + blk.wo(out.transpose(1, 2).reshape(B, 1, -1))
    g, u = blk.w13(blk.ffn_norm(x)).chunk(2, dim=-1)
    return x + blk.w2(F.silu(g) * u)


class _HashStep:
    """LocalEncoder.embed for the newest position only. Each (function, n) table's rolling hash
    of the last n ids is one row of an int64 coefficient matrix over the last max(n) ids
    (zeros for older ids); int64 products and sums wrap exactly as ngram_hash's do."""

    def __init__(self, enc, nmax, device):
        he = enc.hash_embeddings
        rows = []
        from blt.ngram_hash import PRIMES

        for f in range(he.functions):
            prime = PRIMES[f % len(PRIMES)]
            for n in he.ngram_sizes:
                powers = torch.tensor(prime, dtype=torch.long) ** torch.arange(n)  # as ngram_hash
                rows.append(torch.cat([torch.zeros(nmax - n, dtype=torch.long), powers]))
        self.coef = torch.stack(rows).to(device)  # (tables, nmax)
        self.offset = torch.arange(len(rows), device=device) * he.rows
        self.rows, self.he, self.tok, self.enc = he.rows, he, enc.tok_embeddings, enc

    def __call__(self, win):
        """win (B, nmax) last ids (left-padded with 0) -> (B,1,D)."""
        idx = (win[:, None, :] * self.coef).sum(-1) % self.rows + self.offset  # (B, tables)
        h = self.tok(win[:, -1:]) + F.embedding(idx, self.he.weight).sum(dim=-2, keepdim=True)
        if self.enc.hash_mean:
            h = h / (self.he.num_tables + 1)
        return h


class _Cross:
    """A CrossAttention's weights arranged for steps: keys and values from one product."""

    def __init__(self, ca):
        self.q_norm, self.kv_norm = _Norm(ca.q_norm), _Norm(ca.kv_norm)
        self.n_heads, self.n_kv, self.head_dim = ca.n_heads, ca.n_kv, ca.head_dim
        self.wq, self.wkv, self.wo = _Proj(ca.wq.weight), _Proj(ca.wk.weight, ca.wv.weight), _Proj(ca.wo.weight)


def _cross_kv(ca: _Cross, kv):
    """CrossAttention's keys/values for (B,K,D) inputs -> (B,Hkv,K,Dh) each."""
    B, K, _ = kv.shape
    k, v = ca.wkv(ca.kv_norm(kv)).view(B, K, 2, ca.n_kv, ca.head_dim).permute(2, 0, 3, 1, 4)
    return k, v


def _cross(ca: _Cross, x, k, v, mask):
    """CrossAttention.forward with precomputed keys/values (the caller adds the residual)."""
    B, Q, _ = x.shape
    q = ca.wq(ca.q_norm(x)).view(B, Q, ca.n_heads, ca.head_dim).transpose(1, 2)
    return ca.wo(_sdpa(q, k, v, mask).transpose(1, 2).reshape(B, Q, -1))


# ---- the engine -----------------------------------------------------------------------------


_STEP_OBJECTS = (KVCache, _Norm, _Proj, _Block, _HashStep, _Cross)  # hold tensors the step reads


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


@dataclass
class _Patched:
    """A prompt after the prefill's first pass (entropy model, patcher): everything the engine
    needs to size its caches, linear in the prompt's length."""

    ids: torch.Tensor  # (L,) long
    H: torch.Tensor | None  # (L,) entropies (entropy-based patching only)
    ent_ctx: list | None  # the entropy model's _Context per layer, after the whole prompt
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


class _RowPrefill:
    """One row's prompt through the model's own modules (BLT.forward's computation) in blocks
    of at most PREFILL_CHUNK bytes, into the engine's caches.

    Per block of bytes: the encoder; for the patches the block completes, pooling (over the
    encoder states kept from the first byte of the next patch's pooling window on), the global
    model (in blocks of patches) and the decoder's patch keys; then the decoder. Every
    attention sees the keys it sees in one forward over the whole prompt: the byte stacks have
    sliding windows (their _Context keeps them), the global model's context holds every
    complete patch (or its window), and a patch is pooled once all its bytes have run. The
    decoder runs only over the last n_layers·(window-1)+1 bytes: nothing the engine keeps
    depends on its states before those."""

    def __init__(self, eng: "Engine", b: int, r: _Patched):
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
                kk, vv = _cross_kv(ca, keys)
                eng.store_k[j][b, :, sl] = kk[0]
                eng.store_v[j][b, :, sl] = vv[0]
            eng.store_valid[b, sl] = True


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
        self.prompts = [list(p) for p in prompts]
        # CPU threads: `threads`, or None: 1 or up to MAX_AUTO_THREADS, chosen while running by
        # timing the work (ThreadChooser), separately for the prefill's entropy-model blocks, its
        # byte blocks and the steps (the caller applies the steps' choice: timed_step).
        # The step helpers split their products for the most threads.
        self.threads = threads or min(_cores(), MAX_AUTO_THREADS)
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
        which holds every patch): a row is patched first (_patch: the entropy model in blocks),
        the caches are sized from the patch counts, then its bytes run through the encoder,
        global model and decoder in blocks (_prefill_row), written straight into the caches."""
        rows = [self._patch(p) for p in self.prompts]
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

    def _patch(self, ids: list[int]) -> _Patched:
        """The entropy model over the prompt in blocks of at most PREFILL_CHUNK bytes (each
        block attends to the window the _Context keeps of the blocks before), then
        patcher.patch_starts over the whole prompt (linear in its length)."""
        dev = self.device
        t = torch.tensor(ids, dtype=torch.long, device=dev)
        L = len(ids)
        ent_ctx, H = None, None
        if self.pc.needs_entropy:
            em = self.model.entropy_model
            ent_ctx = [_Context(em.cfg.window, total=L) for _ in em.layers]
            Hs, s = [], 0
            while s < L:
                e = min(L, s + _block_len(ent_ctx[0].n, PREFILL_CHUNK))
                with self._timed("entropy", e - s):
                    mask = _block_mask(s, e - s, ent_ctx[0].n, em.cfg.window, dev)
                    pos = torch.arange(s, e, device=dev)
                    Hs.append(entropy(em(t[None, s:e], positions=pos, mask=mask, caches=ent_ctx))[0])
                s = e
            H = torch.cat(Hs)
        starts = patch_starts(t[None], self.pc, None if H is None else H[None])
        lengths = lengths_from_starts(starts[:, :L])
        patch_ids = M.patch_ids_from_lengths(lengths, L)
        dec_ids = M.decoder_patch_ids(patch_ids, starts[:, L])
        P = lengths.shape[1]
        return _Patched(t, H, ent_ctx, patch_ids[0], dec_ids[0], [0] + lengths[0].cumsum(0).tolist(),
                        P if bool(starts[0, L]) else P - 1)  # fmt: skip

    def _prefill_row(self, b: int, r: _Patched) -> torch.Tensor:
        """Row b's prompt into the caches (_RowPrefill) -> (V,) logits for its next byte."""
        return _RowPrefill(self, b, r).run()

    def _allocate(self, rows: list[_Patched]) -> None:
        m, cfg, B, dev, dt = self.model, self.cfg, self.B, self.device, self.dtype
        Lmax = max(r.L for r in rows)
        full_cap = Lmax + self.max_new + 1  # local stacks without a window: one slot per position

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
        self.glob = KVCache(g.n_layers, B, g.kv_heads, g.head_dim, g.window, pmax + extra, dev, dt)

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
        C = max(base, 1 << (need - 1).bit_length())
        self.buf = [torch.zeros(B, C, D, device=dev, dtype=dt) for _ in self.enc_cross]
        self.buf_pos = torch.full((B, C), -1, dtype=torch.long, device=dev)
        self.buf_patch = torch.full((B, C), -1, dtype=torch.long, device=dev)

        with cpu_threads(self.threads):  # the step helpers split their products for the steps' threads
            self._step_helpers()
        self._bounds()
        self._tensors_changed()

    def _step_helpers(self) -> None:
        """The model's weights arranged for one-position steps (_Block, _Cross, _Proj, _Norm),
        and the decoder's patch store."""
        m, cfg, B, dev, dt = self.model, self.cfg, self.B, self.device, self.dtype
        # decoder patch store: the last dw complete patches, k keys each, per cross layer
        dec = m.decoder
        self.dec_mods = [_Cross(dec.cross_attn[i if cfg.decoder.cross_attn_all_layers else 0]) for i in self.dec_cross]
        dc = cfg.decoder
        S = self.dw * self.k
        self.store_k = [torch.zeros(B, dc.kv_heads, S, dc.head_dim, device=dev, dtype=dt) for _ in self.dec_mods]
        self.store_v = [torch.zeros_like(t) for t in self.store_k]
        self.store_valid = torch.zeros(B, S, dtype=torch.bool, device=dev)
        self.store_ring = torch.arange(S, device=dev) // self.k  # ring index of each slot
        self.ent_blocks = [_Block(b) for b in m.entropy_model.layers] if self.ent is not None else []
        self.enc_blocks = [_Block(b) for b in m.encoder.layers]
        self.glob_blocks = [_Block(b) for b in m.global_model.layers]
        self.dec_blocks = [_Block(b) for b in m.decoder.layers]
        self.hash_step = _HashStep(m.encoder, self.nmax, dev)
        enc, gm = m.encoder, m.global_model
        self.enc_mods = [_Cross(enc.cross_attn[i if cfg.encoder.cross_attn_all_layers else 0]) for i in self.enc_cross]
        self.ent_out = _Proj(m.entropy_model.output.weight) if self.ent is not None else None
        self.ent_norm = _Norm(m.entropy_model.norm) if self.ent is not None else None
        self.enc_patch_proj = _Proj(enc.patch_proj.weight)
        self.glob_in = _Proj(gm.in_proj.weight) if gm.in_proj is not None else None
        self.dec_patch_proj = _Proj(dec.patch_proj.weight)
        self.dec_out = _Proj(dec.output.weight)
        self.dec_norm = _Norm(dec.norm)

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
            rope = _rope_step(em.rope, pos, self.ent_blocks[0])
            at, mask, n = self.ent.begin(pos, rows, self.top_pos)
            x = em.tok_embeddings(ids[:, None])
            for i, blk in enumerate(self.ent_blocks):
                x = _block_step(blk, x, rope, self.ent, i, at, mask, n)
            H = entropy(self.ent_out(self.ent_norm(x)))[:, 0]
        start_next = self._decide(ids, H)
        if H is not None:
            self.H_prev.copy_(H)
        self.prev_tok.copy_(ids)
        self.win.copy_(torch.cat([self.win[:, 1:], ids[:, None]], dim=1))
        enc = m.encoder
        x = self.hash_step(self.win)
        rope = _rope_step(enc.rope, pos, self.enc_blocks[0])
        at, mask, n = self.enc.begin(pos, rows, self.top_pos)
        bslot = pos % self.buf_pos.shape[1]
        j = 0
        for i, blk in enumerate(self.enc_blocks):
            x = _block_step(blk, x, rope, self.enc, i, at, mask, n)
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
            kk, vv = _cross_kv(self.enc_mods[j], hb)
            out = queries + _cross(self.enc_mods[j], queries, kk, vv, seen)
            queries = out + queries if enc.double_residual else out
        gm = m.global_model
        x = queries.reshape(B, 1, -1)
        x = self.glob_in(x) if self.glob_in is not None else x
        rope = _rope_step(gm.rope, cur, self.glob_blocks[0])
        at, mask, n = self.glob.begin(cur, rows, self.top_patch)
        for i, blk in enumerate(self.glob_blocks):
            x = _block_step(blk, x, rope, self.glob, i, at, mask, n)
        keys = self.dec_patch_proj(x).view(B, k, -1)  # decoder.patch_keys
        write = start_next[:, None] & (self.store_ring[None] == (cur % self.dw)[:, None])  # (B,S)
        w4 = write[:, None, :, None]
        for j, ca in enumerate(self.dec_mods):
            kk, vv = _cross_kv(ca, keys)
            self.store_k[j].copy_(torch.where(w4, kk.repeat(1, 1, self.dw, 1), self.store_k[j]))
            self.store_v[j].copy_(torch.where(w4, vv.repeat(1, 1, self.dw, 1), self.store_v[j]))
        self.store_valid.bitwise_or_(write)  # in place, no attribute store in the compiled step

    def _back_impl(self, h, start_next):
        """Decoder step -> logits; then advance the per-row counters."""
        m, rows, pos = self.model, self.rows_idx, self.pos
        dec = m.decoder
        rope = _rope_step(dec.rope, pos, self.dec_blocks[0])
        at, mask, n = self.dec.begin(pos, rows, self.top_pos)
        cmask = None if self.store_full else self.store_valid[:, None, None, :]
        j = 0
        for i, blk in enumerate(self.dec_blocks):
            if dec.has_cross_attn(i):
                out = h + _cross(self.dec_mods[j], h, self.store_k[j], self.store_v[j], cmask)
                h = out + h if dec.double_residual else out
                j += 1
            h = _block_step(blk, h, rope, self.dec, i, at, mask, n)
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


# ---- the generation loop ----------------------------------------------------------------------


@dataclass
class GenerationResult:
    ids: list[list[int]]  # generated ids per row (no EOS; a matched stop string removed)
    texts: list[str]
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # per row (n_steps, V): logits of every sampled byte


class _Row:
    def __init__(self, stop_bytes, stream=None):
        self.out = bytearray()
        self.ids: list[int] = []
        self.done = False
        self.stop_bytes = stop_bytes
        self.stream = stream
        self.sent = 0
        self.decoder = StreamDecoder() if stream is not None else None
        self.logits: list[torch.Tensor] = []

    def push(self, tok: int) -> None:
        if tok == EOS_ID:
            self.finish()
            return
        self.ids.append(tok)
        self.out.append(tok - OFFSET)
        for s in self.stop_bytes:
            if self.out.endswith(s):
                del self.out[-len(s) :]
                del self.ids[-len(s) :]
                self.finish()
                return
        self._emit(final=False)

    def finish(self) -> None:
        self.done = True
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.stream is None:
            return
        end = len(self.out)
        if not final:  # hold back a tail that may still become a stop string
            for j in range(min(len(self.out), max((len(s) for s in self.stop_bytes), default=1) - 1), 0, -1):
                tail = bytes(self.out[-j:])
                if any(s.startswith(tail) for s in self.stop_bytes):
                    end -= j
                    break
        piece = self.decoder.push([b + OFFSET for b in self.out[self.sent : end]])
        self.sent = max(self.sent, end)
        if final:
            piece += self.decoder.flush()
        if piece:
            self.stream(piece)


def _row_seeds(n, seed, device) -> torch.Tensor:
    """Row b samples with seed + b (a random seed when None), in a batch or alone."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.arange(n, dtype=torch.int64, device=device) + seed


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new: int = 300,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=DEFAULT_STOP,
    stream=None,
    return_logits: bool = False,
    compile: bool = False,
    threads: int | None = None,
) -> GenerationResult:
    """The cached generation loop over token-id prompts (see `generate` for the arguments).
    On KeyboardInterrupt the rows are finished first (`stream` gets every byte sampled so
    far, a held-back tail included), then it propagates."""
    check_sampling_args(max_new, temperature, top_k, top_p)
    check_seed(seed, len(prompts))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (None: chosen while running), got {threads!r}")
    stop_bytes = _stop_bytes(stop)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        B = len(prompts)
        rows = [_Row(stop_bytes, stream if b == 0 else None) for b in range(B)]
        seeds = _row_seeds(B, seed, device) if temperature > 0 else None
        eng = Engine(model, prompts, max_new, compile=compile, threads=threads)
        try:
            with restored_threads():  # the engine picks its own (ThreadChooser)
                if eng.compiled and not return_logits:
                    n_bytes = _decode_pipelined(eng, rows, max_new, (temperature, top_k, top_p), seeds)
                else:
                    n_bytes = _decode(eng, rows, max_new, (temperature, top_k, top_p), seeds, return_logits)
        finally:  # also on KeyboardInterrupt: a stream gets what was held back
            for r in rows:
                if not r.done:
                    r.finish()
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    stats = GenerationStats(n_bytes, seconds, n_bytes / seconds if seconds > 0 else 0.0, eng.patches, eng.global_steps)
    texts = [bytes(r.out).decode("utf-8", errors="replace") for r in rows]
    lg = [torch.stack(r.logits) if r.logits else torch.empty(0, VOCAB_SIZE) for r in rows] if return_logits else None
    return GenerationResult([r.ids for r in rows], texts, stats, lg)


def _push(rows, live, toks) -> int:
    """Give each live, unfinished row its sampled byte -> bytes of text added (EOS is not)."""
    n = 0
    for r, t in zip(live, toks):
        if not rows[r].done:  # compiled engines keep finished rows in the batch
            n += t != EOS_ID
            rows[r].push(t)
    return n


def _decode(eng, rows, max_new, sampling, seeds, return_logits) -> int:
    """The step-by-step loop: sample on the host's request, feed, drop finished rows."""
    live = list(range(len(rows)))  # engine row -> original row
    logits = eng.prefill() if max_new > 0 else None
    temperature, top_k, top_p = sampling
    n_bytes = 0
    for s in range(max_new):
        tok = sample_next(logits, temperature, top_k, top_p, None if seeds is None else seeds[live], s)
        if return_logits:
            for e, r in enumerate(live):
                if not rows[r].done:
                    rows[r].logits.append(logits[e].detach().float().cpu())
        n_bytes += _push(rows, live, tok.tolist())
        if s == max_new - 1:
            break
        still = [e for e, r in enumerate(live) if not rows[r].done]
        if not still:
            break
        if len(still) < len(live) and not eng.compiled:
            eng.keep(still)
            live = [live[e] for e in still]
            tok = tok[still]
        eng.active = [not rows[r].done for r in live]
        logits = timed_step(eng, tok)
    return n_bytes


def timed_step(eng, ids) -> torch.Tensor:
    """eng.step(ids); on CPU on the threads eng.choosers["step"] picks (torch.set_num_threads:
    run the loop inside restored_threads()), timing the step for it unless it completed a
    patch (those run the global model too: not comparable)."""
    if eng.device.type != "cpu":
        return eng.step(ids)
    chooser = eng.choosers["step"]
    if chooser.threads != torch.get_num_threads():
        torch.set_num_threads(chooser.threads)
    before, t0 = eng.global_steps, time.perf_counter()
    logits = eng.step(ids)
    chooser.record(time.perf_counter() - t0, comparable=eng.global_steps == before)
    return logits


class _HostCopy:
    """A step's (2,B) result on its way to the host: copied into pinned memory behind the
    step on the GPU's stream, read when the next step has been launched."""

    def __init__(self, out: torch.Tensor):
        self.event = None
        if out.is_cuda:
            self.host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.host.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out.clone()

    def get(self) -> tuple[list[int], list[bool]]:
        if self.event is not None:
            self.event.synchronize()
        toks, flags = self.host.tolist()
        return toks, [bool(f) for f in flags]


def pipelined(eng, n: int):
    """Launch n sampled steps (eng.launch()); yield each one's (bytes, flags) on the host once
    the next has been launched, so the host never holds the device up. The caller passes the
    flags to eng.note() before asking for the next."""
    pending = deque()
    for _ in range(n):
        pending.append(_HostCopy(eng.launch()))
        if len(pending) > 1:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _decode_pipelined(eng, rows, max_new, sampling, seeds) -> int:
    """The compiled engine's loop: every step samples and feeds the next byte on the device
    (one CUDA graph), and the host reads the bytes one step late (pipelined()). A row's stop is
    seen a step late; the byte sampled meanwhile is dropped. The last byte is sampled without
    being fed. Same bytes as _decode."""
    if max_new == 0:
        return 0
    eng.start_sampling(eng.prefill(), *sampling, seeds)
    live = list(range(len(rows)))
    n_bytes = 0
    for toks, flags in pipelined(eng, max_new - 1):
        n_bytes += _push(rows, live, toks)
        eng.active = [not r.done for r in rows]
        eng.note(flags)
        if all(r.done for r in rows):
            return n_bytes
    temperature, top_k, top_p = sampling
    tok = sample_next(eng.logits_buf, temperature, top_k, top_p, seeds, max_new - 1)
    return n_bytes + _push(rows, live, tok.tolist())


def _stop_bytes(stop) -> list[bytes]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = (stop,)
    return [s.encode("utf-8") for s in stop if s]


def _prompt_ids(prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(i, int) for i in prompts):
        prompts = [prompts]  # one id list
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a non-empty list of strings or a list of id lists")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode(p))
        elif isinstance(p, (bytes, bytearray)):
            out.append(encode(bytes(p)))
        else:
            ids = [int(i) for i in p] or [BOS_ID]
            if any(not 0 <= i < VOCAB_SIZE for i in ids):
                raise ValueError(f"token ids must be in [0, {VOCAB_SIZE})")
            out.append(ids)
    return out


def generate(
    model,
    prompts,
    max_new: int = 300,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=DEFAULT_STOP,
    stream=None,
    return_stats: bool = False,
    compile: bool = False,
    threads: int | None = None,
):
    """Continue each prompt by up to `max_new` bytes; returns the continuations (prompt not
    included), one string per prompt, or (texts, GenerationStats) with return_stats.

    prompts: a string, a list of strings (each encoded as BOS + UTF-8 bytes; "" = BOS alone)
        or a list of token-id lists (used as given).
    temperature: 0 = greedy; top_k: keep the k most likely bytes (0/None: off); top_p:
        nucleus sampling (None/1: off); seed: an integer in [0, 2**63 - rows]: row i samples
        with seed + i (reproducible, and the same bytes as that row alone; see sample_next).
    stop: strings that end a row (not returned); EOS ends a row too.
    stream: callback receiving row 0's text as it is generated, in valid UTF-8 pieces (a
        split multi-byte character, or a tail that may become a stop string, is held back).
    compile: torch.compile(mode="reduce-overhead") the per-byte step functions; CUDA only
        (ignored on other devices).
    threads: CPU threads of the prefill and the per-byte steps (None: 1 or 2, chosen while
        running by timing them: see ThreadChooser); torch's own setting is restored after.

    Prompts of any length: the prefill's time and memory grow linearly with the prompt
    (Engine.prefill), the global model's attention over every patch aside.
    """
    check_sampling_args(max_new, temperature, top_k, top_p)
    res = generate_ids(model, _prompt_ids(prompts), max_new, temperature, top_k, top_p, seed, stop, stream,
                       compile=compile, threads=threads)  # fmt: skip
    return (res.texts, res.stats) if return_stats else res.texts


@torch.no_grad()
def generate_uncached(
    model,
    prompt_ids: list[int],
    max_new: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    return_logits: bool = False,
    backend: str | None = None,
):
    """The plain oracle: for every new byte, patch and run the whole BLT over the entire
    prefix (`model.forward(tokens)`, which patches itself and sets next_starts_patch, so the
    last byte sees exactly what incremental generation sees) and take logits[:, -1].
    Sampling as `generate` for a single row (seeded `seed`). Stops at EOS (not
    returned). Returns the new ids, or (ids, (n, V) logits) with return_logits. backend: the
    forward's mask backend (None: the device's default; "dense" avoids FlexAttention compiling
    anew for every length on CUDA)."""
    check_sampling_args(max_new, temperature, top_k, top_p)
    check_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        seeds = _row_seeds(1, seed, device) if temperature > 0 else None
        ids = list(prompt_ids) or [BOS_ID]
        new, all_logits = [], []
        for s in range(max_new):
            t = torch.tensor([ids], device=device)
            if backend is None:  # exactly model.forward(tokens)
                logits = model(t).logits[:, -1]
            else:  # the same, with the entropy model's mask in that backend too
                lengths, nsp = _patch(model, t, backend)
                logits = model(t, patch_lengths=lengths, next_starts_patch=nsp, backend=backend).logits[:, -1]
            if return_logits:
                all_logits.append(logits[0].float().cpu())
            t = int(sample_next(logits, temperature, top_k, top_p, seeds, s)[0])
            if t == EOS_ID:
                break
            new.append(t)
            ids.append(t)
    finally:
        model.train(was_training)
    if return_logits:
        return new, torch.stack(all_logits) if all_logits else torch.empty(0, VOCAB_SIZE)
    return new


def _patch(model, t, backend):
    """BLT.patch(t) with the entropy model's causal mask built for `backend`."""
    pc, H = model.cfg.patcher, None
    if pc.needs_entropy:
        em = model.entropy_model
        H = entropy(em(t, mask=M.causal_mask(t.shape[1], em.cfg.window, backend, t.device)))
    starts = patch_starts(t, pc, H)
    return lengths_from_starts(starts[:, : t.shape[1]]), starts[:, t.shape[1]]


# ---- CLI --------------------------------------------------------------------------------------


def _seed_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use an integer in [0, 2**63 - 1]")
    return value


def _threads_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use an integer >= 1")
    return value


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument: one line (argparse's own message, no usage block), status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="python -m blt.generate",
        description="Generate text with a BLT checkpoint. Prints prompt + continuation (UTF-8). "
        "An empty prompt generates from BOS alone. Ctrl-C prints what was generated so far "
        "and exits with status 130.",
    )
    ap.add_argument("--prompt", default="", help="text to continue (default: empty = from BOS alone)")
    ap.add_argument("--max-new", type=int, default=300, help="bytes to generate at most (default 300)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bytes")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    ap.add_argument("--seed", type=_seed_arg, default=None, help="random seed, in [0, 2**63 - 1]")
    ap.add_argument("--stop", action="append", default=None,
                    help=f"stop string (repeatable; default {DEFAULT_STOP[0]!r}); not printed")  # fmt: skip
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="model folder, ours or a transformers BltForCausalLM one "
                         "(default: checkpoints/ beside the blt package)")  # fmt: skip
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="the model's dtype (default float32; bfloat16 halves the memory)")  # fmt: skip
    ap.add_argument("--threads", type=_threads_arg, default=None,
                    help="CPU threads (default: 1 or 2, chosen while running by timing the work: "
                         "a second thread helps on idle cores and is much slower beside a busy process)")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="torch.compile the per-byte steps (CUDA only)")
    ap.add_argument("--stream", action="store_true", help="print bytes as they are generated")
    ap.add_argument("--stats", action="store_true", help="print speed statistics as the last line on stderr")
    return ap


def _stdout_gone() -> int:
    """stdout's reader went away (`generate ... | head`): point stdout at devnull, so that the
    interpreter's own flush at exit raises nothing (Python's docs, "Note on SIGPIPE"), and end
    with the status of a process that SIGPIPE ended, 128 + 13, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        check_sampling_args(args.max_new, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        ap.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (use --device cpu)")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    try:
        return _run(args, device)
    except KeyboardInterrupt:  # before anything was generated
        return 130


def _run(args, device) -> int:
    from blt.checkpoint import CheckpointError
    from blt.model import BLT

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model = BLT.from_pretrained(args.checkpoint, device=device, dtype=DTYPES.get(args.dtype))
    except CheckpointError as e:
        default = args.checkpoint == str(DEFAULT_CHECKPOINT)
        hint = " (no model there yet: train one, or pass --checkpoint DIR)" if default else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(encoding="utf-8", errors="replace")
    prompt_bytes = os.fsencode(args.prompt)  # the exact argv bytes
    pieces = []  # without --stream, printed at the end (or on Ctrl-C)

    def emit(piece):
        if args.stream:
            out.write(piece)
            out.flush()
        else:
            pieces.append(piece)

    status, res = 0, None
    try:
        out.write(prompt_bytes.decode("utf-8", errors="replace"))
        out.flush()
        try:
            res = generate_ids(
                model, [encode(prompt_bytes)], args.max_new, args.temperature, args.top_k, args.top_p, args.seed,
                stop=DEFAULT_STOP if args.stop is None else tuple(args.stop), stream=emit, compile=args.compile,
                threads=args.threads,
            )  # fmt: skip
        except KeyboardInterrupt:  # generate_ids has streamed every byte so far
            status = 130
        out.write("".join(pieces) + "\n")
        out.flush()
    except BrokenPipeError:
        return _stdout_gone()
    if args.stats and res is not None:
        print(res.stats.line(), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
