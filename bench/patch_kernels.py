"""The one-patch cross-attentions and the max-pool alone: blt.patch_runs's kernels against
FlexAttention and scatter_reduce, at the bench preset's shapes, one GPU.

    python bench/patch_kernels.py [--batch-size 8] [--seq-len 4096] [--blocks 4 8 16] [--warps 2 4 8]

Patch lengths are drawn uniformly from 1..8 bytes (4.5 on average, as the paper's patcher is
calibrated to). Prints the median time of the forward and of forward + backward of each
operation: the decoder's bytes reading their patch's k slots, the encoder's patch queries
reading their bytes, the max-pool; for each kernel block size (RUN_BLOCK) and warp count.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt import masks as M  # noqa: E402
from blt import patch_runs  # noqa: E402
from blt.encoder import max_pool_patches  # noqa: E402
from blt.layers import attend  # noqa: E402


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=2, help="patch slots (cross_attn_k)")
    ap.add_argument("--dim", type=int, default=384, help="features of the max-pool")
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")
    B, T, H, D, k = args.batch_size, args.seq_len, args.heads, args.head_dim, args.k
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (B, T), generator=g)
    lengths = torch.where(lengths.cumsum(1) <= T, lengths, 0)
    n = (lengths > 0).sum(1)
    lengths[torch.arange(B), n] = T - lengths.sum(1)  # a last patch ends each row at T
    P = int((lengths > 0).sum(1).max())
    lengths = lengths[:, :P].cuda()
    ids = M.patch_ids_from_lengths(lengths, T)
    dec = M.decoder_patch_ids(ids)
    M.set_patch_kernels(False)
    flex = M.build_masks(ids, dec, P, k, None, None, None, None, None, "flex")
    M.set_patch_kernels(True)
    runs = M.build_masks(ids, dec, P, k, None, None, None, None, None, "flex")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  B={B} T={T} P={P} "
          f"({B * T / int((lengths > 0).sum()):.2f} bytes/patch) heads {H}x{D} k={k} bf16")  # fmt: skip

    def tensors(Q, K):  # the layout the projections give: (B, L, H, D) viewed as (B, H, L, D)
        q = torch.randn(B, Q, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        kv = [torch.randn(B, K, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(2)]
        return q, *kv

    x = torch.randn(B, T, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases = {
        "decoder cross-attention": (tensors(T, P * k), flex.dec_cross, runs.dec_cross),
        "encoder cross-attention": (tensors(P * k, T), flex.enc_cross, runs.enc_cross),
    }

    def timings(fwd, inputs):
        out = fwd()
        grad = torch.randn_like(out)
        return median_ms(fwd, args.iters), median_ms(lambda: torch.autograd.grad(fwd(), inputs, grad), args.iters)

    rows = []
    for name, (inputs, mask_flex, _) in cases.items():
        rows.append((name, "FlexAttention", *timings(lambda: attend(*inputs, mask_flex, cross=True), inputs)))
    rows.append(("max-pool", "scatter_reduce", *timings(lambda: max_pool_patches(x, ids, P), [x])))
    for block in args.blocks:
        for warps in args.warps:
            patch_runs.RUN_BLOCK, patch_runs.NUM_WARPS = block, warps
            how = f"kernel, block {block}, {warps} warps"
            for name, (inputs, _, mask_runs) in cases.items():
                rows.append((name, how, *timings(lambda: attend(*inputs, mask_runs, cross=True), inputs)))
            rows.append(("max-pool", how, *timings(lambda: max_pool_patches(x, ids, P, runs.enc_cross), [x])))
    print(f"{'operation':26s} {'how':30s} {'forward µs':>11s} {'fwd+bwd µs':>11s}")
    for name, how, fwd, both in sorted(rows, key=lambda r: r[0]):
        print(f"{name:26s} {how:30s} {1e3 * fwd:11.1f} {1e3 * both:11.1f}")


if __name__ == "__main__":
    main()
