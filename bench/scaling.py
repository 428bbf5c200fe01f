"""Training throughput against the number of GPUs: bytes/s, MFU and scaling efficiency.

    python bench/scaling.py --data TRAIN.txt.xz [--gpus 1 2 4 8] [--modes ddp fsdp] [--one-graph]

For each mode (DDP, FSDP2) and each process count N (those of --gpus that the machine has),
`torchrun --nproc_per_node N -m blt.train --dist MODE` trains the `bench` preset (--config) at a
fixed per-GPU batch (--batch-size x --seq-len, accumulation 1) for --steps steps, with
blt.train's execution defaults (each block compiled; --one-graph: the one-graph step under
DDP) and any --train-args. bytes/s is the median of the metrics rows after the first
--skip-steps steps (compilation and warm-up left out); MFU is the run's own summary line.

    scaling efficiency(N) = bytes/s on N / (N x bytes/s on 1), per mode

Results: a Markdown table (printed, and RUNS/table.md) and RUNS/table.json. Resumable: a
finished run keeps RUNS/<mode>-<N>/result.json and is not run again; delete it to rerun.
--device cpu runs the same on CPU processes (gloo), as a check of the pipeline.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training text (a local file, or a blt.data source name)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="process counts to run")
    p.add_argument("--modes", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    p.add_argument("--config", default="bench", help="blt.train --config")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per GPU")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip-steps", type=int, default=20, help="steps left out of the bytes/s (compilation)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--one-graph", action="store_true", help="DDP runs: blt.train --one-graph")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--train-args", default="", help="more blt.train flags, e.g. '--patch-mode space'")
    p.add_argument("--runs", default="runs/scaling", help="where the runs and the table go")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = p.parse_args(argv)
    if args.skip_steps >= args.steps:
        p.error("--skip-steps must be below --steps")
    return args


def available(args) -> int:
    if args.device == "cpu":
        return max(args.gpus)
    import torch

    return torch.cuda.device_count()


def run_one(args, mode: str, n: int) -> dict:
    """One run of N processes -> its result (also kept in RUNS/<mode>-<n>/result.json)."""
    out = Path(args.runs) / f"{mode}-{n}"
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    train = out / "train"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "blt.train",
           "--data", args.data, "--valid-data", args.data, "--config", args.config, "--dist", mode,
           "--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--grad-accum", "1", "--steps", str(args.steps), "--log-every", str(args.log_every),
           "--eval-every", "0", "--eval-batches", "1", "--save-every", "0", "--out", str(train),
           *(["--one-graph"] if args.one_graph and mode == "ddp" else []), *shlex.split(args.train_args)]  # fmt: skip
    if (train / "checkpoint").exists():
        cmd.append("--resume")  # an interrupted run
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    print(f"{mode} x {n}: {shlex.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
        raise SystemExit(f"error: {mode} x {n} failed (exit {proc.returncode}): {tail[0] if tail else ''}; log in {out / 'log.txt'}")
    rows = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["bytes_per_s"] for r in rows if "bytes_per_s" in r and r["step"] > args.skip_steps]
    if not speeds:
        raise SystemExit(f"error: {mode} x {n}: no metrics row after step {args.skip_steps}; raise --steps")
    mfu = re.search(r"MFU: ([\d.]+)%", proc.stdout)
    memory = re.search(r"peak GPU memory: ([\d.]+) GiB", proc.stdout)
    execution = re.search(r"^execution: (.*)$", proc.stdout, re.M)
    result = {"mode": mode, "processes": n, "bytes_per_s": statistics.median(speeds),
              "mfu_percent": float(mfu[1]) if mfu else None, "peak_gib": float(memory[1]) if memory else None,
              "execution": execution[1] if execution else None, "rows": len(speeds)}  # fmt: skip
    done.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    single = {r["mode"]: r["bytes_per_s"] for r in results if r["processes"] == 1}
    lines = ["| mode | GPUs | bytes/s | per GPU | MFU | peak GiB | scaling efficiency | execution |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        n, speed = r["processes"], r["bytes_per_s"]
        eff = f"{100 * speed / (n * single[r['mode']]):.1f}%" if r["mode"] in single else "-"
        mfu = f"{r['mfu_percent']:.1f}%" if r["mfu_percent"] is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['mode']} | {n} | {speed:,.0f} | {speed / n:,.0f} | {mfu} | {peak} | {eff} | {r['execution'] or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    have = available(args)
    counts = sorted(n for n in set(args.gpus) if n <= have)
    if not counts:
        raise SystemExit(f"error: this machine has {have} GPU(s), none of --gpus {args.gpus} fits")
    skipped = sorted(set(args.gpus) - set(counts))
    if skipped:
        print(f"skipping {skipped}: this machine has {have} GPU(s)", flush=True)
    results = [run_one(args, mode, n) for mode in args.modes for n in counts]
    text = table(results)
    runs = Path(args.runs)
    (runs / "table.md").write_text(text + "\n")
    (runs / "table.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
