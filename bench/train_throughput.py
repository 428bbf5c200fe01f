"""Training throughput: our BLT vs transformers' BltForCausalLM, same shapes, one GPU.

    python bench/train_throughput.py [--batch-size 8] [--seq-len 4096] [--steps 10] [--warmup 3]

Both models get the `bench` preset's shapes (encoder 1x384, global 6x768, decoder 4x384, k=2,
hash n=3..8 with 50,002 rows, entropy model 4x256 with FFN 768), the same weights (converted), bf16
autocast, AdamW, random bytes, and patches from the same entropy model at the same
threshold (calibrated to ~4.5 bytes/patch): each timed step includes the entropy model's
forward (not with --precomputed-entropies), the BLT forward/backward and the optimizer step.
Prints bytes/s, MFU (the step's model FLOPs from blt.flops over the H200's 989 TFLOP/s dense
bf16 peak), peak memory and the ratio.

Ours runs twice: compiled stack by stack (dynamic shapes), and as `blt.train --one-graph
--tune-kernels` runs it: the patcher as one CUDA graph, then the whole forward and loss as
another on patch counts padded to a multiple of 128 (Patching.padded), the global transformer
on packed rows (--no-pack-patches: on the padded rows). Each row also gives
the first step's time, compilation included. `--attention flash` and `--attention fa4` run the
one-graph variant's self-attentions on FlashAttention-4's kernels (through FlexAttention, or its
own causal ones), as `blt.train --attention` does (optional flash-attn-4 package).
"""

import argparse
import ast
import copy
import gzip
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt.adamw import AdamW  # noqa: E402
from blt.config import bench  # noqa: E402
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.flops import blt_flops_per_byte  # noqa: E402
from blt.layers import FLEX_BACKENDS, set_flex_backend, set_fused_products  # noqa: E402
from blt.masks import BLOCK, set_patch_kernels  # noqa: E402
from blt.model import BLT  # noqa: E402
from blt.one_graph import PATCH_PAD, OneGraph  # noqa: E402
from blt.packing import aligned_slot_count, row_patch_counts  # noqa: E402
from blt.patcher import calibrate_threshold  # noqa: E402

PEAK_BF16 = 989e12


def timed(step, steps, warmup):
    """-> (seconds per step, peak GiB, seconds of the first step: compilation included)."""
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated() / 2**30, first


def profile(step, sec, out: Path | None = None):
    """The top CUDA kernels and host ops of three steps, kernel time per step by kind, and how
    long the GPU idles per step in steady state: between the end of the first step's optimizer
    and the end of the third's, where the GPU runs as in the timed loop (the first step starts on
    an empty queue, after a sync). With `out`, also writes every kernel's row (kernels.txt), the
    kernels by compiled graph (kernels_by_graph.txt) and the timeline (trace.json.gz) there."""
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=90))
    print(avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.txt").write_text(avg.table(sort_by="self_cuda_time_total", row_limit=-1, max_name_column_width=200))
        prof.export_chrome_trace(str(out / "trace.json"))
        with open(out / "trace.json", "rb") as f, gzip.open(out / "trace.json.gz", "wb") as z:
            z.write(f.read())
        (out / "trace.json").unlink()
        by_graph = sorted(kernels_by_graph(prof.events()).items(), key=lambda kv: -kv[1][0])
        (out / "kernels_by_graph.txt").write_text(
            "".join(f"{t / steps:10.1f} µs/step {n / steps:5.1f} calls  {g}  {name}\n" for (g, name), (t, n) in by_graph)
        )  # fmt: skip
    # kernels only: the GPU-side spans of annotations (e.g. "Optimizer.step") would count twice
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    groups: dict[str, float] = {}
    for e in kernels:
        groups[kernel_kind(e.name)] = groups.get(kernel_kind(e.name), 0.0) + e.device_time / (1e3 * steps)
    print("  ".join(f"{k} {v:.2f} ms" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
    busy = sum(groups.values())
    print(f"profiled: {busy:.1f} ms of CUDA kernels per step against {1e3 * sec:.1f} ms of wall time")
    ends = sorted(e.time_range.end for e in kernels if kernel_kind(e.name) == "optimizer")
    if len(ends) >= steps and len(ends) % steps == 0:
        lo, hi = ends[len(ends) // steps - 1], ends[-1]
        idle = gaps([(e.time_range.start, e.time_range.end) for e in kernels], lo, hi) / (1e3 * (steps - 1))
        print(f"GPU idle in steady state: {idle:.2f} ms a step")


def kernels_by_graph(events) -> dict[tuple[str, str], tuple[float, int]]:
    """Kernel time (µs) and launches by (compiled graph, kernel name). Inductor names kernels
    uniquely only within a graph (triton_poi_fused_0 is in nearly every one), so the profile's
    per-name table adds different kernels together. Each CPU event lists the kernels it
    launched (a CUDA graph's replay all of its own); the graph is its nearest enclosing
    "## Call CompiledFxGraph <hash> ##" range ("eager" outside any)."""
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for e in events:
        if not e.kernels:
            continue
        graph, up = "eager", e
        while up is not None:
            if up.name.startswith("## Call CompiledFxGraph"):
                graph = up.name.split()[3][:12]
                break
            up = up.cpu_parent
        for k in e.kernels:
            total, count = out.get((graph, k.name), (0.0, 0))
            out[graph, k.name] = (total + k.duration, count + 1)
    return out


def gaps(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Time in lo..hi covered by none of the (start, end) spans."""
    covered, reach = 0.0, lo
    for a, b in sorted(spans):
        b = min(b, hi)
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return (hi - lo) - covered


def kernel_kind(name: str) -> str:
    """A coarse class of a CUDA kernel by its name, for the per-step time breakdown."""
    n = name.lower()
    if "flex" in n or "tem_fused" in n or "flash_attn" in n:  # Triton's or FlashAttention-4's
        return "attention"
    if n.startswith(("_bytes_read_patches", "_patches_read_bytes")):  # blt.patch_runs's cross-attentions
        return "attention"
    if n.startswith(("_patch_max", "_rotate_heads", "_swiglu")):  # blt.patch_runs's max-pooling, blt.fused_outputs
        return "fused pointwise/reduction"
    if any(w in n for w in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "cublas")):
        return "matmul"
    if "adam" in n:
        return "optimizer"
    if n.startswith("triton"):
        return "fused pointwise/reduction"
    if "memcpy" in n or "memset" in n:
        return "copies"
    return "other"


def random_batch(B, T, device):
    x = torch.randint(4, 260, (B, T + 1), device=device)
    x[:, 0] = 1
    return x[:, :-1], x[:, 1:]


def adamw(model, kind: str = "blt"):
    """AdamW as blt.train makes it on CUDA ("blt": blt.adamw's one-launch kernel), torch's fused
    kernel ("fused"), or torch's foreach code for torch.compile ("compiled")."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "blt":
        return AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=kind == "fused",
                             foreach=kind == "compiled" or None)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of our step")
    ap.add_argument("--profile-out", type=Path, metavar="DIR",
                    help="profile, and also write the one-graph step's full kernel table and timeline to DIR")  # fmt: skip
    ap.add_argument("--skip-graphs", action="store_true", help="skip the --one-graph (CUDA graphs) variant of ours")
    ap.add_argument("--skip-modules", action="store_true", help="skip the per-module compiled variant of ours")
    ap.add_argument("--no-tune-kernels", action="store_true",
                    help="compile the one graph as blt.train --one-graph does by default: without --tune-kernels")  # fmt: skip
    ap.add_argument("--autotune", action="store_true", help="compile the one graph with inductor's max-autotune")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set a torch._inductor.config option (Python literal), e.g. combo_kernels=True")  # fmt: skip
    ap.add_argument("--patch-pad", type=int, default=PATCH_PAD,
                    help="the one graph's patch count is padded to a multiple of this, as blt.train --patch-pad")  # fmt: skip
    ap.add_argument("--pack-patches", action=argparse.BooleanOptionalAction, default=None,
                    help="our global transformer on packed rows, as blt.train --pack-patches (default as there: "
                         "on for the one-graph variant, off for the per-module one)")  # fmt: skip
    ap.add_argument("--precomputed-entropies", action="store_true",
                    help="patch from entropies computed before the timed steps, as blt.train --precomputed-entropies "
                         "(no entropy model in the step); transformers then gets the same patches as patch_lengths")  # fmt: skip
    ap.add_argument("--bf16-residual", action="store_true",
                    help="our byte-level residual stream in bf16, as blt.train --bf16-residual")  # fmt: skip
    ap.add_argument("--no-patch-kernels", action="store_true",
                    help="run the one-patch cross-attentions and the max-pooling on FlexAttention and "
                         "scatter_reduce, not on blt.patch_runs's kernels (ours only)")  # fmt: skip
    ap.add_argument("--fused-products", action="store_true",
                    help="ours with blt.train --fused-products: products that share a normalised input as one, "
                         "norm gains folded into them")  # fmt: skip
    ap.add_argument("--optimizer", choices=("blt", "fused", "compiled"), default="blt",
                    help="the one-graph variant's AdamW: blt.adamw's one-launch kernel (as blt.train on CUDA), "
                         "torch's fused kernel, or torch's foreach code compiled")  # fmt: skip
    ap.add_argument("--attention", choices=FLEX_BACKENDS, default="triton",
                    help="the self-attentions' kernels in the one-graph variant, as blt.train --attention")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    try:
        set_flex_backend(args.attention)  # checks that the package is there
    except ValueError as err:
        sys.exit(f"--attention: {err}")
    set_flex_backend("triton")  # until the one-graph variant: the FLASH kernels need static shapes
    set_patch_kernels(not args.no_patch_kernels)
    set_fused_products(args.fused_products)
    args.profile = args.profile or args.profile_out is not None
    if args.patch_pad < 1:
        sys.exit("--patch-pad must be >= 1")
    inductor = {}  # also passed to OneGraph, whose own options would otherwise win
    for item in args.inductor:
        key, _, value = item.partition("=")
        target = torch._inductor.config
        *parents, leaf = key.split(".")
        for name in parents:
            target = getattr(target, name)
        if not hasattr(target, leaf):
            sys.exit(f"--inductor: torch._inductor.config has no option {key!r}")
        try:
            inductor[key] = ast.literal_eval(value)
            setattr(target, leaf, inductor[key])
        except (ValueError, SyntaxError):
            sys.exit(f"--inductor: {item!r} is not KEY=VALUE with a Python literal VALUE")
    dev = "cuda"
    B, T = args.batch_size, args.seq_len
    torch.manual_seed(0)
    cfg = bench()
    # the layout of the released weights, so that the same weights load into BltForCausalLM; and,
    # as that port, no document masking (nor is there a document boundary in random_batch's rows)
    cfg.cross_attn_double_residual, cfg.hash_embed_mean, cfg.doc_mask = True, False, False
    entropy_model = EntropyModel(cfg.entropy_model).to(dev)
    x, y = random_batch(B, T, dev)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        H = entropy_model.entropies(x)
    cfg.patcher.threshold, achieved = calibrate_threshold(H.float(), x, cfg.patcher, 4.5)
    init = BLT(cfg, copy.deepcopy(entropy_model)).to(dev)
    with torch.no_grad():
        patching = init.patch(x)
    bpp, real = patching.bytes_per_patch, int((patching.patch_lengths > 0).sum())
    padded = patching.padded(args.patch_pad).patch_lengths.numel()
    count = blt_flops_per_byte(cfg, bpp, T)
    flops = count.train_blt if args.precomputed_entropies else count.train  # the step's own FLOPs
    weights = {k: v.cpu() for k, v in init.state_dict().items()}
    del init

    def fresh() -> BLT:
        """The same weights, on the GPU alone: each variant's peak memory is its own."""
        torch.cuda.empty_cache()
        model = BLT(cfg, copy.deepcopy(entropy_model)).to(dev)
        model.load_state_dict(weights)
        return model

    options = " --bf16-residual" if args.bf16_residual else ""
    options += " --precomputed-entropies" if args.precomputed_entropies else ""
    options += " --no-patch-kernels" if args.no_patch_kernels else ""
    options += " --fused-products" if args.fused_products else ""
    options += f" --optimizer {args.optimizer}" if args.optimizer != "blt" else ""
    options += "".join(f" --inductor {item}" for item in args.inductor)
    given = (patching.patch_lengths, patching.next_starts_patch) if args.precomputed_entropies else (None, None)
    rows = []
    if not args.skip_modules:
        model = fresh()
        model.pack_patches, model.encoder.autocast_residual = bool(args.pack_patches), args.bf16_residual
        if not args.no_compile:
            for part in (model.encoder, model.global_model, model.decoder):
                part.compile(dynamic=True)
            model.entropy_model.compile(dynamic=False)  # its input is always (B, T)
        opt = adamw(model)

        def ours_step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(x, y, *given).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec, mem, first = timed(ours_step, args.steps, args.warmup)
        name = "ours, per-module compile" + (" --pack-patches" if args.pack_patches else "") + options
        rows.append((name, B * T / sec, mem, first))
        print(f"{name}: {B * T / sec:,.0f} bytes/s, peak {mem:.1f} GiB, first step {first:.0f} s", flush=True)
        if args.profile:
            profile(ours_step, sec)
        del model, opt, ours_step

    if not args.no_compile and not args.skip_graphs:
        # `blt.train --one-graph`: the patcher as one CUDA graph, then the whole forward and
        # loss as another (backward too) on patch counts padded to a multiple of --patch-pad.
        try:
            whole = fresh()
            whole.pack_patches = args.pack_patches is not False  # blt.train --one-graph packs by default
            whole.encoder.autocast_residual = args.bf16_residual
            set_flex_backend(args.attention)
            tune = not args.no_tune_kernels
            one_graph = OneGraph(whole, torch.device(dev), accumulate=False, tune_kernels=tune, autotune=args.autotune,
                                 patch_pad=args.patch_pad, inductor=inductor)  # fmt: skip
            batch = torch.cat([x, y[:, -1:]], dim=1)
            batch = (batch, H.half()) if args.precomputed_entropies else batch  # float16, as the cache stores them
            g_opt = adamw(whole, args.optimizer)
            opt_step = torch.compile(g_opt.step) if args.optimizer == "compiled" else g_opt.step

            def graph_step():
                with torch.autocast("cuda", torch.bfloat16):
                    loss, _ = one_graph(batch, batch)  # the next step's batch is this one
                loss.backward()
                opt_step()
                one_graph.zero_grad(g_opt)

            sec, mem, first = timed(graph_step, args.steps, args.warmup + 2)
            name = f"ours, --one-graph{' --tune-kernels' if tune else ''}{' (max-autotune)' if args.autotune else ''}"
            name += f" --attention {args.attention}" if args.attention != "triton" else ""
            name += f" --patch-pad {args.patch_pad}" if args.patch_pad != PATCH_PAD else ""
            name += (" --no-pack-patches" if args.pack_patches is False else "") + options
            rows.append((name, B * T / sec, mem, first))
            print(f"{name}: {B * T / sec:,.0f} bytes/s, peak {mem:.1f} GiB, first step {first:.0f} s", flush=True)
            if args.profile:
                profile(graph_step, sec, args.profile_out)
            del whole, g_opt, one_graph, graph_step
        except Exception as e:  # report it and carry on with the comparison
            print(f"ours, --one-graph: failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})", flush=True)
            traceback.print_exc()  # the whole story on stderr
        torch._dynamo.reset()  # drop the compiled graphs and their CUDA-graph memory pools
        set_flex_backend("triton")

    if not args.skip_hf:
        from blt.convert_hf import to_hf_model

        hf = to_hf_model(fresh().float()).to(dev)
        torch.cuda.empty_cache()
        hf.train()
        hf.model.patcher.eval()
        hf_opt = adamw(hf)

        def hf_step():
            with torch.autocast("cuda", torch.bfloat16):
                out = hf(input_ids=x, labels=x, patch_lengths=given[0], use_cache=False)
            out.loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        sec, mem, first = timed(hf_step, args.steps, 2)
        rows.append(("transformers BltForCausalLM", B * T / sec, mem, first))

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  B={B} T={T} bf16 autocast")
    print(f"mean bytes/patch {bpp:.2f} (θ={cfg.patcher.threshold:.4f}); model FLOPs/byte (train) {flops / 1e6:.1f}M")
    align = 1 if args.attention == "fa4" else BLOCK  # as the GPU packs (model.packing_align)
    rows_aligned = aligned_slot_count(row_patch_counts(patching.patch_lengths), align)
    packed = -(-int(rows_aligned) // args.patch_pad) * args.patch_pad
    print(f"patches: {real} real; the one graph's global transformer runs on {padded} as (B, P) padded to a "
          f"multiple of {args.patch_pad} ({100 * (1 - real / padded):.1f}% padding), {packed} packed "
          f"({100 * (1 - real / packed):.1f}%)")  # fmt: skip
    print(f"{'model':60s} {'bytes/s':>12s} {'MFU':>7s} {'peak GiB':>9s} {'first step s':>13s}")
    for name, bps, mem, first in rows:
        print(f"{name:60s} {bps:12,.0f} {100 * bps * flops / PEAK_BF16:6.1f}% {mem:9.1f} {first:13.0f}")
    if not args.skip_hf:
        for name, bps, *_ in rows[:-1]:
            print(f"speed-up of {name}: {bps / rows[-1][1]:.1f}x transformers")


if __name__ == "__main__":
    main()
