"""Sampling the next byte: one batched Gumbel-max draw per byte from counter-based noise.

Not in the paper, which evaluates generation but describes no sampler (BLT_LLM.md §14,
"Sampling"). sample_next draws every row at once by the Gumbel-max trick, argmax(logits/T +
Gumbel noise) over the logits top-k/top-p leave: an exact sample of the restricted softmax.
The noise is a hash of (row seed, byte index, byte value) (row_uniforms; row seed = seed +
row: row_seeds), so a row samples the same bytes in a batch as alone, there is no generator
state, and a CUDA graph can replay the draw (the compiled engine samples inside its graph).

The sampler never emits the ids BOE, BOS and BPE (they are not text); EOS ends a row.
check_sampling_args and check_seed are the one-line checks of the settings, shared by the
generation functions and the CLI.
"""

from __future__ import annotations

import math

import torch

from blt.tokens import BOE_ID, BOS_ID, BPE_ID

NEVER_SAMPLED = (BOE_ID, BOS_ID, BPE_ID)
SEED_MAX = 2**63 - 1  # row seeds (seed + row) are int64


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


def row_seeds(n, seed, device) -> torch.Tensor:
    """Row b samples with seed + b (a random seed when None), in a batch or alone."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.arange(n, dtype=torch.int64, device=device) + seed
