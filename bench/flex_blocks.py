"""FlexAttention kernel choices for the BLT's four attention shapes, one GPU.

    python bench/flex_blocks.py [--batch-size 8] [--seq-len 4096] [--bytes-per-patch 4.5]
                                [--no-autotune] [--only "FLASH backend"]

The `bench` preset's attentions at B=8 × 4096 bytes, with masks from blt.masks for random
patches of the given mean size: byte self-attention (window 512, 6 heads), global
self-attention (causal over patches, 12 heads), encoder cross-attention (k = 2 queries per
patch over its bytes) and decoder cross-attention (bytes over the k slots of their patch).
Each runs forward + backward, compiled, with the default kernel choice, with a few fixed
`kernel_options` (forward tiles BLOCK_M × BLOCK_N; backward tiles BLOCK_M1/N1 for dK/dV
and BLOCK_M2/N2 for dQ), with the forward tiles of the fastest forward joined to the
backward tiles of the fastest backward, with FlexAttention's FLASH backend where its package
is installed, and with inductor's own search (max-autotune). The two self-attentions also run on
FlashAttention-4's own causal kernels (blt.fa4, `--attention fa4`; no FlexAttention).
Prints the kernels' GPU time of each, how far its output and gradients are from the default
choice's, and the fastest fixed choice per shape.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt import fa4  # noqa: E402
from blt import masks as M  # noqa: E402
from blt.config import bench  # noqa: E402

FA4 = "fa4"  # the choice that runs blt.fa4 instead of FlexAttention

CHOICES = {
    "default": {},
    "fwd 128x64 w4 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd 128x128 w8 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "fwd 64x64 w4 s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd 64x128 w4 s2": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "bwd 64/64 64/64": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64),
    "bwd 64/128 128/64": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64),
    "bwd 32/128 128/32": dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32),
    # FlashAttention-4's CuTe kernels instead of Triton's (experimental in torch; needs the
    # optional flash-attn-4 package, else this choice reports that it failed)
    "FLASH backend": dict(BACKEND="FLASH"),
    # FlashAttention-4's own causal kernels (blt.fa4), self-attentions only; same package
    "FlashAttention-4 causal": FA4,
}


def random_patch_lengths(B: int, T: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """(B, P) lengths summing to T per row: BOS alone, then sizes 1 + Poisson(mean - 1)."""
    rows = []
    for _ in range(B):
        sizes = (1 + torch.poisson(torch.full((T,), mean - 1.0), generator=gen)).long()
        ends = torch.cumsum(sizes, 0)
        row = [1] + sizes[ends < T - 1].tolist()
        row.append(T - sum(row))
        rows.append(row)
    P = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (P - len(r)) for r in rows])


def fwd_bwd_ms(q, k, v, mask, options, mode, window=None, steps=20) -> tuple[float, float, tuple]:
    """GPU time of the forward and the backward kernels, in ms per call, and the output with
    its gradients. Kernel time, not wall time: at these sizes the host's per-call work would
    hide the kernels' differences. options FA4: blt.fa4's causal kernels with this window."""
    # the block mask goes in as an argument, as layers._flex passes it
    torch._dynamo.reset()
    fn = torch.compile(flex_attention, mode=mode, dynamic=False)
    if options == FA4:
        fn = lambda q, k, v, block_mask, kernel_options: fa4.attention(q, k, v, window)  # noqa: E731
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.shape, dtype=q.dtype, device=q.device, generator=torch.Generator(q.device).manual_seed(1))

    def run():  # autograd.grad, not backward: no kernels adding into .grad
        out = fn(q, k, v, block_mask=mask, kernel_options=options or None)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))

    results = run()
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    fwd = bwd = 0.0  # every kernel of the call (the backward's preprocessing too), split by name
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.is_user_annotation:
            continue
        if "backward" in e.name.lower() or "bwd" in e.name.lower():
            bwd += e.device_time
        else:
            fwd += e.device_time
    return fwd / 1e3 / steps, bwd / 1e3 / steps, results


def max_error(results, reference) -> float:
    """Largest absolute difference of output, dq, dk and dv, relative to the reference's scale."""
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
               for a, b in zip(results, reference))  # fmt: skip


def combined(times: dict, choices: dict) -> dict | None:
    """The forward tiles of the fastest forward and the backward tiles of the fastest backward."""
    tiles = lambda options: isinstance(options, dict) and options and "BACKEND" not in options  # noqa: E731
    fixed = {label: choices[label] for label in times if tiles(choices.get(label))}
    if not fixed:
        return None
    fwd = min(fixed, key=lambda label: times[label][0])
    bwd = min(fixed, key=lambda label: times[label][1])
    out = {key: val for key, val in choices[fwd].items() if key in ("BLOCK_M", "BLOCK_N")}
    out.update({key: val for key, val in choices[bwd].items() if key in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")})
    return out or None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--bytes-per-patch", type=float, default=4.5)
    ap.add_argument("--no-autotune", action="store_true", help="skip inductor's max-autotune search")
    ap.add_argument("--only", metavar="LABEL", action="append", choices=list(CHOICES),
                    help="measure only this choice (repeatable; the default choice is always measured)")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    dev, B, T = "cuda", args.batch_size, args.seq_len
    cfg, gen = bench(), torch.Generator().manual_seed(0)
    lengths = random_patch_lengths(B, T, args.bytes_per_patch, gen)
    lengths = torch.nn.functional.pad(lengths, (0, -lengths.shape[1] % 128)).to(dev)  # as --one-graph pads
    P, k = lengths.shape[1], cfg.cross_attn_k
    pid = M.patch_ids_from_lengths(lengths, T)
    M.set_patch_kernels(False)  # the cross-attentions as FlexAttention block masks, not blt.patch_runs
    masks = M.build_masks(pid, M.decoder_patch_ids(pid, None), P, k, cfg.encoder.window, cfg.decoder.window,
                          cfg.global_model.window, None, None, "flex")  # fmt: skip
    e, g = cfg.encoder, cfg.global_model
    shapes = {  # name: (mask, heads, queries, keys, causal window: None = all, False = not causal)
        f"byte self (window {e.window})": (masks.enc_self, e.n_heads, T, T, e.window),
        "global self (causal)": (masks.patch_self, g.n_heads, P, P, g.window),
        "encoder cross": (masks.enc_cross, e.n_heads, P * k, T, False),
        "decoder cross": (masks.dec_cross, e.n_heads, T, P * k, False),
    }
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  B={B} T={T} P={P} (padded) bf16")
    print("kernel time per call (ms): forward + backward = total; error: largest difference of the output and")
    print("its gradients from the default choice's, relative to the largest value")
    for name, (mask, H, Q, K, window) in shapes.items():
        q = torch.randn(B, H, Q, e.head_dim, device=dev, dtype=torch.bfloat16)
        kv = [torch.randn(B, H, K, e.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        choices, times, reference = dict(CHOICES), {}, None
        if args.only:
            choices = {label: choices[label] for label in choices if label == "default" or label in args.only}
        if window is False or not fa4.available():
            choices = {label: options for label, options in choices.items() if options != FA4}

        def measure(label):
            nonlocal reference
            options = choices[label]
            mode = "max-autotune-no-cudagraphs" if options is None else None
            try:
                f, b, results = fwd_bwd_ms(q, *kv, mask, options, mode, window)
                times[label] = f, b
                reference = reference or results
                error = max_error(results, reference)
                print(f"{name:24s} {label:20s} {f:7.3f} + {b:7.3f} = {f + b:7.3f}  error {error:.1e}", flush=True)
            except Exception as err:  # an option the kernel cannot take (e.g. too much shared memory)
                print(f"{name:24s} {label:20s} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)

        for label in list(choices):
            measure(label)
        mix = combined(times, choices)
        if mix and mix not in choices.values():
            choices["best fwd+bwd"] = mix
            measure("best fwd+bwd")
        if not args.no_autotune:
            choices["max-autotune"] = None
            measure("max-autotune")
        fixed = [label for label in times if choices[label] is not None]
        if fixed:
            best = min(fixed, key=lambda label: sum(times[label]))
            base = sum(times.get("default", (float("nan"),) * 2))
            print(f"{name:24s} fastest fixed: {best} {choices[best]} ({sum(times[best]):.3f} ms; default {base:.3f} ms)")


if __name__ == "__main__":
    main()
