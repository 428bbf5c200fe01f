"""Prefill memory and time against prompt length: the engine prefills in blocks, so both grow
linearly with the prompt.

    python bench/prefill_memory.py                        # shipped model, CPU, 1-100 KB
    python bench/prefill_memory.py --device cuda --sizes 1000 100000
    python bench/prefill_memory.py --one-block-max 10000  # also the whole prompt as one block

Each size runs in a fresh child process (peak memory is per process): it loads the model,
then prefills a prompt of that many bytes and generates --max-new bytes greedily. Reported:
the process's peak memory (CPU: peak RSS, from getrusage, torch and the model included;
CUDA: torch.cuda.max_memory_allocated) and what the prefill and generation added on top of
the loaded model, the prefill's time, the prompt's patches, and the bytes/s generated after
it. The prompt is this project's own documentation, repeated to the length.
"--one-block-max N" adds, for sizes up to N, a row with the prompt prefilled as one block
(PREFILL_CHUNK and PREFILL_PAIRS set past the prompt: one dense mask over the whole prompt,
as the engine did before it prefilled in blocks).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompt_text(n: int) -> bytes:
    """n bytes of English prose: the project's markdown files, repeated."""
    text = b"\n\n".join(p.read_bytes() for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("docs/*.md")))
    text = text or b"Once upon a time, there was a little byte. "
    return (text * (n // len(text) + 1))[:n]


def child(args) -> dict:
    import torch

    from blt import prefill
    from blt.checkpoint import from_pretrained
    from blt.engine import Engine
    from blt.sampling import sample_next
    from blt.tokens import encode

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_block:
        prefill.PREFILL_CHUNK, prefill.PREFILL_PAIRS = 1 << 40, 1 << 80
    device = torch.device(args.device)
    model = from_pretrained(args.checkpoint, device=device)
    ids = encode(prompt_text(args.size))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    eng = Engine(model, [ids], args.max_new)
    with torch.no_grad():
        logits = eng.prefill()
        patches = eng.h_patches[0]  # the prompt's complete patches
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(args.max_new - 1):
            logits = eng.step(sample_next(logits))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t2 = time.perf_counter()
    return dict(prefill_s=t1 - t0, step_bytes_per_s=(args.max_new - 1) / (t2 - t1), added_bytes=peak - base,
                peak_bytes=peak, patches=patches)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000])
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads in the child (default: torch's)")
    ap.add_argument("--one-block-max", type=int, default=0,
                    help="also prefill prompts up to this many bytes as one block (the quadratic way)")  # fmt: skip
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--one-block", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    what = "CUDA memory allocated" if args.device.startswith("cuda") else "RSS"
    print(f"model: {args.checkpoint}; device: {args.device}; {args.max_new} bytes generated after the prefill")
    print(f"{'prompt bytes':>12s}  {'prefill':10s} {'peak ' + what + ' MB':>17s} {'added by it MB':>15s} {'prefill s':>10s} "
          f"{'patches':>8s} {'bytes/s after':>14s}")  # fmt: skip
    for size in args.sizes:
        for one_block in [False, True] if size <= args.one_block_max else [False]:
            cmd = [sys.executable, __file__, "--child", "--size", str(size), "--checkpoint", args.checkpoint,
                   "--device", args.device, "--max-new", str(args.max_new)]  # fmt: skip
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--one-block"] if one_block else []
            label = "one block" if one_block else "blocks"
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{size:12d}  {label:10s} timed out after {args.timeout} s", flush=True)
                continue
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{size:12d}  {label:10s} failed: {last}", flush=True)
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{size:12d}  {label:10s} {res['peak_bytes'] / 2**20:17.0f} {res['added_bytes'] / 2**20:15.0f} "
                  f"{res['prefill_s']:10.2f} {res['patches']:8d} {res['step_bytes_per_s']:14.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
