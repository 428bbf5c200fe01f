"""FLOP-matched comparison of patching schemes (the paper's central comparison, at our scale).

    python bench/flop_matched.py --flops 1e16 --data train --valid-data valid \\
        --entropy-model runs/entropy --runs runs/flop_matched [--seq-len 2048 --batch-size 32 ...]
    python bench/flop_matched.py --flops 1e16 --data ... --valid-data ... --train-entropy 1500 ...

Five contenders get the same training-FLOP budget (--flops); --contenders picks some of them:

    blt-entropy    BLT (--config preset, default tinystories), entropy patching with the
                   entropy model's calibrated θ (its patcher_threshold.json; or --threshold)
    blt-space      the same BLT, space patching
    blt-static     the same BLT, static patching; patch size k = blt-entropy's measured mean
                   bytes/patch on the training text, rounded (its own measured mean is a little
                   below k: BOS is a patch of its own and a window's last patch is cut short)
    byte-baseline  a plain byte-level transformer (blt.train_entropy), --baseline-dim/-layers/
                   -heads, default 512 x 8 layers x 8 heads, attention window = --seq-len
    bpe-baseline   a Llama-style transformer over byte-level BPE tokens (blt.train_bpe, blt.bpe),
                   --bpe-dim/-layers/-heads (default: the byte baseline's), vocabulary
                   --bpe-vocab-size (default 4096, justified in blt.bpe), its tokenizer trained on
                   the training text into RUNS/bpe-tokenizer (or --bpe-tokenizer); seq_len (and
                   attention window) in tokens = --seq-len / measured bytes per token, rounded, at
                   least 16, so a window covers about the same text as the others'

How the budget is split. Each contender's training FLOPs per byte come from blt.flops: a BLT's
blt_flops_per_byte(cfg, bytes_per_patch, seq_len).train (forward + backward of the BLT and the
forward of the frozen entropy model, for entropy patching), the baseline's
3 x transformer_flops_per_byte, the BPE baseline's 3 x token_lm_flops_per_byte at its measured
bytes per token (a token is its "patch"). Mean bytes/patch is measured before training by running the
contender's patcher (entropy model included) on the held-out text, cut into --seq-len windows
exactly as blt.eval cuts it (the first --measure-bytes tokens; 0 = all): the inference FLOPs per
byte, and what the evaluation sees. The training FLOPs per byte take the mean patch size on a
sample of the training text instead (--measure-bytes tokens in --seq-len windows spread evenly
over the training stream: the text the FLOPs are spent on, which differs from the held-out text
when the training data is a mixture). The measurements are kept in RUNS/measure.json and reused
while their inputs are unchanged; so is the BPE tokenizer's bytes per token on the held-out
documents within the first --measure-bytes tokens (BOS and EOS counted as blt.eval counts them)
and on the training sample (the bytes a training token stands for, as blt.train_bpe counts them;
its training FLOPs do not depend on it: a token costs the same whatever it holds). Each contender
then trains

    steps = round(budget / (bytes_per_step x train_FLOPs_per_byte)),
    bytes_per_step = batch_size x grad_accum x seq_len (the BPE baseline: x training bytes per token),

so every contender spends the budget to within half a step, and sees a different number of bytes.
Training the entropy model itself is not charged to the budget (as in the paper).

Runs. Each contender trains in a subprocess (`python -m blt.train` / `python -m blt.train_entropy` /
`python -m blt.train_bpe`, --out RUNS/<name>), then is evaluated in this process on the whole
held-out file in fp32: a BLT or the byte baseline with blt.eval's own functions (load_any,
eval_sums over iter_eval_batches: the number `python -m blt.eval --checkpoint RUNS/<name>/model
--data VALID` prints), the BPE baseline with blt.bpe.bpe_bits_per_byte (windows of its seq_len
tokens): token nats / ln 2 / the same bytes blt.eval scores. The comparison is resumable: a
contender whose model folder exists is skipped, one with only a checkpoint (interrupted) continues
with --resume, and a finished evaluation is kept in RUNS/<name>/eval.json. RUNS/<name>/plan.json
records the settings a contender was started with; re-running with different settings (another
budget, batch, shape, data, learning rate, ...) stops with an error naming the first setting that
differs, instead of mixing runs. --extra-train-args are appended to every contender's training
command and are not checked. Ctrl-C lets the running training save a checkpoint; run the same
command again to continue. --bpe-tokenizer DIR keeps the BPE tokenizer elsewhere than
RUNS/bpe-tokenizer (bench/patch_scaling.py shares one across budgets).

Other studies import the pieces: add_comparison_args and check_args (the flags), prepare
(contenders, their FLOP-matched steps and jobs, every plan checked before any training),
train_all, evaluate, fit_budget, Measurer, rows.

Output: a Markdown table (printed, and RUNS/table.md) and RUNS/table.json. Parameters: total
counts the trained model (a BLT's entropy model is listed apart); non-embedding leaves out the
byte embedding and the hash n-gram tables (lookup tables), but counts the output projection.
Inference FLOPs/byte is the forward pass of the model proper (the patcher excluded, as the paper;
the BPE baseline's token_lm_flops_per_byte). Old RUNS folders from before the BPE baseline still
work: add it by running again, or leave it out with --contenders.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blt.bpe import (  # noqa: E402
    DEFAULT_VOCAB_SIZE, TokenLM, bpe_bits_per_byte, eval_byte_count, load_token_lm,
)
from blt.checkpoint import (  # noqa: E402
    CONFIG, ENTROPY_CONFIG, THRESHOLD, TOKEN_LM_WEIGHTS, CheckpointError, load_entropy_model,
)
from blt.config import PRESETS, BLTConfig, ConfigError, EntropyModelConfig, PatcherConfig  # noqa: E402
from blt.data import DataConfig, DataError, encode_documents, iter_eval_batches, load_documents, prepare_data  # noqa: E402
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.eval import eval_sums, load_any, real_patches  # noqa: E402
from blt.flops import blt_flops_per_byte, token_lm_flops_per_byte, transformer_flops_per_byte  # noqa: E402
from blt.model import BLT  # noqa: E402
from blt.patcher import calibrate_threshold, patch  # noqa: E402
from blt.tokens import BOE_ID, OFFSET  # noqa: E402
from blt.train_bpe import TOKENIZER_BYTES, documents, folder_tokenizer  # noqa: E402
from blt.train_flags import blt_config, blt_parser, entropy_model_dir  # noqa: E402

NAMES = ("blt-entropy", "blt-space", "blt-static", "byte-baseline", "bpe-baseline")
MIN_BPE_SEQ_LEN = 16  # tokens per window of the BPE baseline, at least
TRAIN_DEFAULTS = {k: blt_parser().get_default(k) for k in ("lr", "min_lr", "warmup")}
MEASURE_BATCH = 16  # windows per patcher forward while measuring bytes/patch (does not change the result)


class Fail(RuntimeError):
    """A failure after the flags were accepted: printed as one `error: ...` line, exit code 1."""


# ---- flags -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/flop_matched.py",
        description="Train BLT (entropy, space, static patching) and a byte-level transformer on the same "
        "training-FLOP budget, evaluate them on held-out text and tabulate the results.",
    )
    g = p.add_argument_group("budget and output")
    g.add_argument("--flops", type=float, required=True, help="training-FLOP budget of every contender, e.g. 1e16")
    add_run_args(g, "runs/flop_matched")
    add_comparison_args(p)
    return p


def add_run_args(g, runs: str) -> None:
    """--runs, --dry-run and --parallel (a study's output folder and how its runs go)."""
    g.add_argument("--runs", default=runs, help="folder of the runs and the tables")
    g.add_argument("--dry-run", action="store_true", help="print the plan (steps, bytes, FLOPs) and stop")
    g.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train up to N runs at once (on one GPU: small runs leave it mostly idle)")  # fmt: skip


def add_comparison_args(p: argparse.ArgumentParser) -> None:
    """Every flag of the comparison but the budget and the output (bench/patch_scaling.py has them too)."""
    add_training_args(p)
    g = p.add_argument_group("BLT contenders")
    g.add_argument("--config", default="tinystories", help=f"preset ({', '.join(PRESETS)}) or BLTConfig JSON file")
    g.add_argument("--threshold", type=float, help="blt-entropy's θ (default: the entropy model's patcher_threshold.json)")
    g = p.add_argument_group("entropy model (one of the two)")
    g.add_argument("--entropy-model", help="blt.train_entropy output (its --out or its model/ folder)")
    g.add_argument("--train-entropy", type=int, metavar="STEPS", help="first train one for STEPS steps into RUNS/entropy")
    g.add_argument("--entropy-dim", type=int, help="--train-entropy: width (default: the config's entropy model)")
    g.add_argument("--entropy-layers", type=int, help="--train-entropy: layers")
    g.add_argument("--entropy-heads", type=int, help="--train-entropy: heads")
    g.add_argument("--entropy-window", type=int, help="--train-entropy: attention window (0: full causal)")
    g.add_argument("--entropy-target-bytes-per-patch", type=float, default=4.5, help="--train-entropy: θ calibration target")
    g.add_argument("--extra-entropy-args", default="", help="--train-entropy: string appended to its command")
    g = p.add_argument_group("byte-level baseline")
    g.add_argument("--baseline-dim", type=int, default=512)
    g.add_argument("--baseline-layers", type=int, default=8)
    g.add_argument("--baseline-heads", type=int, default=8)
    g.add_argument("--baseline-window", type=int, help="attention window (default: --seq-len, i.e. full causal)")
    g = p.add_argument_group("BPE-token baseline")
    g.add_argument("--bpe-dim", type=int, help="width (default: --baseline-dim)")
    g.add_argument("--bpe-layers", type=int, help="layers (default: --baseline-layers)")
    g.add_argument("--bpe-heads", type=int, help="heads (default: --baseline-heads)")
    g.add_argument("--bpe-vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="BPE vocabulary, specials included (default: blt.bpe's, justified there)")  # fmt: skip
    g.add_argument("--bpe-tokenizer", metavar="DIR",
                   help="folder of the BPE tokenizer: trained there on the training text, or reused while its "
                        "settings are the same (default: RUNS/bpe-tokenizer)")  # fmt: skip
    g.add_argument("--contenders", default=",".join(NAMES),
                   help=f"comma-separated contenders to run (default: all, {','.join(NAMES)})")  # fmt: skip


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The data and the training flags every run of a study shares (bench/patch_size_study.py's too)."""
    g = p.add_argument_group("data (as blt.train)")
    g.add_argument("--data", default="tinystories", help="training source (see blt.data)")
    g.add_argument("--valid-data", required=True, help="held-out source: patch-size measurement and blt.eval")
    g.add_argument("--cache-dir", default="data_cache", help="byte-shard cache")
    g.add_argument("--measure-bytes", type=int, default=256 * 1024,
                   help="held-out tokens, and training tokens sampled evenly, that measure mean bytes/patch (0: all)")
    g = p.add_argument_group("training (passed to every run)")
    g.add_argument("--seq-len", type=int, default=2048, help="bytes per sequence")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the training scripts')")
    g.add_argument("--min-lr", type=float, help="final learning rate (default: the training scripts')")
    g.add_argument("--warmup", type=int, help="warmup steps (default: the training scripts')")
    g.add_argument("--dropout", type=float, help="dropout of the contenders (default: their configs')")
    g.add_argument("--seed", type=int, default=0, help="init and data order")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    g.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the subprocesses and torch threads here")
    g.add_argument("--extra-train-args", default="", help="string appended to every run's training command")


def check_args(p: argparse.ArgumentParser, args) -> tuple[BLTConfig, EntropyModelConfig, EntropyModelConfig | None]:
    """One-line errors for values no comparison can use. Returns the base BLT config, the baseline's
    config and (--train-entropy) the entropy model's."""
    checks = [
        (math.isfinite(args.flops) and args.flops > 0, "--flops must be a positive number of FLOPs"),
        (args.entropy_model is None or args.train_entropy is None, "give --entropy-model DIR or --train-entropy STEPS, not both"),
        (args.entropy_model is not None or args.train_entropy is not None,
         "entropy patching needs an entropy model: --entropy-model DIR (blt.train_entropy's output) or --train-entropy STEPS"),
        (args.train_entropy is None or args.train_entropy >= 1, "--train-entropy STEPS must be >= 1"),
        (args.entropy_target_bytes_per_patch >= 1, "--entropy-target-bytes-per-patch must be >= 1"),
        (args.baseline_window is None or args.baseline_window >= 1, "--baseline-window must be >= 1"),
        (args.bpe_vocab_size >= 259 and args.bpe_vocab_size <= 65536, "--bpe-vocab-size must be in [259, 65536]"),
    ]  # fmt: skip
    check_training_args(p, args)
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = [name for name in args.contenders if name not in NAMES]
    if unknown or not args.contenders:
        p.error(f"--contenders: {unknown[0] if unknown else 'none'} is not one of {', '.join(NAMES)}")
    args.extra_entropy_args = split_flag(p, args, "extra_entropy_args")
    if args.entropy_model is not None:
        folder = entropy_model_dir(args.entropy_model)
        if not (folder / ENTROPY_CONFIG).is_file():
            p.error(f"--entropy-model {args.entropy_model}: no entropy model there (entropy_config.json missing)")
        if not (folder / THRESHOLD).is_file() and args.threshold is None:
            p.error(f"--entropy-model {args.entropy_model}: no {THRESHOLD} (θ) there; calibrate it with blt.train_entropy")
    try:
        if args.config in PRESETS:
            base = PRESETS[args.config]()
        elif Path(args.config).is_file():
            base = BLTConfig.from_json(args.config)
        else:
            p.error(f"--config {args.config!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
        window = args.baseline_window or args.seq_len
        baseline = dataclasses.replace(EntropyModelConfig(), dim=args.baseline_dim, n_layers=args.baseline_layers,
                                       n_heads=args.baseline_heads, window=window)  # fmt: skip
        if args.dropout is not None:
            baseline.dropout = args.dropout
        baseline.validate("byte-level baseline (--baseline-dim/--baseline-layers/--baseline-heads)")
        if args.baseline_layers < 1:
            p.error("--baseline-layers must be >= 1")
        shape = {"dim": args.bpe_dim, "n_layers": args.bpe_layers, "n_heads": args.bpe_heads}
        bpe = dataclasses.replace(baseline, **{k: v for k, v in shape.items() if v is not None})
        bpe.validate("BPE-token baseline (--bpe-dim/--bpe-layers/--bpe-heads)")
        if bpe.n_layers < 1:
            p.error("--bpe-layers must be >= 1")
        args.bpe_shape = bpe  # its window (tokens) is set once bytes per token are measured
        entropy = None
        if args.train_entropy is not None:
            shape = {"dim": args.entropy_dim, "n_layers": args.entropy_layers, "n_heads": args.entropy_heads}
            entropy = dataclasses.replace(base.entropy_model, **{k: v for k, v in shape.items() if v is not None})
            if args.entropy_window is not None:
                entropy.window = args.entropy_window or None
            entropy.validate("entropy model (--entropy-dim/--entropy-layers/--entropy-heads/--entropy-window)")
    except ConfigError as e:
        p.error(str(e))
    return base, baseline, entropy


def split_flag(p: argparse.ArgumentParser, args, flag: str) -> list[str]:
    """A string flag of extra command-line arguments, split as a shell would split it."""
    try:
        return shlex.split(getattr(args, flag))
    except ValueError as e:
        p.error(f"--{flag.replace('_', '-')}: {e}")


def check_training_args(p: argparse.ArgumentParser, args) -> None:
    """One-line parser errors for add_training_args's and add_run_args's values; splits --extra-train-args."""
    checks = [
        (args.seq_len >= 2, "--seq-len must be >= 2"),
        (args.batch_size >= 1 and args.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
        (args.lr is None or args.lr > 0, "--lr must be > 0"),
        (args.min_lr is None or args.min_lr >= 0, "--min-lr must be >= 0"),
        (args.warmup is None or args.warmup >= 0, "--warmup must be >= 0"),
        (args.dropout is None or 0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.seed >= 0, "--seed must be >= 0"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
        (args.parallel >= 1, "--parallel must be >= 1"),
        (args.measure_bytes == 0 or args.measure_bytes > args.seq_len, "--measure-bytes must be 0 (all) or > --seq-len"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    lr = args.lr if args.lr is not None else TRAIN_DEFAULTS["lr"]
    min_lr = args.min_lr if args.min_lr is not None else TRAIN_DEFAULTS["min_lr"]
    if min_lr > lr:
        p.error(f"--min-lr {min_lr:g} is above --lr {lr:g} (the training scripts' defaults fill in the one not given)")
    args.extra_train_args = split_flag(p, args, "extra_train_args")


# ---- subprocesses ------------------------------------------------------------------------


def child_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_child(cmd: list[str], args, what: str) -> None:
    """Run a training to completion. On Ctrl-C (which the terminal sends to the child too) or a
    SIGTERM (forwarded), let the child save its checkpoint, then stop."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=child_env(args))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        print(f"\ninterrupted: waiting for {what} to save its checkpoint (Ctrl-C again to kill it)", flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise Fail(f"stopped during {what}; run the same command again to continue") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped by a signal, checkpoint saved
        raise Fail(f"stopped during {what}; run the same command again to continue")
    if rc != 0:
        raise Fail(f"{what} failed (exit code {rc}); command: {shlex.join(cmd)}")


def common_train_args(args, steps: int, out: Path, resume: bool, seq_len: int | None = None) -> list[str]:
    a = ["--data", args.data, "--valid-data", args.valid_data, "--cache-dir", args.cache_dir,
         "--steps", str(steps), "--batch-size", str(args.batch_size), "--seq-len", str(seq_len or args.seq_len),
         "--grad-accum", str(args.grad_accum), "--seed", str(args.seed), "--device", args.device]  # fmt: skip
    for flag in ("lr", "min_lr", "warmup"):
        if getattr(args, flag) is not None:
            a += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.compile:
        a.append("--compile")
    a += ["--out", str(out)]
    return a + (["--resume"] if resume else [])


def learning_settings(args) -> dict:
    """The settings every run shares that change what it learns (recorded in plan.json)."""
    keys = ("data", "valid_data", "seq_len", "batch_size", "grad_accum", "seed", "lr", "min_lr", "warmup")
    return {k: getattr(args, k) for k in keys}


@dataclass
class Job:
    """One training run: `python -m <module> <head> <shared flags> <tail>` into `out`."""

    name: str
    out: Path
    head: list[str]
    tail: list[str]
    steps: int
    model_file: str  # what out/model holds once the run finished
    plan: dict  # the settings recorded in out/plan.json
    seq_len: int | None = None  # --seq-len of the run, if not the comparison's (the BPE baseline's, in tokens)

    @property
    def finished(self) -> bool:
        return (self.out / "model" / self.model_file).is_file()


def flat(settings: dict, prefix: str = "") -> dict:
    """{"config": {"global_model": {"dim": 512}}} -> {"config.global_model.dim": 512}."""
    out = {}
    for k, v in settings.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def first_difference(old: dict, new: dict) -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first setting that differs, in key order."""
    old, new = flat(old), flat(new)
    return next(((k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)), None)


def check_plan(job: Job, write: bool) -> None:
    """Check a run's settings against its out/plan.json; record them if there is none and `write`."""
    path = job.out / "plan.json"
    if path.is_file():
        diff = first_difference(json.loads(path.read_text()), job.plan)
        if diff:
            k, old, new = diff
            raise Fail(f"{job.out} was started with other settings ({k}: {old!r} there, {new!r} now); "
                       f"delete {job.out} or choose another --runs")  # fmt: skip
    elif write:
        job.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job.plan, indent=2) + "\n")


def start_job(job: Job, args) -> list[str] | None:
    """Record the job's plan; -> its training command, or None if its model folder exists."""
    check_plan(job, write=True)
    if job.finished:
        print(f"skip {job.name}: {job.out / 'model'} exists", flush=True)
        return None
    resume = any((job.out / name).is_dir() for name in ("checkpoint", "checkpoint.prev"))  # blt.train's two
    print(f"\n== {'resume' if resume else 'train'} {job.name}: {job.steps} steps ==", flush=True)
    return job.head + common_train_args(args, job.steps, job.out, resume, job.seq_len) + job.tail


def check_finished(job: Job) -> None:
    if not job.finished:
        raise Fail(f"{job.name} stopped before writing {job.out / 'model'}; run the same command again to continue")


def train_or_skip(job: Job, args) -> None:
    """Train into job.out unless its model folder exists; continue an interrupted run."""
    cmd = start_job(job, args)
    if cmd is not None:
        run_child(cmd, args, job.name)
        check_finished(job)


def train_parallel(jobs: list[Job], args) -> None:
    """train_or_skip for every job, up to --parallel at a time (one GPU is rarely busy with one
    small run). Each run's output goes to its out/train.log. A SIGTERM or Ctrl-C reaches every
    running child, which saves its checkpoint; the same command then continues them all."""
    pending, running = list(jobs), {}
    stopping = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    try:
        while pending or running:
            while pending and len(running) < args.parallel and not stopping:
                job = pending.pop(0)
                cmd = start_job(job, args)
                if cmd is not None:
                    log = (job.out / "train.log").open("a")
                    print(f"$ {shlex.join(cmd)}  > {job.out / 'train.log'}", flush=True)
                    running[job.out] = (job, subprocess.Popen(cmd, env=child_env(args), stdout=log, stderr=log), log)
            if stopping:
                for _, proc, _ in running.values():
                    proc.send_signal(signal.SIGTERM)
            for out, (job, proc, log) in list(running.items()):  # keyed by folder: names may repeat
                if proc.poll() is not None:
                    log.close()
                    del running[out]
                    if proc.returncode != 0 and not stopping:
                        raise Fail(f"{job.name} failed (exit code {proc.returncode}); see {out / 'train.log'}")
                    print(f"{job.name}: {'finished' if job.finished else 'stopped'}", flush=True)
            if stopping and not running:
                raise Fail("stopped by a signal; run the same command again to continue")
            time.sleep(0.25)
    except KeyboardInterrupt:
        print("\ninterrupted: waiting for the runs to save their checkpoints", flush=True)
        for _, proc, _ in running.values():
            proc.wait()
        raise Fail("stopped; run the same command again to continue") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    for job in jobs:
        check_finished(job)


def evaluate(out: Path, model_file: str, source: str, seq_len: int, args, device, cache: str = "eval.json") -> dict:
    """Bits per byte of out/model on every document of `source`, fp32, in this process: a BLT or a
    byte LM exactly as blt.eval computes it (windows of seq_len bytes), a BPE token LM
    (model_file TOKEN_LM_WEIGHTS) with blt.bpe.bpe_bits_per_byte over the same bytes (windows of
    seq_len tokens). Kept in out/<cache> while the source, windows and model are unchanged."""
    model_dir = out / "model"
    key = {"data": source, "seq_len": seq_len, "model_mtime_ns": (model_dir / model_file).stat().st_mtime_ns}
    path = out / cache
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    docs = list(load_documents(source))
    if model_file == TOKEN_LM_WEIGHTS:
        model, tokenizer = load_token_lm(model_dir, device)
        r = bpe_bits_per_byte(model, tokenizer, docs, seq_len, args.batch_size, device)
        result = {"bpb": r.bpb, "bytes": r.bytes, "bytes_per_patch": r.bytes / r.tokens}
    else:
        model = load_any(model_dir, device)
        batches = iter_eval_batches(encode_documents(docs), args.batch_size, seq_len)
        nats, targets, inputs, patches = eval_sums(model, batches, device).tolist()
        result = {"bpb": nats / math.log(2) / targets, "bytes": int(targets), "bytes_per_patch": inputs / patches}
    print(f"{out.name}: bpb {result['bpb']:.4f} on {source} ({result['bytes']} bytes)", flush=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


# ---- the entropy model -------------------------------------------------------------------


def entropy_job(args, cfg: EntropyModelConfig, out: Path, steps: int, target: float, extra: list[str],
                name: str = "entropy model") -> Job:  # fmt: skip
    """blt.train_entropy of an entropy model of shape cfg into out, θ calibrated to `target` bytes/patch;
    `name` tells it from the other jobs (train_parallel keys its runs by name)."""
    # --no-doc-mask: trained and calibrated across documents, as the contenders read their windows
    head = [sys.executable, "-m", "blt.train_entropy", "--dim", str(cfg.dim), "--layers", str(cfg.n_layers),
            "--heads", str(cfg.n_heads), "--window", str(cfg.window or 0), "--target-bytes-per-patch", str(target),
            "--no-doc-mask"]  # fmt: skip
    plan = {"model": "entropy model", "shape": dataclasses.asdict(cfg), "steps": steps, "target_bytes_per_patch": target,
            **learning_settings(args)}  # fmt: skip
    return Job(name, out, head, extra, steps, ENTROPY_CONFIG, plan)


def entropy_folder(args, entropy_cfg: EntropyModelConfig | None) -> Path:
    """--entropy-model's folder, or train one into RUNS/entropy (--train-entropy) and return its model/."""
    if args.entropy_model is not None:
        return entropy_model_dir(args.entropy_model)
    job = entropy_job(args, entropy_cfg, Path(args.runs) / "entropy", args.train_entropy,
                      args.entropy_target_bytes_per_patch, args.extra_entropy_args)  # fmt: skip
    if args.dry_run and not job.finished:
        raise Fail("--dry-run needs a trained entropy model to measure patch sizes: drop --dry-run or give --entropy-model")
    train_or_skip(job, args)
    return job.out / "model"


# ---- planning ----------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    model: str
    patching: str
    kind: str  # "blt" | "byte" | "bpe"
    cfg: object  # BLTConfig | EntropyModelConfig
    bytes_per_patch: float = 1.0  # on the held-out text (the BPE baseline: bytes per token)
    train_bytes_per_patch: float = 1.0  # on the training sample (the BPE baseline: bytes per token)
    seq_len: int = 0  # tokens per window (bytes, but the BPE baseline's)
    bytes_per_step: float = 0.0
    vocab_size: int = 0  # the BPE baseline's
    train_flops_per_byte: float = 0.0
    inference_flops_per_byte: float = 0.0
    steps: int = 0
    params: dict = field(default_factory=dict)
    eval: dict | None = None  # on --valid-data
    eval_extra: dict | None = None  # on a second held-out set (bench/patch_scaling.py's --extra-valid)
    config_arg: str | None = None  # a BLT's blt.train --config (default: --config)
    entropy_dir: Path | None = None  # a BLT's entropy model, for entropy patching


@torch.no_grad()
def measure_bytes_per_patch(tokens: np.ndarray, cfg: BLTConfig, entropy_model, seq_len: int, device) -> float:
    """Mean bytes/patch of cfg's patcher on tokens, in the windows blt.eval uses (BOE padding excluded)."""
    n_bytes = n_patches = 0
    for batch in iter_eval_batches(tokens, MEASURE_BATCH, seq_len):
        inputs = batch[:, :-1].to(device)
        patching = patch(inputs, cfg.patcher, entropy_model)
        n_bytes += int((inputs != BOE_ID).sum())
        n_patches += int(real_patches(patching, inputs))
    return n_bytes / n_patches


def byte_run(ids: np.ndarray) -> bytes:
    """The raw bytes of a stretch of byte ids (specials dropped)."""
    ids = np.asarray(ids)
    return (ids[ids >= OFFSET] - OFFSET).astype(np.uint8).tobytes()


def training_sample(train: np.ndarray, n_tokens: int, seq_len: int) -> np.ndarray:
    """About n_tokens of the training stream (0: all of it): windows of seq_len tokens at evenly
    spaced places, end to end, so that iter_eval_batches cuts exactly those windows back out. A
    mixture of sources is sampled across all of them, not only in the first file."""
    if n_tokens == 0 or n_tokens >= len(train) - seq_len:
        return np.asarray(train)
    starts = np.linspace(0, len(train) - seq_len, max(1, n_tokens // seq_len)).astype(np.int64)
    return np.concatenate([np.asarray(train[s : s + seq_len]) for s in starts])


@dataclass
class PatchSizes:
    heldout: float  # mean bytes/patch on --valid-data's first --measure-bytes tokens: inference FLOPs
    train: float  # on the training sample: the FLOPs a training byte costs


class Measurer:
    """Mean bytes/patch of each BLT contender's patcher on the held-out text (its inference FLOPs,
    and what blt.eval sees) and on a training sample (training_sample: its training FLOPs), and
    entropy thresholds calibrated on that sample; every result is kept in RUNS/measure.json and
    reused while its inputs (data, windows, patcher, entropy model) are the same."""

    def __init__(self, args, data, device):
        self.args, self.device = args, device
        self.valid = data.valid
        self.heldout = np.asarray(data.valid[: args.measure_bytes] if args.measure_bytes else data.valid)
        self.train = training_sample(data.train, args.measure_bytes, args.seq_len)
        self.path = Path(args.runs) / "measure.json"
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.entropy_models = {}  # folder -> loaded model

    def key(self, entropy_dir: Path | None) -> dict:
        key = {"valid_data": self.args.valid_data, "valid_tokens": len(self.heldout), "data": self.args.data,
               "train_tokens": len(self.train), "seq_len": self.args.seq_len}  # fmt: skip
        if entropy_dir is not None:
            key["entropy_model_mtime_ns"] = (entropy_dir / "entropy_model.safetensors").stat().st_mtime_ns
        return key

    def cached(self, name: str, key: dict, compute):
        entry = self.saved.get(name)
        if entry and entry["key"] == key:
            return entry["value"]
        t0 = time.perf_counter()
        value = compute()
        print(f"{name}: {value} ({time.perf_counter() - t0:.1f}s)", flush=True)
        self.saved[name] = {"key": key, "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.saved, indent=2) + "\n")
        return value

    def entropy_model(self, entropy_dir: Path):
        if entropy_dir not in self.entropy_models:
            try:
                self.entropy_models[entropy_dir] = load_entropy_model(entropy_dir, self.device)
            except CheckpointError as e:
                raise Fail(str(e)) from None
        return self.entropy_models[entropy_dir]

    def __call__(self, name: str, cfg: BLTConfig, entropy_dir: Path | None = None) -> PatchSizes:
        """cfg's mean bytes/patch on both texts; entropy_dir: the entropy model of an entropy-based patcher."""
        entropy_dir = entropy_dir if cfg.patcher.needs_entropy else None
        key = {**self.key(entropy_dir), "patcher": dataclasses.asdict(cfg.patcher)}

        def compute():
            model = self.entropy_model(entropy_dir) if entropy_dir else None
            return [measure_bytes_per_patch(tokens, cfg, model, self.args.seq_len, self.device)
                    for tokens in (self.heldout, self.train)]  # fmt: skip

        return PatchSizes(*self.cached(f"{name} bytes/patch (held-out, training)", key, compute))

    def bytes_per_token(self, tokenizer) -> PatchSizes:
        """Bytes per token of a BPE tokenizer (as blt.eval counts bytes: BOS and EOS included) on
        the held-out documents within the first --measure-bytes tokens, and on the training sample,
        whose windows cut documents: each run of bytes between specials is tokenized alone."""
        key = {**self.key(None), "tokenizer": hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()}

        def compute():
            docs = list(documents(self.valid, self.args.measure_bytes or None))
            heldout = eval_byte_count(docs) / (len(tokenizer.encode_documents(docs)) - 1)
            specials = np.flatnonzero(self.train < OFFSET)
            runs = np.split(self.train, specials)  # each run but the first starts with its special
            tokens = len(specials) + sum(len(tokenizer.encode(byte_run(r))) for r in runs)
            return [heldout, (len(self.train) - 1) / (tokens - 1)]  # as blt.train_bpe counts its stream

        return PatchSizes(*self.cached("bpe-baseline bytes/token (held-out, training)", key, compute))

    @torch.no_grad()
    def calibrate(self, entropy_dir: Path, target: float, patcher: PatcherConfig) -> float:
        """θ for which `patcher` (an entropy-based mode; its max_patch_length applies) gives `target`
        mean bytes/patch on the training sample (blt.patcher.calibrate_threshold over the entropy
        model's entropies of its windows)."""
        key = {**self.key(entropy_dir), "target": target, "patcher": dataclasses.asdict(patcher)}

        def compute():
            rows = torch.from_numpy(self.train[: len(self.train) // self.args.seq_len * self.args.seq_len].astype(np.int64))
            rows = rows.view(-1, self.args.seq_len)
            model = self.entropy_model(entropy_dir)
            entropies = torch.cat([model.entropies(r.to(self.device)).cpu() for r in rows.split(MEASURE_BATCH)])
            return calibrate_threshold(entropies, rows, patcher, target)[0]

        return self.cached(f"θ of {entropy_dir} for {target:g} bytes/patch", key, compute)


def count_params(c: Contender) -> dict:
    """Parameter counts, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        if c.kind == "blt":
            m = BLT(c.cfg)
            counts = m.num_params()
            total = counts["total_blt"]
            embedding = m.encoder.tok_embeddings.weight.numel() + counts["hash_tables"]
            entropy = sum(p.numel() for p in EntropyModel(c.cfg.entropy_model).parameters()) if c.cfg.patcher.needs_entropy else 0
        else:
            m = TokenLM(c.cfg, c.vocab_size) if c.kind == "bpe" else EntropyModel(c.cfg)
            total = sum(p.numel() for p in m.parameters())
            embedding, entropy = m.tok_embeddings.weight.numel(), 0
    return {"total": total, "non_embedding": total - embedding, "entropy_model": entropy}


def blt_cfg(p, args, mode: str, entropy_dir: Path | None, patch_size: int | None = None) -> BLTConfig:
    """The exact config blt.train will build for these flags (its own code)."""
    ns = argparse.Namespace(config=args.config, patch_mode=mode, patch_size=patch_size, max_patch_length=None,
                            dropout=args.dropout, entropy_model=str(entropy_dir) if entropy_dir else None,
                            threshold=args.threshold if entropy_dir else None, doc_mask=False)  # fmt: skip
    return blt_config(p, ns)[0]


def tokenizer_dir(args) -> Path:
    return Path(args.bpe_tokenizer) if args.bpe_tokenizer else Path(args.runs) / "bpe-tokenizer"


def bpe_tokenizer(args, data):
    """The BPE baseline's tokenizer: trained (blt.train_bpe's way) on the training text into
    tokenizer_dir, or reused from there while its settings are the same."""
    record = {"vocab_size": args.bpe_vocab_size, "data": args.data, "tokenizer_bytes": TOKENIZER_BYTES}
    try:
        return folder_tokenizer(tokenizer_dir(args), record, data.train)
    except ConfigError as e:
        raise Fail(str(e)) from None


def plan(p, args, baseline: EntropyModelConfig, entropy_dir: Path, data, device, measure=None) -> list[Contender]:
    """The chosen contenders (--contenders) with their FLOPs per byte and FLOP-matched step counts.
    measure: a Measurer to use (default: one on RUNS/measure.json)."""
    measure = measure or Measurer(args, data, device)
    ent_cfg = blt_cfg(p, args, "entropy", entropy_dir)
    space_cfg = blt_cfg(p, args, "space", None)
    ent = measure("blt-entropy", ent_cfg, entropy_dir)
    k = max(1, math.floor(ent.train + 0.5))
    static_cfg = blt_cfg(p, args, "static", None, patch_size=k)
    space, static = measure("blt-space", space_cfg), measure("blt-static", static_cfg)
    contenders = [
        Contender("blt-entropy", "BLT", f"entropy θ={ent_cfg.patcher.threshold:.3f}", "blt", ent_cfg, ent.heldout,
                  ent.train, entropy_dir=entropy_dir),
        Contender("blt-space", "BLT", "space", "blt", space_cfg, space.heldout, space.train),
        # Measured too: the BOS patch and each window's last, shorter patch make it a little below k.
        Contender("blt-static", "BLT", f"static, {k} bytes", "blt", static_cfg, static.heldout, static.train),
        Contender("byte-baseline", "byte transformer", "none (1 byte)", "byte", baseline),
    ]
    if "bpe-baseline" in args.contenders:
        tokenizer = bpe_tokenizer(args, data)
        bpt = measure.bytes_per_token(tokenizer)
        seq_len = max(MIN_BPE_SEQ_LEN, round(args.seq_len / bpt.heldout))  # a window covers about --seq-len bytes
        cfg = dataclasses.replace(args.bpe_shape, window=seq_len)
        patching = f"BPE, {tokenizer.vocab_size} ids, {seq_len}-token windows"
        contenders.append(Contender("bpe-baseline", "BPE transformer", patching, "bpe", cfg, bpt.heldout, bpt.train, seq_len,
                                    vocab_size=tokenizer.vocab_size))  # fmt: skip
    contenders = [c for c in contenders if c.name in args.contenders]
    for c in contenders:
        fit_budget(c, args)
    return contenders


def fit_budget(c: Contender, args, charge_entropy: bool = True) -> None:
    """Set c's bytes per step, training and inference FLOPs per byte, its share of --flops in
    steps, and its parameter counts. charge_entropy=False leaves a BLT's entropy-model forward out
    of its training FLOPs (FlopCount.train_blt)."""
    c.seq_len = c.seq_len or args.seq_len
    # a training step's tokens cover the training text's bytes (a BPE token: its bytes there)
    c.bytes_per_step = args.batch_size * args.grad_accum * c.seq_len * (c.train_bytes_per_patch if c.kind == "bpe" else 1)
    if c.kind == "blt":  # a training byte costs what the training text's patches cost
        f = blt_flops_per_byte(c.cfg, c.train_bytes_per_patch, args.seq_len)
        c.train_flops_per_byte = f.train if charge_entropy else f.train_blt
        c.inference_flops_per_byte = blt_flops_per_byte(c.cfg, c.bytes_per_patch, args.seq_len).forward
    elif c.kind == "bpe":
        c.inference_flops_per_byte = token_lm_flops_per_byte(c.cfg, c.vocab_size, c.seq_len, c.bytes_per_patch)
        c.train_flops_per_byte = 3 * token_lm_flops_per_byte(c.cfg, c.vocab_size, c.seq_len, c.train_bytes_per_patch)
    else:
        c.inference_flops_per_byte = transformer_flops_per_byte(c.cfg, args.seq_len)
        c.train_flops_per_byte = 3 * c.inference_flops_per_byte
    step_flops = c.bytes_per_step * c.train_flops_per_byte
    if args.flops < step_flops:
        raise Fail(f"--flops {args.flops:.3g} is less than one training step of {c.name} ({step_flops:.3g} FLOPs = "
                   f"{c.bytes_per_step:.6g} bytes x {c.train_flops_per_byte:.3g} FLOPs/byte); raise --flops or lower "
                   f"--batch-size/--grad-accum/--seq-len")  # fmt: skip
    c.steps = max(1, round(args.flops / step_flops))
    c.params = count_params(c)


def print_plan(contenders: list[Contender], args, train_tokens: int) -> None:
    bytes_per_step = args.batch_size * args.grad_accum * args.seq_len
    print(f"\nbudget {args.flops:.3g} training FLOPs per contender; {bytes_per_step} bytes per step "
          f"(batch {args.batch_size} x grad-accum {args.grad_accum} x seq-len {args.seq_len}); "
          f"{train_tokens} training tokens")  # fmt: skip
    print(f"{'contender':<16} {'bytes/patch':>11} {'(training)':>10} {'train FLOPs/byte':>16} {'steps':>8} "
          f"{'train bytes':>12} {'train FLOPs':>11} {'epochs':>7}")  # fmt: skip
    for c in contenders:
        b = c.steps * c.bytes_per_step
        print(f"{c.name:<16} {c.bytes_per_patch:>11.3f} {c.train_bytes_per_patch:>10.3f} {c.train_flops_per_byte:>16.4g} "
              f"{c.steps:>8} {b:>12.0f} {b * c.train_flops_per_byte:>11.4g} {b / max(train_tokens, 1):>7.3g}")  # fmt: skip
    warmup = args.warmup if args.warmup is not None else TRAIN_DEFAULTS["warmup"]
    short = [c.name for c in contenders if c.steps <= warmup]
    if short:
        print(f"note: {', '.join(short)} train(s) for no more steps than the warmup ({warmup}): set --warmup")
    repeated = [c.name for c in contenders if c.steps * c.bytes_per_step > train_tokens]
    if repeated:
        print(f"note: {', '.join(repeated)} see(s) the training data more than once (epochs > 1)")
    print(flush=True)


def contender_job(c: Contender, args) -> Job:
    plan = {"model": c.name, "config": dataclasses.asdict(c.cfg), "steps": c.steps, "dropout": args.dropout,
            **learning_settings(args)}  # fmt: skip
    tail = (["--dropout", str(args.dropout)] if args.dropout is not None else []) + args.extra_train_args
    if c.kind == "blt":
        # --no-doc-mask: like the byte and BPE LMs, which have no document masking, a BLT reads
        # across the documents of its window
        head = [sys.executable, "-m", "blt.train", "--config", c.config_arg or args.config, "--patch-mode",
                c.cfg.patcher.mode, "--no-doc-mask"]  # fmt: skip
        if c.cfg.patcher.mode == "static":
            head += ["--patch-size", str(c.cfg.patcher.patch_size)]
        if c.cfg.patcher.needs_entropy:
            # patched live from the entropy model, as the measurement and the evaluation patch
            head += ["--entropy-model", str(c.entropy_dir), "--threshold", repr(c.cfg.patcher.threshold),
                     "--no-precomputed-entropies"]  # fmt: skip
        return Job(c.name, Path(args.runs) / c.name, head, tail, c.steps, CONFIG, plan)
    if c.kind == "bpe":
        tokenizer = tokenizer_dir(args)
        plan |= {"vocab_size": c.vocab_size, "seq_len_tokens": c.seq_len, "tokenizer": str(tokenizer)}
        head = [sys.executable, "-m", "blt.train_bpe", "--tokenizer", str(tokenizer), "--dim", str(c.cfg.dim),
                "--layers", str(c.cfg.n_layers), "--heads", str(c.cfg.n_heads), "--window", str(c.cfg.window or 0)]  # fmt: skip
        return Job(c.name, Path(args.runs) / c.name, head, tail, c.steps, TOKEN_LM_WEIGHTS, plan, c.seq_len)
    head = [sys.executable, "-m", "blt.train_entropy", "--dim", str(c.cfg.dim), "--layers", str(c.cfg.n_layers),
            "--heads", str(c.cfg.n_heads), "--window", str(c.cfg.window or 0), "--no-doc-mask"]  # fmt: skip
    return Job(c.name, Path(args.runs) / c.name, head, tail, c.steps, ENTROPY_CONFIG, plan)


def si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def rows(contenders: list[Contender], args) -> list[dict]:
    out = []
    for c in contenders:
        bytes_per_step = c.bytes_per_step
        train_bytes = c.steps * bytes_per_step
        out.append({
            "name": c.name, "model": c.model, "patching": c.patching, "run": str(Path(args.runs) / c.name),
            "params_non_embedding": c.params["non_embedding"], "params_total": c.params["total"],
            "entropy_model_params": c.params["entropy_model"],
            "steps": c.steps, "seq_len": c.seq_len, "bytes_per_step": bytes_per_step, "train_bytes": train_bytes,
            "train_flops_per_byte": c.train_flops_per_byte, "train_flops": train_bytes * c.train_flops_per_byte,
            "inference_flops_per_byte": c.inference_flops_per_byte, "bytes_per_patch": c.bytes_per_patch,
            "train_bytes_per_patch": c.train_bytes_per_patch,
            "eval_bytes_per_patch": c.eval["bytes_per_patch"] if c.eval else None,
            "bpb": c.eval["bpb"] if c.eval else None, "eval_bytes": c.eval["bytes"] if c.eval else None,
        })  # fmt: skip
    return out


def markdown(table: list[dict], args) -> str:
    lines = [
        f"FLOP-matched comparison: {args.flops:.3g} training FLOPs per contender; data {args.data}, "
        f"held-out {args.valid_data}; seq-len {args.seq_len}, "
        f"{args.batch_size * args.grad_accum * args.seq_len} bytes per step (the BPE baseline: as many tokens' worth); "
        f"BLT config {args.config}.",
        "",
        "| model | patching | params (non-emb) | params (total) | steps | train bytes | train FLOPs "
        "| inference FLOPs/byte | mean bytes/patch | held-out BPB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        total = si(r["params_total"])
        if r["entropy_model_params"]:
            total += f" (+{si(r['entropy_model_params'])} entropy model)"
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['patching']} | {si(r['params_non_embedding'])} | {total} | {r['steps']} "
                     f"| {si(r['train_bytes'])} | {r['train_flops']:.3g} | {si(r['inference_flops_per_byte'])} "
                     f"| {r['bytes_per_patch']:.2f} | {bpb} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def device_of(args) -> torch.device:
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")


def load_data(args):
    """The training and held-out byte shards of --data and --valid-data (blt.data's cache)."""
    data = prepare_data(DataConfig(source=args.data, valid_source=args.valid_data, cache_dir=args.cache_dir))
    if len(data.valid) < 2:
        raise Fail(f"--valid-data {args.valid_data}: no held-out bytes")
    return data


def prepare(p, args, baseline: EntropyModelConfig, entropy_dir: Path, data, device,
            measure=None) -> tuple[list[Contender], list[Job]]:  # fmt: skip
    """The contenders (plan, printed) and their training jobs, every job's recorded settings
    checked against its plan.json before any compute is spent."""
    contenders = plan(p, args, baseline, entropy_dir, data, device, measure)
    print_plan(contenders, args, len(data.train))
    jobs = [contender_job(c, args) for c in contenders]
    for job in jobs:
        check_plan(job, write=False)
    return contenders, jobs


def train_all(jobs: list[Job], args) -> None:
    """Train every job that has no model folder yet (continuing interrupted ones), --parallel at a time."""
    if args.parallel > 1:
        train_parallel(jobs, args)
        return
    for job in jobs:
        train_or_skip(job, args)


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    _, baseline, entropy_cfg = check_args(p, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_of(args)
    runs = Path(args.runs)
    try:
        data = load_data(args)
        entropy_dir = entropy_folder(args, entropy_cfg)
        contenders, jobs = prepare(p, args, baseline, entropy_dir, data, device)
        if args.dry_run:
            return
        train_all(jobs, args)
        for c, job in zip(contenders, jobs):
            c.eval = evaluate(job.out, job.model_file, args.valid_data, c.seq_len, args, device)
    except (Fail, DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    table = rows(contenders, args)
    md = markdown(table, args)
    (runs / "table.md").write_text(md)
    settings = {k: v for k, v in vars(args).items() if k not in ("dry_run", "bpe_shape")}
    record = {"budget_flops": args.flops, "settings": settings, "rows": table}
    (runs / "table.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + md, end="")
    print(f"written: {runs / 'table.md'}, {runs / 'table.json'}")


if __name__ == "__main__":
    main()
