"""Patch size and entropy model at a fixed inference budget (paper §5 and Figure 7; §7 and
Figure 8; at our scale).

    python bench/patch_size_study.py --flops 1e16 --data data/mix-split/train \\
        --valid-data data/tinystories/valid.txt.xz --extra-valid data/mix-split/heldout.txt \\
        --runs runs/patch_size --seq-len 2048 --batch-size 32 --lr 1.5e-3 --warmup 100 --parallel 3 [--dry-run]

Every run is a BLT with entropy patching, trained on --flops training FLOPs, with the same
inference FLOPs per byte. Two parts:

    (a) patch size (Figure 7): the first of --entropy-models, θ calibrated for each of
        --patch-sizes (default 3, 4.5, 6 and 8 bytes a patch);
    (b) entropy model (Figure 8): each of --entropy-models (default 128x2x2, 192x4x3, 384x6x6,
        width x layers x heads: 0.46M, 1.9M and 10.8M parameters), θ calibrated for
        --entropy-patch-size (default 4.5).

The run both parts share (the first entropy model at 4.5 bytes) is trained once. The data and the
two held-out sets are bench/patch_scaling.py's (see there).

The inference budget. The paper holds inference FLOPs fixed and lets larger patches pay for a
larger latent transformer (the global model runs once a patch, so at 8 bytes a patch it costs,
per byte, half what it costs at 4). Ours: the reference is --config (default tinystories)
at --ref-bytes-per-patch (default 4.5), F = its forward FLOPs per byte (blt.flops, patcher
excluded). Each run's global transformer is resized so that its forward FLOPs per byte, at the
mean patch size its θ gives on the training sample, equal F: first its width times
sqrt(bytes per patch / 4.5) in whole heads of the same width (depth unchanged), then its FFN
width (a multiple of 16) takes up the rest. That matches F to within 0.2% at the tinystories
shapes (the table gives each run's ratio; the tiny test shapes, 2%). The local encoder and
decoder, the hash tables and the entropy model stay as they are: their FLOPs per byte hardly
depend on the patch size, and the entropy model is the patcher, which the paper's inference
FLOPs leave out too.

The training budget. Every run trains on --flops FLOPs at 3 x its forward FLOPs per byte
(flop_matched.fit_budget, the entropy model's forward not charged), so every run sees the same
bytes and only the patching differs; charging a 10M-parameter entropy model's forward would have
cut its BLT's steps by 30%.

θ is calibrated (blt.patcher.calibrate_threshold, flop_matched.Measurer.calibrate) on a sample of
the training text, windows spread evenly over the whole stream, for the target mean patch size;
the held-out patch size it gives is in the table. The entropy models are trained with
blt.train_entropy, --entropy-steps steps with the study's batch, windows and learning rate, into
RUNS/entropy-<shape>; each is scored on both held-out sets as well.

GPU time (the dry run plans with the targets as patch sizes while the entropy models are not
trained, and prints the estimate; assumptions as in bench/patch_scaling.py): at --flops 1e16,
six BLT runs and three entropy models, about 20 minutes one after another.

Resumable as flop_matched: finished runs, calibrations and evaluations are kept, each run's
plan.json and blt-config.json refuse other settings with a one-line error.

Output: RUNS/study.md, RUNS/study.json and RUNS/study.png (left: held-out BPB against the mean
patch size, part (a); right: against the entropy model's parameters, log x, part (b); a line per
held-out set).
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import flop_matched as fm  # noqa: E402
import patch_scaling as ps  # noqa: E402
from blt.checkpoint import ENTROPY_CONFIG, CheckpointError  # noqa: E402
from blt.config import PRESETS, BLTConfig, ConfigError, EntropyModelConfig  # noqa: E402
from blt.data import DataError  # noqa: E402
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.flops import blt_flops_per_byte  # noqa: E402

FFN_STEP = 16  # the global FFN width is a multiple of this


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/patch_size_study.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("budget and output")
    g.add_argument("--flops", type=float, required=True, help="training-FLOP budget of every run, e.g. 1e16")
    fm.add_run_args(g, "runs/patch_size")
    g.add_argument("--extra-valid", required=True, help="second held-out source (bench/heldout_split.py's slice)")
    g.add_argument("--bytes-per-second", type=float, default=2e6, help="training speed the GPU-time estimate assumes")
    g.add_argument("--overhead-per-run", type=float, default=60.0, help="seconds per run the estimate adds")
    g = p.add_argument_group("the study")
    g.add_argument("--config", default="tinystories",
                   help=f"the reference BLT, preset ({', '.join(PRESETS)}) or JSON file: its forward FLOPs per byte at "
                        "--ref-bytes-per-patch are every run's")  # fmt: skip
    g.add_argument("--ref-bytes-per-patch", type=float, default=4.5, help="the reference's mean patch size")
    g.add_argument("--patch-sizes", type=float, nargs="+", default=[3, 4.5, 6, 8], help="part (a): target bytes/patch")
    g.add_argument("--entropy-models", nargs="+", default=["128x2x2", "192x4x3", "384x6x6"],
                   help="part (b): entropy model shapes, WIDTHxLAYERSxHEADS; the first is part (a)'s")  # fmt: skip
    g.add_argument("--entropy-patch-size", type=float, default=4.5, help="part (b): target bytes/patch")
    g.add_argument("--entropy-window", type=int, default=512, help="the entropy models' attention window (0: full)")
    g.add_argument("--entropy-steps", type=int, default=1500, help="training steps of each entropy model")
    g.add_argument("--extra-entropy-args", default="", help="string appended to each entropy model's training command")
    fm.add_training_args(p)
    return p


def entropy_shape(p, base: BLTConfig, text: str, window: int) -> EntropyModelConfig:
    try:
        dim, layers, heads = (int(v) for v in text.lower().split("x"))
        cfg = dataclasses.replace(base.entropy_model, dim=dim, n_layers=layers, n_heads=heads, window=window or None)
        cfg.validate(f"--entropy-models {text}")
    except (ValueError, ConfigError) as e:
        p.error(f"--entropy-models {text}: not WIDTHxLAYERSxHEADS of a valid model ({e})")
    return cfg


def entropy_params(cfg: EntropyModelConfig) -> int:
    with torch.device("meta"):
        return sum(t.numel() for t in EntropyModel(cfg).parameters())


def fit_global(cfg: BLTConfig, bytes_per_patch: float, ref_bytes_per_patch: float, target: float, seq_len: int) -> BLTConfig:
    """cfg with its global transformer resized so that the BLT's forward FLOPs per byte at
    bytes_per_patch equal target (module docstring): width x sqrt(bytes_per_patch / ref) in
    whole heads, then the FFN width, whose FLOPs are linear in it, solved and rounded to FFN_STEP."""
    g = ps.scaled(cfg.global_model, math.sqrt(bytes_per_patch / ref_bytes_per_patch))
    g = dataclasses.replace(g, ffn_hidden=g.hidden)
    flops = blt_flops_per_byte(dataclasses.replace(cfg, global_model=g), bytes_per_patch, seq_len).forward
    per_unit = 2 * 3 * g.dim * g.n_layers / bytes_per_patch  # FLOPs per byte of one more FFN unit
    hidden = round((g.hidden + (target - flops) / per_unit) / FFN_STEP) * FFN_STEP
    if hidden < FFN_STEP:
        raise fm.Fail(f"no global FFN width gives {target:.4g} FLOPs/byte at {bytes_per_patch:.2f} bytes/patch")
    return dataclasses.replace(cfg, global_model=dataclasses.replace(g, ffn_hidden=hidden)).validate()


def reference_config(p, args) -> BLTConfig:
    try:
        if args.config in PRESETS:
            return PRESETS[args.config]()
        if Path(args.config).is_file():
            return BLTConfig.from_json(args.config)
    except ConfigError as e:
        p.error(str(e))
    p.error(f"--config {args.config!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")


def run_name(shape: str, target: float) -> str:
    return f"e{shape.lower()}-ps{target:g}"


def plan_run(p, args, base: BLTConfig, measure, shape: str, entropy: fm.Job, target: float, reference: float):
    """One BLT run: θ for the target, the global model sized for the reference's FLOPs, its share
    of the budget. -> (contender, θ or None when the entropy model is not trained yet: a dry run
    then plans at the target patch size)."""
    name = run_name(shape, target)
    entropy_dir = entropy.out / "model"
    if entropy.finished:
        theta = measure.calibrate(entropy_dir, target, dataclasses.replace(base.patcher, mode="entropy"))
        cfg = fm.blt_cfg(p, argparse.Namespace(**{**vars(args), "threshold": theta}), "entropy", entropy_dir)
        sizes = measure(name, cfg, entropy_dir)
    else:
        theta, sizes = None, fm.PatchSizes(target, target)
        cfg = dataclasses.replace(base, entropy_model=EntropyModelConfig(**entropy.plan["shape"]),
                                  patcher=dataclasses.replace(base.patcher, mode="entropy"))  # fmt: skip
    cfg = fit_global(cfg, sizes.train, args.ref_bytes_per_patch, reference, args.seq_len)
    config = Path(args.runs) / name / "blt-config.json"
    patching = f"entropy θ={theta:.3f}" if theta is not None else "entropy (θ not yet calibrated)"
    c = fm.Contender(name, "BLT", patching, "blt", cfg, sizes.heldout, sizes.train, config_arg=str(config),
                     entropy_dir=entropy_dir)  # fmt: skip
    fm.fit_budget(c, args, charge_entropy=False)
    return c, theta


def study_rows(runs: list[tuple], entropies: dict, reference: float, args) -> list[dict]:
    out = []
    for (c, theta, shape, target, parts), row in zip(runs, fm.rows([r[0] for r in runs], args)):
        g = c.cfg.global_model
        matched = blt_flops_per_byte(c.cfg, c.train_bytes_per_patch, args.seq_len).forward
        e = entropies[shape]
        row |= {"parts": parts, "entropy_model": shape, "entropy_params": e["params"], "target_bytes_per_patch": target,
                "threshold": theta, "global": f"{g.dim}x{g.n_layers}, FFN {g.hidden}",
                "matched_flops_per_byte": matched, "matched_ratio": matched / reference,
                "bpb_valid": c.eval["bpb"] if c.eval else None, "bpb_extra": c.eval_extra["bpb"] if c.eval_extra else None,
                "entropy_bpb_valid": e.get("bpb_valid"), "entropy_bpb_extra": e.get("bpb_extra")}  # fmt: skip
        out.append(row)
    return out


def markdown(table: list[dict], reference: float, args) -> str:
    valid, extra = ps.held_out_label(args.valid_data), ps.held_out_label(args.extra_valid)
    lines = [
        f"Patch size and entropy model at {fm.si(reference)} forward FLOPs per byte ({args.config} at "
        f"{args.ref_bytes_per_patch:g} bytes/patch) and {args.flops:.3g} training FLOPs a run; data {args.data}.",
        "",
        f"| part | entropy model | params | BPB {valid} | target bytes/patch | θ | bytes/patch (train) "
        f"| bytes/patch ({valid}) | global (width x layers) | params (non-emb) | FLOPs/byte vs reference | train bytes "
        f"| BPB {valid} | BPB {extra} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['parts']} | {r['entropy_model']} | {fm.si(r['entropy_params'])} "
                     f"| {fmt(r['entropy_bpb_valid'], '.4f')} | {r['target_bytes_per_patch']:g} | {fmt(r['threshold'], '.3f')} "
                     f"| {r['train_bytes_per_patch']:.2f} | {r['bytes_per_patch']:.2f} | {r['global']} "
                     f"| {fm.si(r['params_non_embedding'])} | {r['matched_ratio']:.4f} | {fm.si(r['train_bytes'])} "
                     f"| {fmt(r['bpb_valid'], '.4f')} | {fmt(r['bpb_extra'], '.4f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def panels(table: list[dict], args) -> list[ps.Panel]:
    held_out = [("bpb_valid", ps.held_out_label(args.valid_data)), ("bpb_extra", ps.held_out_label(args.extra_valid))]
    a = [r for r in table if "a" in r["parts"]]
    b = [r for r in table if "b" in r["parts"]]
    return [
        ps.Panel("(a) patch size", "mean bytes per patch (training text)",
                 {label: [(r["train_bytes_per_patch"], r[key]) for r in a] for key, label in held_out}, log_x=False),
        ps.Panel(f"(b) entropy model, {args.entropy_patch_size:g} bytes/patch", "entropy model parameters",
                 {label: [(r["entropy_params"], r[key]) for r in b] for key, label in held_out}),
    ]  # fmt: skip


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    checks = [
        (math.isfinite(args.flops) and args.flops > 0, "--flops must be a positive number of FLOPs"),
        (all(t >= 1 for t in [*args.patch_sizes, args.entropy_patch_size, args.ref_bytes_per_patch]),
         "--patch-sizes, --entropy-patch-size and --ref-bytes-per-patch must be >= 1"),
        (args.entropy_steps >= 1 and args.entropy_window >= 0, "--entropy-steps must be >= 1 and --entropy-window >= 0"),
        (args.bytes_per_second > 0 and args.overhead_per_run >= 0, "--bytes-per-second must be > 0, --overhead-per-run >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            p.error(message)
    fm.check_training_args(p, args)
    args.extra_entropy_args = fm.split_flag(p, args, "extra_entropy_args")
    base = reference_config(p, args)
    shapes = {s: entropy_shape(p, base, s, args.entropy_window) for s in dict.fromkeys(args.entropy_models)}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = fm.device_of(args)
    runs = Path(args.runs)
    reference = blt_flops_per_byte(base, args.ref_bytes_per_patch, args.seq_len).forward
    first = next(iter(shapes))
    wanted = {(first, t): "a" for t in args.patch_sizes}
    for shape in shapes:
        wanted[(shape, args.entropy_patch_size)] = wanted.get((shape, args.entropy_patch_size), "") + "b"
    try:
        data = fm.load_data(args)
        entropy_jobs = {s: fm.entropy_job(args, cfg, runs / f"entropy-{s.lower()}", args.entropy_steps,
                                          args.entropy_patch_size, args.extra_entropy_args, f"entropy-{s.lower()}")
                        for s, cfg in shapes.items()}  # fmt: skip
        for job in entropy_jobs.values():
            fm.check_plan(job, write=False)
        if not args.dry_run:
            fm.train_all(list(entropy_jobs.values()), args)  # θ is calibrated with them
        measure = fm.Measurer(args, data, device)
        planned = [(*plan_run(p, args, base, measure, s, entropy_jobs[s], t, reference), s, t, ", ".join(parts))
                   for (s, t), parts in wanted.items()]  # fmt: skip
        contenders = [r[0] for r in planned]
        fm.print_plan(contenders, args, len(data.train))
        jobs = [fm.contender_job(c, args) for c in contenders]
        for job in jobs:
            fm.check_plan(job, write=False)
        seconds = sum(c.steps * c.bytes_per_step / args.bytes_per_second + args.overhead_per_run for c in contenders)
        seconds += sum(j.steps * args.batch_size * args.grad_accum * args.seq_len / args.bytes_per_second
                       + args.overhead_per_run for j in entropy_jobs.values() if not j.finished)  # fmt: skip
        print(f"GPU time estimate, one run after another: {seconds / 60:.1f} minutes\n", flush=True)
        if args.dry_run:
            return
        for c in contenders:
            ps.write_config(Path(c.config_arg), c.cfg)
        fm.train_all(jobs, args)
        for c, job in zip(contenders, jobs):
            c.eval = fm.evaluate(job.out, job.model_file, args.valid_data, c.seq_len, args, device)
            c.eval_extra = fm.evaluate(job.out, job.model_file, args.extra_valid, c.seq_len, args, device, "eval-extra.json")
        entropies = {}
        for s, job in entropy_jobs.items():
            entropies[s] = {"params": entropy_params(shapes[s]),
                            "bpb_valid": fm.evaluate(job.out, ENTROPY_CONFIG, args.valid_data, args.seq_len, args, device)["bpb"],
                            "bpb_extra": fm.evaluate(job.out, ENTROPY_CONFIG, args.extra_valid, args.seq_len, args, device,
                                                     "eval-extra.json")["bpb"]}  # fmt: skip
    except (fm.Fail, DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    table = study_rows(planned, entropies, reference, args)
    md = markdown(table, reference, args)
    (runs / "study.md").write_text(md)
    settings = {k: v for k, v in vars(args).items() if k != "dry_run"}
    (runs / "study.json").write_text(json.dumps({"reference_flops_per_byte": reference, "settings": settings,
                                                 "rows": table}, indent=2) + "\n")  # fmt: skip
    ps.plot(panels(table, args), runs / "study.png", "held-out bits per byte at equal inference and training FLOPs")
    print("\n" + md, end="")
    print(f"written: {runs / 'study.md'}, {runs / 'study.json'}, {runs / 'study.png'}")


if __name__ == "__main__":
    main()
