"""The users' paths on one GPU, end to end, as a pass/fail table:

    python bench/journeys.py --data TRAIN.txt.xz --valid VALID.txt.xz

1. recipe       recipes/tinystories.sh with short steps: entropy model, BLT with blt.train's
                defaults (blt.execution: on a GPU --one-graph, fused products, bf16 residual,
                precomputed entropies), bf16 export, held-out evaluation
2. resume       the same recipe in a fresh folder (the entropy model reused), stopped by SIGTERM
                at the BLT's first metrics row, then run again: it resumes, and the logged
                losses equal the uninterrupted run's (within --loss-tol)
3. compile      the recipe's BLT with --compile instead of --one-graph
4. patch counts --one-graph on the recipe's shapes with every byte a patch (θ = 0: 16 rows of
                2048 patches, 256 blocks of packed patches) and with one long patch a row (θ
                huge); with --only bench-shape also on the bench preset's shape (8 x 4096)
5. generate     blt.generate --device cuda --compile --stats on the exported model

Each row: pass/fail, wall time, peak GPU memory (of every Python process the row started, read
at its exit) and bytes/s (training: the run's own summary; eval: held-out bytes over wall time;
generate: its --stats line). The recipe's shapes must stay within --max-gib (5.5 GiB: a 6 GB card).
Run it after any change to GPU code; its table goes in PROGRESS.md. Logs: --work/logs.

The journeys run side by side, each as soon as what it needs exists (the recipe's entropy
model; generate: the export): their time goes mostly to compilation, which is CPU work, and
the GPU holds them all. Their bytes/s are then those of a shared GPU; --serial runs one at a
time for the speed of each alone.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every `python` the recipe starts runs through this: it reports the process's peak GPU memory.
SHIM = """#!/usr/bin/env bash
exec {python} -c '
import atexit, runpy, sys, time
start = time.perf_counter()
if len(sys.argv) < 3 or sys.argv[1] != "-m":
    sys.exit("the journeys shim runs python -m MODULE only")
module = sys.argv[2]
def report():
    import torch
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else 0.0
    print(f"journey-process {{module}} peak_gib={{peak:.3f}} seconds={{time.perf_counter() - start:.1f}}", file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
' "$@"
"""


@dataclass
class Row:
    name: str
    ok: bool = False
    seconds: float = 0.0
    peak_gib: float = 0.0
    bytes_per_s: float | None = None
    note: str = ""
    checks: list = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.checks.append((ok, what))
        if not ok:
            self.note = (self.note + "; " if self.note else "") + f"FAILED: {what}"


class Journeys:
    def __init__(self, args):
        self.args, self.work = args, Path(args.work).resolve()
        self.logs = self.work / "logs"
        self.recipe_done = threading.Event()  # set when the recipe journey has ended (or is not run)
        shim_dir = self.work / "shim"
        shim_dir.mkdir(parents=True, exist_ok=True)
        (shim_dir / "python").write_text(SHIM.format(python=sys.executable))
        (shim_dir / "python").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                    "PYTHONUNBUFFERED": "1"}  # fmt: skip

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return proc, log

    def run(self, name: str, cmd: list[str], env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
        proc, log = self.start(name, cmd, env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        return rc, log.read_text(errors="replace")

    def torch_logs(self) -> dict:
        return {"TORCH_LOGS": self.args.torch_logs} if self.args.torch_logs else {}

    def recipe_env(self, runs: Path, out: Path, **extra) -> dict:
        a = self.args
        return {"DATA": a.data, "VALID": a.valid, "RUNS": str(runs), "OUT": str(out), "LOG_EVERY": "5",
                "ENT_STEPS": str(a.entropy_steps), "BLT_STEPS": str(a.blt_steps), **extra}  # fmt: skip

    def blt_cmd(self, out: Path, *flags: str) -> list[str]:
        """The recipe's BLT command (recipes/tinystories.sh), a few steps."""
        return ["python", "-m", "blt.train", "--data", self.args.data, "--valid-data", self.args.valid, "--config",
                "tinystories", "--entropy-model", str(self.work / "recipe" / "entropy"), "--batch-size", "16",
                "--grad-accum", "2", "--seq-len", "2048", "--eval-every", "0", "--eval-batches", "2",
                "--save-every", "0", "--log-every", "1", "--out", str(out), *flags]  # fmt: skip

    # ---- the journeys ----

    def entropy_model(self) -> Path:
        """The recipe's entropy model run folder, once its model exists (waits for the recipe)."""
        runs = self.work / "recipe" / "entropy"
        while not (runs / "model").is_dir() and not self.recipe_done.is_set():
            time.sleep(1)
        if not (runs / "model").is_dir():
            raise RuntimeError(f"no entropy model in {runs}: the recipe journey must run first")
        return runs

    def recipe(self) -> list[Row]:
        rows = []
        t = time.perf_counter()
        rc, log = self.run("recipe", ["bash", "recipes/tinystories.sh"],
                           self.recipe_env(self.work / "recipe", self.work / "recipe" / "export"))  # fmt: skip
        seconds = time.perf_counter() - t
        processes = process_lines(log)
        stages = [("recipe: entropy model", "blt.train_entropy"), ("recipe: BLT (defaults)", "blt.train"),
                  ("recipe: export", "blt.export"), ("recipe: eval", "blt.eval")]  # fmt: skip
        for name, module in stages:
            row = Row(name)
            found = [p for p in processes if p["module"] == module]
            row.check(bool(found), f"{module} ran")
            if found:
                row.seconds, row.peak_gib = found[0]["seconds"], found[0]["peak_gib"]
            if module in ("blt.train_entropy", "blt.train"):
                row.bytes_per_s = summary_bytes_per_s(log, nth=0 if module == "blt.train_entropy" else 1)
            if module == "blt.train":
                row.check(row.peak_gib <= self.args.max_gib, f"peak {row.peak_gib:.2f} GiB <= {self.args.max_gib}")
                chosen = re.findall(r"^execution: (.*)$", log, re.M)  # train_entropy's line, then the BLT's
                if len(chosen) > 1:
                    row.note = chosen[1] + (f"; {row.note}" if row.note else "")
            if module == "blt.eval":
                m = re.search(r"bpb=([\d.]+) bytes=(\d+)", log)
                row.check(m is not None, "eval printed bpb")
                if m and row.seconds:
                    row.bytes_per_s, row.note = int(m[2]) / row.seconds, f"bpb {float(m[1]):.4f}"
            row.ok = all(ok for ok, _ in row.checks) and rc == 0
            rows.append(row)
        rows[-1].check(rc == 0, f"recipe exit code {rc} (wall {seconds:.0f} s)")
        return rows

    def resume(self) -> list[Row]:
        """SIGTERM to the recipe's process group during the BLT, then the recipe again."""
        row = Row("resume after SIGTERM (recipe rerun)")
        runs = self.work / "resume"
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        shutil.copytree(self.entropy_model(), runs / "entropy")  # the recipe skips this stage
        env = self.recipe_env(runs, runs / "export")
        t = time.perf_counter()
        proc, log = self.start("resume-1", ["bash", "recipes/tinystories.sh"], env)
        # at the first logged row: compiled, a step takes tens of milliseconds and the run is short
        metrics, stop_at = runs / "blt" / "metrics.jsonl", 1
        while proc.poll() is None and logged_steps(metrics) < stop_at:
            time.sleep(0.05)
        stopped = proc.poll() is None
        if stopped:
            os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler ends a job: bash and python alike
            proc.wait()
            while group_alive(proc.pid):  # python finishes its step and saves
                time.sleep(0.5)
        first = log.read_text(errors="replace")
        row.check(stopped, "stopped during the BLT")
        saved = re.search(r"stopped by a signal \(SIGTERM\) after step (\d+)", first)
        row.check(saved is not None, "the BLT saved a checkpoint on SIGTERM")
        row.check(saved is not None and int(saved[1]) < self.args.blt_steps, "stopped before the last step")
        row.check(not (runs / "blt" / "model").exists(), "no final model after the signal")
        rc, second = self.run("resume-2", ["bash", "recipes/tinystories.sh"], env)
        row.seconds = time.perf_counter() - t
        row.check(rc == 0, f"rerun exit code {rc}")
        row.check("skipping this stage" in second, "the rerun skipped the finished entropy model")
        processes = process_lines(first + second)
        row.peak_gib = max((p["peak_gib"] for p in processes if p["module"] == "blt.train"), default=0.0)
        row.bytes_per_s = summary_bytes_per_s(second, nth=0)
        self.recipe_done.wait()  # the uninterrupted run's losses
        want, got = step_losses(self.work / "recipe" / "blt" / "metrics.jsonl"), step_losses(metrics)
        row.check(set(want) <= set(got), f"every uninterrupted row's step logged ({sorted(want)})")
        # A row is the mean over the steps since the previous one: the first row after the
        # resume averages fewer steps than the uninterrupted run's, so it is not compared.
        stop = int(saved[1]) if saved else 0
        partial = min((s for s in got if s > stop), default=None)
        compared = sorted(s for s in want if s in got and s != partial)
        diff = max((abs(got[s] - want[s]) for s in compared), default=float("nan"))
        row.check(bool(compared) and compared[-1] == max(want), f"steps {compared} compared")
        row.check(diff <= self.args.loss_tol, f"max |loss - uninterrupted loss| {diff:.2e} <= {self.args.loss_tol}")
        where = f"stopped after step {saved[1]}, " if saved else ""
        row.note = f"{where}max loss diff {diff:.2e}" + (f"; {row.note}" if row.note else "")
        row.ok = all(ok for ok, _ in row.checks)
        return [row]

    def train_row(self, name: str, out: Path, *flags: str, peak_limit: float | None = None) -> Row:
        self.entropy_model()
        shutil.rmtree(out, ignore_errors=True)
        row = Row(name)
        t = time.perf_counter()
        rc, log = self.run(out.name, self.blt_cmd(out, *flags), self.torch_logs())
        row.seconds = time.perf_counter() - t
        processes = process_lines(log)
        row.peak_gib = processes[0]["peak_gib"] if processes else 0.0
        row.bytes_per_s = summary_bytes_per_s(log, nth=0)
        row.check(rc == 0, f"exit code {rc}" + ("" if rc == 0 else f": {last_error(log)}"))
        row.check("warning:" not in log, "no fallback to a slower path")
        if peak_limit is not None:
            row.check(row.peak_gib <= peak_limit, f"peak {row.peak_gib:.2f} GiB <= {peak_limit}")
        patches = [r["bytes_per_patch"] for r in read_rows(out / "metrics.jsonl") if "bytes_per_patch" in r]
        if patches:
            row.note = f"{patches[-1]:.2f} bytes/patch" + (f"; {row.note}" if row.note else "")
        row.ok = all(ok for ok, _ in row.checks)
        return row

    def compiled(self) -> list[Row]:
        steps = str(self.args.blt_steps)
        return [self.train_row("BLT --compile (recipe shapes)", self.work / "compile", "--compile", "--steps", steps,
                       "--lr", "1.5e-3", "--warmup", "200", peak_limit=self.args.max_gib)]  # fmt: skip

    def all_bytes(self) -> list[Row]:
        return [self.train_row("--one-graph, every byte a patch (θ=0)", self.work / "all-bytes", "--one-graph",
                               "--steps", str(self.args.shape_steps), "--threshold", "0", peak_limit=self.args.max_gib)]

    def one_patch(self) -> list[Row]:
        return [self.train_row("--one-graph, one long patch a row (θ=1e6)", self.work / "one-patch", "--one-graph",
                               "--steps", str(self.args.shape_steps), "--threshold", "1e6", peak_limit=self.args.max_gib)]

    def bench_shape(self) -> list[Row]:
        self.entropy_model()
        cmd = self.blt_cmd(self.work / "bench-shape", "--one-graph", "--steps", str(self.args.shape_steps))
        cmd[cmd.index("tinystories")] = "bench"
        cmd[cmd.index("--batch-size") + 1], cmd[cmd.index("--seq-len") + 1] = "8", "4096"
        cmd[cmd.index("--grad-accum") + 1] = "1"
        out = self.work / "bench-shape"
        shutil.rmtree(out, ignore_errors=True)
        row = Row("--one-graph, bench preset (8 x 4096)")
        t = time.perf_counter()
        rc, log = self.run(out.name, cmd, self.torch_logs())
        row.seconds, row.bytes_per_s = time.perf_counter() - t, summary_bytes_per_s(log, nth=0)
        row.peak_gib = max((p["peak_gib"] for p in process_lines(log)), default=0.0)
        row.check(rc == 0, f"exit code {rc}" + ("" if rc == 0 else f": {last_error(log)}"))
        row.check("warning:" not in log, "no fallback to a slower path")
        row.ok = all(ok for ok, _ in row.checks)
        return [row]

    def generate(self) -> list[Row]:
        row = Row("generate --device cuda --compile --stats")
        self.recipe_done.wait()
        model = self.work / "recipe" / "export"
        if not (model / "config.json").exists():  # --only generate: the shipped model
            model = ROOT / "checkpoints"
            row.note = "shipped model"
        t = time.perf_counter()
        rc, log = self.run("generate", ["python", "-m", "blt.generate", "--checkpoint", str(model), "--device", "cuda",
                                        "--compile", "--stats", "--prompt", "Once upon a time", "--max-new", "500",
                                        "--seed", "0"])  # fmt: skip
        row.seconds = time.perf_counter() - t
        row.peak_gib = max((p["peak_gib"] for p in process_lines(log)), default=0.0)
        m = re.search(r"bytes=(\d+) .*bytes_per_s=([\d.]+)", log)
        row.check(rc == 0, f"exit code {rc}" + ("" if rc == 0 else f": {last_error(log)}"))
        row.check(m is not None and int(m[1]) > 0, "generated bytes, --stats line printed")
        if m:
            row.bytes_per_s = float(m[2])
        row.ok = all(ok for ok, _ in row.checks)
        return [row]


def table(rows: list[Row]) -> str:
    lines = ["| journey | result | wall s | peak GiB | bytes/s | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        speed = f"{r.bytes_per_s:,.0f}" if r.bytes_per_s else "-"
        lines.append(f"| {r.name} | {'pass' if r.ok else 'FAIL'} | {r.seconds:.0f} | {r.peak_gib:.2f} | {speed} | {r.note} |")
    return "\n".join(lines)


# ---- reading the logs ----


def process_lines(log: str) -> list[dict]:
    """The shim's report of each Python process, in order."""
    return [{"module": m[1], "peak_gib": float(m[2]), "seconds": float(m[3])}
            for m in re.finditer(r"journey-process (\S+) peak_gib=([\d.]+) seconds=([\d.]+)", log)]  # fmt: skip


def summary_bytes_per_s(log: str, nth: int) -> float | None:
    """bytes/s from the nth training summary line ('... x 8.42e+05 bytes/s over ...')."""
    found = re.findall(r"x ([\d.e+]+) bytes/s over", log)
    return float(found[nth]) if len(found) > nth else None


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut off by the signal
    return out


def step_losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(path) if "loss" in r}


def logged_steps(path: Path) -> int:
    return max(step_losses(path), default=0)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip() and "journey-process" not in line]
    return lines[-1][:200] if lines else "no output"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="TinyStories training text (local file)")
    p.add_argument("--valid", required=True, help="held-out text (local file)")
    p.add_argument("--work", default="runs/journeys", help="scratch folder (replaced journey by journey)")
    p.add_argument("--entropy-steps", type=int, default=150)
    p.add_argument("--blt-steps", type=int, default=25,
                   help="recipe BLT steps, a metrics row every 5 (the resume journey stops at the first row)")
    p.add_argument("--shape-steps", type=int, default=3, help="steps of each patch-count journey")
    p.add_argument("--max-gib", type=float, default=5.5, help="peak GPU memory allowed on the recipe's shapes")
    p.add_argument("--loss-tol", type=float, default=1e-4,
                   help="allowed |resumed - uninterrupted| loss: two uninterrupted --one-graph runs differ by about "
                        "1e-5 on a GPU (kernels that add in a varying order)")  # fmt: skip
    p.add_argument("--torch-logs", help="TORCH_LOGS for the patch-count runs, e.g. recompiles,graph_breaks")
    p.add_argument("--only", nargs="+", choices=("recipe", "resume", "compile", "patch-counts", "generate", "bench-shape"))
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--serial", action="store_true", help="one journey at a time (bytes/s of each alone)")
    args = p.parse_args(argv)
    j = Journeys(args)
    journeys = [("recipe", "recipe", j.recipe), ("resume", "resume", j.resume), ("compile", "compile", j.compiled),
                ("patch-counts", "all-bytes", j.all_bytes), ("patch-counts", "one-patch", j.one_patch),
                ("generate", "generate", j.generate), ("bench-shape", "bench-shape", j.bench_shape)]  # fmt: skip
    chosen = [(name, run) for group, name, run in journeys
              if (group in args.only if args.only else group != "bench-shape")]  # fmt: skip
    if any(name == "recipe" for name, _ in chosen):
        shutil.rmtree(j.work / "recipe", ignore_errors=True)  # before any journey looks for its models
    else:
        j.recipe_done.set()
    t, printing = time.perf_counter(), threading.Lock()

    def say(text: str) -> None:
        with printing:
            print(text, flush=True)

    def one(name, run) -> list[Row]:
        say(f"journey: {name} starts at {time.perf_counter() - t:.0f} s")
        try:
            rows = run()
        except Exception as e:  # one broken journey must not hide the others' results
            rows = [Row(name, note=f"FAILED: {type(e).__name__}: {e}")]
        finally:
            if name == "recipe":
                j.recipe_done.set()
        say("\n".join(table(rows).splitlines()[2:]))
        return rows

    with ThreadPoolExecutor(1 if args.serial else len(chosen)) as pool:
        futures = [pool.submit(one, name, run) for name, run in chosen]
        rows = [row for f in futures for row in f.result()]
    print(f"\n{table(rows)}\n\n{sum(r.ok for r in rows)}/{len(rows)} passed in {time.perf_counter() - t:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    sys.exit(0 if all(r.ok for r in rows) else 1)

if __name__ == "__main__":
    main()
