"""Generation speed: our cached engine vs full recomputation vs transformers' `generate`.

    python bench/generate_speed.py --device cuda            # bench preset, 1 and 64 streams
    python bench/generate_speed.py --device cpu --streams 1 --max-new 100
    python bench/generate_speed.py --checkpoint checkpoints --device cpu   # the shipped model
    python bench/generate_speed.py --checkpoint checkpoints --cpu-load     # CPU threads, idle and busy
    python bench/generate_speed.py --checkpoint checkpoints --device cuda --compile --calls  # as the CLI

Greedy decoding from "Once upon a time" (stop strings off, so every stream makes max-new
bytes). The random-init `bench` model gets θ calibrated to ~4.5 bytes/patch on random text
so that the global model runs about once per 4.5 bytes, as it would after training.
Full recomputation re-patches and re-runs the whole BLT over the prefix for every byte (what
the official code does). transformers' port is run with its cache off (with it on, its
`generate` raises); it gets our weights, converted. A compiled row (--compile, CUDA) also says
whether its step really ran as CUDA graphs, from inductor's counters (a skip is only a warning).

--cpu-load: bytes/s of `generate` as the CLI runs it (the prompt above, 300 bytes, temperature
0.7, prefill included, as `--stats` reports) on 1 CPU thread, 2, and its default (1 or 2,
chosen while running), on idle cores and with one busy-looping process per core beside it
(another job on the machine).

--calls: `generate` as the CLI calls it (temperature 0.7, prefill and any compiling included, as
`--stats` reports), once per prompt length and max-new, all in one process: eager, and with
--compile (CUDA) compiled too, each call saying how many step graphs dynamo traced for it (0:
it reused the compiled step of an earlier call, its caches' shapes in the same bucket).
"""

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt.checkpoint import from_pretrained  # noqa: E402
from blt.config import bench  # noqa: E402
from blt.cpu_threads import MAX_AUTO_THREADS  # noqa: E402
from blt.engine import Engine  # noqa: E402
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.generate import generate, generate_uncached, pipelined  # noqa: E402
from blt.model import BLT  # noqa: E402
from blt.patcher import calibrate_threshold  # noqa: E402
from blt.sampling import NEVER_SAMPLED, sample_next  # noqa: E402
from blt.tokens import encode  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(device) -> BLT:
    torch.manual_seed(0)
    cfg = bench()
    cfg.cross_attn_double_residual, cfg.hash_embed_mean = True, False  # loadable into BltForCausalLM
    em = EntropyModel(cfg.entropy_model).to(device)
    x = torch.randint(4, 260, (4, 1024), device=device)
    cfg.patcher.threshold, _ = calibrate_threshold(em.entropies(x), x, cfg.patcher, 4.5)
    return BLT(cfg, em).to(device).eval()


def run_cached(model, prompt, streams, max_new, device, compile, warm=16, profile=False):
    """Steady-state bytes/s of the engine's byte loop as generate_ids runs it (greedy, every
    stream stepping every byte): `warm` steps first (with compile=True that is where the graphs
    are compiled and captured; a new Engine would compile again), then `max_new` timed steps,
    sampling and the host's reading of every byte included. The prefill is not timed.
    Eager: sample on the host, then step. Compiled: sampled steps on the device with the host
    one step behind (blt.generate.pipelined)."""
    eng = Engine(model, [prompt] * streams, warm + max_new + (51 if profile else 1), compile=compile)
    logits = eng.prefill()
    if eng.compiled:
        eng.start_sampling(logits)

        def run(n):
            for toks, flags in pipelined(eng, n):
                eng.note(flags)
                row0.append(toks[0])
                flags0.append(bool(flags[0]))
    else:

        def run(n):
            nonlocal logits
            for _ in range(n):
                tok = sample_next(logits)  # greedy over the bytes generate may emit
                row0.append(tok.tolist()[0])  # the host sees every byte, as generate_ids does
                before = eng.h_patches[0]
                logits = eng.step(tok)
                flags0.append(eng.h_patches[0] > before)

    row0, flags0 = [], []  # the first stream's bytes and patch flags
    run(warm)
    sync(device)
    t0 = time.perf_counter()
    run(max_new)
    sync(device)
    bps = streams * max_new / (time.perf_counter() - t0)
    if profile:
        print_profile(lambda: run(50), 50, device)
    return bps, eng, (row0[: warm + max_new], flags0[: warm + max_new])


def agreement(model, prompt, first) -> str:
    """The compiled engine's greedy bytes and patch flags (first stream) against the eager
    engine fed the same bytes: how many of its picks the eager logits make too, and the largest
    logit gap by which a compiled pick trails the eager argmax, counted up to the first step
    whose patch decision differs (an entropy within rounding of θ; from there on the two run
    different patches and their logits may differ by far more than rounding)."""
    picks, flags = first
    eng = Engine(model, [prompt], len(picks) + 1)
    logits = eng.prefill()
    same, gap, split = 0, 0.0, None
    for i, (tok, flag) in enumerate(zip(picks, flags)):
        lg = logits[0].float()
        lg[list(NEVER_SAMPLED)] = float("-inf")  # as sample_next: never a pick
        same += int(lg.argmax()) == tok
        gap = max(gap, float(lg.max() - lg[tok]))
        before = eng.h_patches[0]
        logits = eng.step(torch.tensor([tok]))
        if (eng.h_patches[0] > before) != flag:
            split = i
            break
    n = len(picks) if split is None else split + 1
    where = "no patch decision differs" if split is None else f"a patch decision differs at step {split}"
    return f"eager makes the same pick at {same}/{n} steps, largest logit gap {gap:.2g}; {where}"


def print_profile(fn, steps, device):
    """The top kernels of `steps` steps, and kernel time against wall time per step."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    avg = prof.key_averages()
    print(avg.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=15,
                    max_name_column_width=60))  # fmt: skip
    kernels = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"per step: {kernels / steps / 1e3:.3f} ms of kernels, {wall * 1e3:.3f} ms of wall time (profiled)")


def cudagraph_counters():
    """(graphs that skipped CUDA graphs, CUDA graphs recorded so far): the skips from inductor's
    counters (torch/_inductor/cudagraph_utils.py), the recorded graphs counted in its CUDA graph
    tree (cudagraph_trees.py; a graph with no input from outside, as the sampled step, records
    no other trace)."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    if not torch.cuda.is_available():
        return counters["inductor"]["cudagraph_skips"], 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    nodes = [n for roots in manager.roots.values() for n in roots] if manager is not None else []
    recorded = 0
    while nodes:
        node = nodes.pop()
        recorded += 1
        nodes += [c for children in node.children.values() for c in children]
    return counters["inductor"]["cudagraph_skips"], recorded


def cudagraph_note(before, after) -> str:
    """Whether a compiled run really ran as CUDA graphs, from cudagraph_counters() around it."""
    skips, recorded = after[0] - before[0], after[1]
    if skips:
        return f"(CUDA graphs: skipped {skips} times, NOT graphed; see inductor's 'skipping cudagraphs' warning)"
    if not recorded:
        return "(CUDA graphs: none recorded)"
    return f"(CUDA graphs: used, {recorded} recorded so far)"


def run_uncached(model, prompt, max_new, device):
    generate_uncached(model, prompt, 4, backend="dense")
    sync(device)
    t0 = time.perf_counter()
    ids = generate_uncached(model, prompt, max_new, backend="dense")
    sync(device)
    return len(ids) / (time.perf_counter() - t0)


def run_hf(model, prompt, max_new, device):
    from blt.convert_hf import to_hf_model

    hf = to_hf_model(model).to(device).eval()
    x = torch.tensor([prompt], device=device)
    kw = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, use_cache=False)
    hf.generate(x, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(x, **kw)
    sync(device)
    return (out.shape[1] - x.shape[1]) / (time.perf_counter() - t0)


def _busy():
    while True:
        pass


def cpu_load_table(model, repeats: int, max_new: int) -> None:
    """bytes/s of generate() on 1 and 2 threads and on its default (1 or 2, chosen while it
    runs) on idle cores, then beside one busy-looping process per core; the best of `repeats`
    runs each (on a shared machine, the run least disturbed by other jobs)."""
    cores = os.cpu_count()
    threads = [1, 2, None]
    print(f"CPU: {cores} cores; torch {torch.__version__}; generate's default chooses 1..{MAX_AUTO_THREADS} threads")
    print(f"{'load':20s} " + " ".join(f"{f'{n} thread' + 's' * (n > 1) if n else 'default':>12s}" for n in threads))
    for load in (0, cores):
        procs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(load)]
        for p in procs:
            p.start()
        try:
            time.sleep(0.5 if load else 0)
            row = []
            for n in threads:
                runs = []
                for r in range(repeats):
                    _, stats = generate(model, "Once upon a time", max_new=max_new, temperature=0.7, seed=r,
                                        threads=n, return_stats=True)  # fmt: skip
                    runs.append(stats.bytes_per_s)
                row.append(max(runs))
        finally:
            for p in procs:
                p.terminate()
                p.join()
        label = "idle" if not load else f"{load} busy process{'es' * (load > 1)}"
        print(f"{label:20s} " + " ".join(f"{v:12.1f}" for v in row), flush=True)


STORY = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog, Max. "
         "One day, Lily saw a big red ball under a tree. She ran to get it, but Max got there first. ")


def cli_calls(model, device, compile: bool, lengths: list[int], max_news: list[int]) -> None:
    """One generate() call per (max_new, prompt of `length` bytes), as the CLI makes it: its
    bytes/s as --stats reports it, and compiled, the step graphs dynamo traced for the call."""
    from torch._dynamo.utils import counters

    print(f"{'compiled' if compile else 'eager'}:")
    print(f"{'prompt bytes':>12s} {'max-new':>7s} {'bytes':>5s} {'bytes/s':>9s}" + "  traced graphs" * compile)
    for max_new in max_news:
        for n in lengths:
            prompt = (STORY * (n // len(STORY) + 1))[:n]
            traced, graphs = counters["stats"]["unique_graphs"], cudagraph_counters()
            _, stats = generate(model, prompt, max_new=max_new, temperature=0.7, seed=0, stop=None, compile=compile,
                                return_stats=True)  # fmt: skip
            row = f"{n:12d} {max_new:7d} {stats.bytes:5d} {stats.bytes_per_s:9.1f}"
            if compile:
                new = counters["stats"]["unique_graphs"] - traced
                row += f"  {new} ({'compiled' if new else 'reused'}) {cudagraph_note(graphs, cudagraph_counters())}"
            print(row, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", help="a model folder (default: the random-init bench preset)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--max-new", type=int, default=300)
    ap.add_argument("--baseline-bytes", type=int, default=48, help="bytes for the slow baselines")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="CUDA graphs / torch.compile for the byte step")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--profile", action="store_true", help="profile 50 steps of each cached run")
    ap.add_argument("--cpu-load", action="store_true", help="only the CPU table: threads x idle / busy cores")
    ap.add_argument("--repeats", type=int, default=5, help="runs per cell of the --cpu-load table (best)")
    ap.add_argument("--calls", action="store_true", help="only generate() as the CLI calls it, per prompt and max-new")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 100, 300, 600], help="--calls: prompt bytes")
    ap.add_argument("--max-news", type=int, nargs="+", default=[300, 500], help="--calls: max-new values")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = from_pretrained(args.checkpoint, device) if args.checkpoint else bench_model(device)
    if args.cpu_load:
        cpu_load_table(model, args.repeats, args.max_new)
        return
    if args.calls:
        for compiled in [False, True] if args.compile and device.type == "cuda" else [False]:
            cli_calls(model, device, compiled, args.lengths, args.max_news)
        return
    prompt = encode("Once upon a time")
    name = args.checkpoint or "bench preset (random init)"
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {name}; device: {hw}; torch {torch.__version__}; greedy")
    print(f"{'method':34s} {'streams':>7s} {'bytes/s':>12s}")
    with torch.no_grad():
        # the slow baselines first, then the engine (compiling it is the slowest part of the run)
        print(f"{'ours, full recomputation':34s} {1:7d} {run_uncached(model, prompt, args.baseline_bytes, device):12,.1f}", flush=True)
        if not args.skip_hf:
            try:
                bps = run_hf(model, prompt, args.baseline_bytes, device)
                print(f"{'transformers generate (no cache)':34s} {1:7d} {bps:12,.1f}", flush=True)
            except (ImportError, ValueError) as e:
                print(f"transformers: skipped ({e})")
        variants = [False, True] if args.compile and device.type == "cuda" else [False]
        for compiled in variants:
            label = "ours, cached" + (", compiled" if compiled else "")
            for s in args.streams:
                before = cudagraph_counters()
                bps, eng, first = run_cached(model, prompt, s, args.max_new, device, compiled, profile=args.profile)
                row = f"{label:34s} {s:7d} {bps:12,.1f}   ({eng.patches} patches, {eng.global_steps} global steps)"
                if compiled:  # never report a run that fell back from CUDA graphs, or went wrong, as fine
                    row += f"   {cudagraph_note(before, cudagraph_counters())}"
                    row += f"   ({agreement(model, prompt, first)})"
                print(row, flush=True)


if __name__ == "__main__":
    main()
