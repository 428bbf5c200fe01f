"""blt.patch_runs's kernels alone, at the bench preset's shapes, one GPU: microseconds per call of
each forward and backward, for several warp counts, patches per program and chunk sizes (patch_runs's
NUM_WARPS, PATCHES_PER_PROGRAM, BYTES_PER_CHUNK).

    python bench/patch_kernels.py [--batch-size 8] [--seq-len 4096] [--warps 4 1 2 8] [--patches 16] [--chunk 32]

Patch lengths are drawn uniformly from 1..8 bytes (4.5 on average, as the paper's patcher is
calibrated to). Each operation is called `--calls` times inside one CUDA graph, so that launch
overhead does not count; the median of 11 replays is printed. The same inputs are read on every
call, so they stay in L2 cache where they fit (50 MB on an H200): inside a training step the
kernels read them from memory and take longer. `--cold` overwrites a 256 MB buffer before each
call (and subtracts the time that takes), so that every call reads its inputs from memory.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt import masks as M  # noqa: E402
from blt import patch_runs as R  # noqa: E402


def graph_us(fn, calls: int, flush: torch.Tensor | None = None) -> float:
    """Median microseconds per call of fn, `calls` calls captured in one CUDA graph; with `flush`,
    that buffer is zeroed before each call (evicting the L2 cache), the zeroing included."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernel) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            if flush is not None:
                flush.zero_()
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(11):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(1e3 * a.elapsed_time(b) / calls)
    return sorted(times)[5]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=2, help="patch slots (cross_attn_k)")
    ap.add_argument("--dim", type=int, default=384, help="features of the max-pool")
    ap.add_argument("--warps", type=int, nargs="+", choices=(1, 2, 4, 8, 16), default=[4, 1, 2, 8])
    ap.add_argument("--patches", type=int, nargs="+", default=[R.PATCHES_PER_PROGRAM],
                    help="patches per program of the cross-attention kernels (patch_runs.PATCHES_PER_PROGRAM)")
    ap.add_argument("--chunk", type=int, nargs="+", default=[R.BYTES_PER_CHUNK],
                    help="bytes per chunk of their loops, at least 16 (patch_runs.BYTES_PER_CHUNK)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--cold", action="store_true", help="evict the L2 cache before each call")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not R.available("cuda"):
        sys.exit("error: this benchmark needs a CUDA GPU and Triton")
    B, T, H, D, k = args.batch_size, args.seq_len, args.heads, args.head_dim, args.k
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (B, T), generator=g)
    lengths = torch.where(lengths.cumsum(1) <= T, lengths, 0)
    lengths[torch.arange(B), (lengths > 0).sum(1)] = T - lengths.sum(1)  # a last patch ends each row at T
    P = int((lengths > 0).sum(1).max())
    lengths = lengths[:, :P].cuda()
    ids = M.patch_ids_from_lengths(lengths, T)
    enc_start, enc_end = M.runs(ids, P)
    dec_start, dec_end = M.runs(M.decoder_patch_ids(ids), P)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    q, kk, v, grad = randn(B, T, H, D), randn(B, P * k, H, D), randn(B, P * k, H, D), randn(B, T, H, D)
    qe, ke, ve, grad_e = randn(B, P * k, H, D), randn(B, T, H, D), randn(B, T, H, D), randn(B, P * k, H, D)
    x = randn(B, T, args.dim)
    scale = D**-0.5
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  B={B} T={T} P={P} "
          f"({B * T / int((lengths > 0).sum()):.2f} bytes/patch) heads {H}x{D} k={k} bf16")  # fmt: skip

    def ops():
        out_e, lse = R.patch_byte_attention(qe, ke, ve, enc_start, enc_end, scale)
        pooled = R.patch_max(x, enc_start, enc_end)
        grad_p = torch.randn_like(pooled)
        return {
            "decoder fwd": lambda: R.byte_patch_attention(q, kk, v, dec_start, dec_end, scale),
            "decoder bwd": lambda: R.byte_patch_attention_backward(q, kk, v, dec_start, dec_end, scale, grad),
            "encoder fwd": lambda: R.patch_byte_attention(qe, ke, ve, enc_start, enc_end, scale),
            "encoder bwd": lambda: R.patch_byte_attention_backward(qe, ke, ve, enc_start, enc_end, scale, out_e, lse, grad_e),
            "max-pool fwd": lambda: R.patch_max(x, enc_start, enc_end),
            "max-pool bwd": lambda: R.patch_max_backward(x, enc_start, enc_end, pooled, grad_p),
        }  # fmt: skip

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if args.cold else None
    flush_us = graph_us(flush.zero_, args.calls) if args.cold else 0.0  # subtracted from each time
    names = list(ops())
    print(f"{'patches':>7s} {'chunk':>5s} {'warps':>5s} " + " ".join(f"{n:>13s}" for n in names)
          + f"   (µs per call, {'cold' if args.cold else 'warm'} L2)")  # fmt: skip
    for patches, chunk, warps in itertools.product(args.patches, args.chunk, args.warps):
        R.PATCHES_PER_PROGRAM, R.BYTES_PER_CHUNK, R.NUM_WARPS = patches, chunk, warps
        times = " ".join(f"{graph_us(fn, args.calls, flush) - flush_us:13.1f}" for fn in ops().values())
        print(f"{patches:7d} {chunk:5d} {warps:5d} {times}", flush=True)


if __name__ == "__main__":
    main()
