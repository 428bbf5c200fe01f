"""Patches vs tokens at equal training FLOPs, over several budgets (paper §5, Figure 6, at our scale).

    python bench/heldout_split.py --out data/mix-split --fraction 0.02 --add data/tinystories/train.txt.xz \\
        --data data/english/{brown_untagged,kjv_bible,nltk_abc,nltk_genesis_english-web,nltk_inaugural}.txt.xz \\
               data/english/{nltk_state_union,nltk_webtext,python3.11_docs_rst,tinyshakespeare}.txt.xz
    python bench/patch_scaling.py --budgets 1e15 3e15 1e16 --data data/mix-split/train \\
        --valid-data data/tinystories/valid.txt.xz --extra-valid data/mix-split/heldout.txt \\
        --train-entropy 1500 --runs runs/scaling --seq-len 2048 --batch-size 32 --lr 1.5e-3 --warmup 100 \\
        --parallel 5 --robustness [--dry-run]

What it runs. For each budget, smallest first, bench/flop_matched.py's comparison with its flags,
contenders, FLOP matching and resumable runs, into RUNS/<budget>/ (e.g. runs/scaling/1e15/), with
one entropy model (--train-entropy: trained once into RUNS/entropy; or --entropy-model) and one BPE
tokenizer (RUNS/bpe-tokenizer) shared by every budget. Every contender is then evaluated on both
held-out sets, --valid-data (the TinyStories development split) and --extra-valid (a held-out slice
of the English mix), in fp32 over every document (flop_matched.evaluate: blt.eval's number, or
the BPE baseline's bits per byte over the same bytes). blt-entropy's θ is --threshold, or else
calibrated to --entropy-target-bytes-per-patch (default 4.5, the paper's) on flop_matched's
training sample (windows spread over the whole training stream), not the entropy model's own
θ: blt.train_entropy calibrates on the first 256 KiB of the training stream, one file of a mixture.

Data. The paper trains on trillions of bytes. Ours train on the English mix and the TinyStories
training text (39 MB of text), which the larger budgets pass over a few times (the dry run prints
the epochs). bench/heldout_split.py cuts the English files into ~8 KiB chunks and holds 2% of
them out by a keyed hash (blt.data.is_heldout): its OUT/train folder is --data (the rest of the
English and, copied, the TinyStories training text), its OUT/heldout.txt is --extra-valid
(about 600 kB), so the training runs never see the slice they are scored on. The planned set
leaves out the 21 MB Linux documentation (4.8 MB compressed): the nine other English files (7.8
MB compressed, 31 MB of text) and TinyStories train and dev (1.9 MB compressed): 9.7 MB to copy
to a GPU box beside the repository.

Model sizes (our rule). The paper trains each size for its compute-optimal number of tokens
(Llama 3's ratio; paper §5, Figure 6), so its models grow with the budget. Here every contender's widths
are its reference shape (--config for the BLTs, --baseline-*/--bpe-* for the baselines, all
meant for --ref-budget) times s = (budget / ref_budget) ** --width-exponent, rounded to whole
attention heads; depths, head widths, the hash tables and the shared entropy model stay. At a
fixed depth the parameters grow as width², so the default exponent 0.25 grows them as
budget^0.5, the compute-optimal exponent (Hoffmann et al. 2022), and the bytes each model sees
grow as budget^0.5 too: bytes per parameter are the same at every budget. That ratio is not the
compute-optimal one. At 1e16 the reference BLT (the tinystories preset, 21M non-embedding
parameters) sees about 165M bytes, 8 bytes a parameter, where the compute-optimal ratio is about
20 tokens a parameter (Hoffmann et al. 2022; the paper takes Llama 3's), about 90 bytes at 4.4
bytes a token; a compute-optimal model at 1e16 (about 9M parameters) would need about 800M bytes,
20 passes over our 39 MB. We keep the largest budget near 4 passes (repeating data up
to about 4 epochs costs little, Muennighoff et al. 2023) and the same ratio at every budget. So
the plot is a scaling curve of models that grow with compute, like Figure 6, but every point is
a model larger than compute-optimal: a line shows how its family scales at that ratio, not at
the optimum. --width-exponent 0 keeps every model at its reference shape and lets the budget set
only the steps: each line is then one model's learning curve (every point a full cosine schedule).

GPU time (the dry run prints it per budget): train bytes / --bytes-per-second (default 2M: the BLT's
measured training speed, 1.7-2.1M bytes/s on one H100 or H200, PROGRESS.md; assumed for the
baselines too) plus
--overhead-per-run (default 60 s: start-up, compilation, evaluations), for the runs one after
another; --parallel overlaps them. With the flags above (flop_matched's defaults for the shapes,
the tinystories preset for the BLT): 1e15 about 7 minutes, 3e15 about 8, 1e16 about 12.

Robustness (--robustness; paper §6.1, Table 3, at our scale): every contender of every budget on
the first --robustness-bytes of --robustness-data (default --valid-data), clean and under each of
blt.robustness's five noise types, bits per byte of the noised text (blt.robustness.noise_rows;
the paper reports task accuracy on noised HellaSwag instead). Kept in RUNS/<budget>/<name>/
robustness.json; tabulated in RUNS/robustness.md and .json.

Resumable. Finished runs, evaluations and noise scores are kept; the same command continues an
interrupted study, and a budget added later runs only its own contenders. RUNS/settings.json records
the settings that change what is trained (data, shapes, size rule, optimisation); another value
of any of them stops the script with a one-line error before anything runs (so does every run's
plan.json, as in flop_matched).

Output: RUNS/scaling.md and RUNS/scaling.json (one row per budget and contender: shape,
parameters, training FLOPs and bytes, inference FLOPs per byte, mean bytes per patch, BPB on each
held-out set) and RUNS/scaling.png (held-out BPB against training FLOPs, log x, a line per
contender, a panel per held-out set); each budget's flop_matched table in RUNS/<budget>/table.md.
"""

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import flop_matched as fm  # noqa: E402
from blt.checkpoint import CheckpointError  # noqa: E402
from blt.config import BLTConfig, ConfigError, TransformerConfig  # noqa: E402
from blt.data import DataError, load_documents  # noqa: E402
from blt.robustness import NOISES, Scorer, noise_rows, take_bytes  # noqa: E402

RECORD = "settings.json"
# the flags that change what is trained; another value in the same --runs is refused
RECORDED = ("data", "valid_data", "config", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "dropout",
            "seed", "threshold", "entropy_model", "train_entropy", "entropy_dim", "entropy_layers", "entropy_heads",
            "entropy_window", "entropy_target_bytes_per_patch", "baseline_dim", "baseline_layers", "baseline_heads",
            "baseline_window", "bpe_dim", "bpe_layers", "bpe_heads", "bpe_vocab_size", "bpe_tokenizer", "ref_budget",
            "width_exponent", "measure_bytes")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/patch_scaling.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("budgets and output")
    g.add_argument("--budgets", type=float, nargs="+", required=True, help="training-FLOP budgets, e.g. 1e15 3e15 1e16")
    fm.add_run_args(g, "runs/scaling")
    g.add_argument("--extra-valid", required=True, help="second held-out source (the English slice of heldout_split.py)")
    g.add_argument("--bytes-per-second", type=float, default=2e6, help="training speed the GPU-time estimate assumes")
    g.add_argument("--overhead-per-run", type=float, default=60.0, help="seconds per run the estimate adds")
    g = p.add_argument_group("model size per budget (module docstring)")
    g.add_argument("--ref-budget", type=float, default=1e16, help="the budget the reference shapes are meant for")
    g.add_argument("--width-exponent", type=float, default=0.25,
                   help="widths x (budget / ref-budget) ** this (0: every budget trains the reference shapes)")  # fmt: skip
    g = p.add_argument_group("robustness (paper Table 3, at our scale)")
    g.add_argument("--robustness", action="store_true", help="score every contender on noised held-out text")
    g.add_argument("--robustness-data", help="the text to noise (default: --valid-data)")
    g.add_argument("--robustness-bytes", type=int, default=200_000, help="its first N document bytes")
    fm.add_comparison_args(p)
    return p


# ---- model sizes ---------------------------------------------------------------------------


def width_scale(args, budget: float) -> float:
    return (budget / args.ref_budget) ** args.width_exponent


def scaled(c: TransformerConfig, s: float) -> TransformerConfig:
    """c with its width times s, rounded to whole heads of the same width (and to a multiple of its
    key/value heads); an explicit FFN width keeps its ratio to the width (a multiple of 16)."""
    group = c.n_heads // c.kv_heads
    heads = max(group, math.floor(c.dim * s / c.head_dim / group + 0.5) * group)
    dim = heads * c.head_dim
    hidden = None if c.ffn_hidden is None else max(16, round(c.ffn_hidden * dim / c.dim / 16) * 16)
    return dataclasses.replace(c, dim=dim, n_heads=heads, ffn_hidden=hidden)


def scaled_blt(cfg: BLTConfig, s: float) -> BLTConfig:
    """The BLT's local models (encoder and decoder alike) and global model scaled by s."""
    return dataclasses.replace(cfg, encoder=scaled(cfg.encoder, s), decoder=scaled(cfg.decoder, s),
                               global_model=scaled(cfg.global_model, s)).validate()  # fmt: skip


def budget_name(budget: float) -> str:
    """1e+15 -> 1e15, 2.5e+15 -> 2.5e15: the budget's folder in RUNS."""
    return re.sub(r"e\+?0*(\d)", r"e\1", f"{budget:.3g}")


def budget_args(p, raw, budget: float, base: BLTConfig, entropy_dir: Path, threshold: float):
    """flop_matched's flags for one budget: its own runs folder, the shared entropy model, θ and BPE
    tokenizer, the shapes scaled for the budget (the BLT's as RUNS/<budget>/blt-config.json)."""
    a = copy.copy(raw)
    s = width_scale(raw, budget)
    a.flops, a.runs = budget, str(Path(raw.runs) / budget_name(budget))
    a.entropy_model, a.train_entropy, a.threshold = str(entropy_dir), None, threshold
    a.bpe_tokenizer = raw.bpe_tokenizer or str(Path(raw.runs) / "bpe-tokenizer")
    config = Path(a.runs) / "blt-config.json"
    write_config(config, scaled_blt(base, s))
    a.config = str(config)
    for prefix in ("baseline", "bpe"):  # the BPE baseline's shape defaults to the byte baseline's
        shape = TransformerConfig(dim=getattr(raw, f"{prefix}_dim") or raw.baseline_dim,
                                  n_layers=1, n_heads=getattr(raw, f"{prefix}_heads") or raw.baseline_heads)  # fmt: skip
        shape = scaled(shape, s)
        setattr(a, f"{prefix}_dim", shape.dim)
        setattr(a, f"{prefix}_heads", shape.n_heads)
    _, baseline, _ = fm.check_args(p, a)
    return a, baseline


# ---- settings record -----------------------------------------------------------------------


def check_settings(args, write: bool) -> None:
    """RUNS/settings.json holds the RECORDED flags of the first run; another value is refused."""
    path = Path(args.runs) / RECORD
    settings = {k: getattr(args, k) for k in RECORDED}
    if path.is_file():
        diff = fm.first_difference(json.loads(path.read_text()), settings)
        if diff:
            k, old, new = diff
            raise fm.Fail(f"{args.runs} was started with other settings (--{k.replace('_', '-')}: {old!r} there, {new!r} "
                          f"now); delete {args.runs} or choose another --runs")  # fmt: skip
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


# ---- tables and plots ----------------------------------------------------------------------


def shape(c: fm.Contender) -> str:
    if c.kind == "blt":
        g = c.cfg.global_model
        return f"global {g.dim}x{g.n_layers}, local {c.cfg.encoder.dim}"
    return f"{c.cfg.dim}x{c.cfg.n_layers}"


def held_out_label(source: str) -> str:
    return Path(source.rstrip("/")).name


def table_rows(budgets: list[tuple], args) -> list[dict]:
    """One row per (budget, contender): flop_matched's row, the budget, the shape and both BPBs."""
    out = []
    for budget, a, contenders, _ in budgets:
        for c, row in zip(contenders, fm.rows(contenders, a)):
            row |= {"budget": budget, "shape": shape(c), "bpb_valid": c.eval["bpb"], "bpb_extra": c.eval_extra["bpb"],
                    "eval_bytes_extra": c.eval_extra["bytes"]}  # fmt: skip
            out.append(row)
    return out


def markdown(table: list[dict], args) -> str:
    valid, extra = held_out_label(args.valid_data), held_out_label(args.extra_valid)
    lines = [
        f"Patches vs tokens at equal training FLOPs: data {args.data}; held-out {args.valid_data} and "
        f"{args.extra_valid}; widths x (budget / {args.ref_budget:.3g}) ** {args.width_exponent:g}.",
        "",
        f"| budget | model | patching | shape | params (non-emb) | params (total) | train FLOPs | train bytes "
        f"| inference FLOPs/byte | mean bytes/patch | BPB {valid} | BPB {extra} |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(f"| {r['budget']:.3g} | {r['model']} | {r['patching']} | {r['shape']} "
                     f"| {fm.si(r['params_non_embedding'])} | {fm.si(r['params_total'])} | {r['train_flops']:.3g} "
                     f"| {fm.si(r['train_bytes'])} | {fm.si(r['inference_flops_per_byte'])} | {r['bytes_per_patch']:.2f} "
                     f"| {r['bpb_valid']:.4f} | {r['bpb_extra']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class Panel:
    title: str
    xlabel: str
    series: dict  # label -> [(x, held-out bits per byte), ...]
    log_x: bool = True


def plot(panels: list[Panel], path: Path, title: str) -> None:
    """The panels side by side, a line per series (points sorted by x), saved as a PNG."""
    from matplotlib.figure import Figure  # draws with Agg when saved; no pyplot, no GUI

    fig = Figure(figsize=(5.5 * len(panels), 4.4), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, points in panel.series.items():
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        if panel.log_x:
            ax.set_xscale("log")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel="held-out bits per byte")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_config(path: Path, cfg: BLTConfig) -> None:
    """Write a run's BLT config (blt.train --config), or keep the same one; another one there was
    written for other settings: refused, the file left as it is."""
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    if path.is_file() and path.read_text() != text:
        k, old, new = fm.first_difference(json.loads(path.read_text()), cfg.to_dict()) or ("the file", "", "")
        raise fm.Fail(f"{path} holds a config for other settings ({k}: {old!r} there, {new!r} now); delete "
                      f"{path.parent} or choose another --runs")  # fmt: skip
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def print_estimate(budgets: list[tuple], args) -> None:
    print(f"GPU time estimate: train bytes / {args.bytes_per_second:.3g} bytes/s + {args.overhead_per_run:g} s per run, "
          f"runs one after another:")  # fmt: skip
    for budget, _, contenders, _ in budgets:
        seconds = sum(c.steps * c.bytes_per_step / args.bytes_per_second + args.overhead_per_run for c in contenders)
        shapes = "; ".join(dict.fromkeys(f"{c.model} {shape(c)}" for c in contenders))
        print(f"  {budget:.3g}: {len(contenders)} runs, {seconds / 60:.1f} minutes ({shapes})")
    print(flush=True)


# ---- robustness ----------------------------------------------------------------------------


def robustness(c: fm.Contender, job: fm.Job, docs: list[bytes], args, device) -> dict:
    """Clean and noised bits per byte of one contender (blt.robustness), kept in its robustness.json."""
    key = {"data": args.robustness_data or args.valid_data, "max_bytes": args.robustness_bytes, "seq_len": c.seq_len,
           "model_mtime_ns": (job.out / "model" / job.model_file).stat().st_mtime_ns}  # fmt: skip
    path = job.out / "robustness.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    score = Scorer(job.out / "model", device, args.batch_size, args.seq_len)
    rows = noise_rows(score, docs, list(NOISES), seed=0)
    result = {"clean": rows[0]["bpb_clean"], **{r["noise"]: r["bpb_noised"] for r in rows}}
    print(f"{job.out}: noised bpb " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def robustness_table(budgets: list[tuple], args, device) -> tuple[list[dict], str]:
    source = args.robustness_data or args.valid_data
    docs = take_bytes(load_documents(source), args.robustness_bytes)
    if not docs:
        raise DataError(f"no documents in {source}")
    table = [{"budget": budget, "name": c.name, "model": c.model, "patching": c.patching,
              **robustness(c, job, docs, a, device)}
             for budget, a, contenders, jobs in budgets for c, job in zip(contenders, jobs)]  # fmt: skip
    lines = [f"Bits per byte on the first {args.robustness_bytes} document bytes of {source}, clean and noised "
             f"(blt.robustness: a noised BPB is over the noised text's own bytes).", "",
             "| budget | model | patching | clean | " + " | ".join(NOISES) + " |",
             "|---:|---|---|---:|" + "---:|" * len(NOISES)]  # fmt: skip
    for r in table:
        lines.append(f"| {r['budget']:.3g} | {r['model']} | {r['patching']} | {r['clean']:.4f} | "
                     + " | ".join(f"{r[n]:.4f}" for n in NOISES) + " |")  # fmt: skip
    return table, "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = parser()
    raw = p.parse_args(argv)
    checks = [
        (all(math.isfinite(b) and b > 0 for b in raw.budgets), "--budgets must be positive numbers of FLOPs"),
        (math.isfinite(raw.ref_budget) and raw.ref_budget > 0, "--ref-budget must be a positive number of FLOPs"),
        (math.isfinite(raw.width_exponent) and raw.width_exponent >= 0, "--width-exponent must be >= 0"),
        (raw.robustness_bytes >= 1, "--robustness-bytes must be >= 1"),
        (raw.bytes_per_second > 0 and raw.overhead_per_run >= 0, "--bytes-per-second must be > 0, --overhead-per-run >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            p.error(message)
    budgets = sorted(set(raw.budgets))
    first = copy.copy(raw)
    first.flops = budgets[0]
    base, _, entropy_cfg = fm.check_args(p, first)  # every flag checked once, before anything runs
    if raw.threads is not None:
        torch.set_num_threads(raw.threads)
    device = fm.device_of(raw)
    runs = Path(raw.runs)
    try:
        check_settings(raw, write=False)
        data = fm.load_data(first)
        entropy_dir = fm.entropy_folder(first, entropy_cfg)  # RUNS/entropy with --train-entropy
        measure = fm.Measurer(first, data, device)  # RUNS/measure.json: the patchers are the same at every budget
        threshold = raw.threshold
        if threshold is None:
            patcher = dataclasses.replace(base.patcher, mode="entropy")  # blt-entropy's, the config's max_patch_length
            threshold = measure.calibrate(entropy_dir, raw.entropy_target_bytes_per_patch, patcher)
        planned = []
        for budget in budgets:
            a, baseline = budget_args(p, raw, budget, base, entropy_dir, threshold)
            contenders, jobs = fm.prepare(p, a, baseline, entropy_dir, data, device, measure)
            for job in jobs:  # one queue holds every budget's runs
                job.name = f"{job.name} at {budget_name(budget)}"
            planned.append((budget, a, contenders, jobs))
        print_estimate(planned, raw)
        if raw.dry_run:
            return
        check_settings(raw, write=True)
        # every budget's runs in one queue, smallest budget first (the flags they share are the same)
        fm.train_all([job for *_, jobs in planned for job in jobs], planned[0][1])
        for _, a, contenders, jobs in planned:
            for c, job in zip(contenders, jobs):
                c.eval = fm.evaluate(job.out, job.model_file, a.valid_data, c.seq_len, a, device)
                c.eval_extra = fm.evaluate(job.out, job.model_file, a.extra_valid, c.seq_len, a, device, "eval-extra.json")
            (Path(a.runs) / "table.md").write_text(fm.markdown(fm.rows(contenders, a), a))
        table = table_rows(planned, raw)
        noise = robustness_table(planned, raw, device) if raw.robustness else None
    except (fm.Fail, DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    md = markdown(table, raw)
    (runs / "scaling.md").write_text(md)
    settings = {k: v for k, v in vars(raw).items() if k != "dry_run"}
    (runs / "scaling.json").write_text(json.dumps({"settings": settings, "rows": table}, indent=2) + "\n")
    panels = [Panel(f"held out: {held_out_label(source)}", "training FLOPs",
                    {name: [(r["train_flops"], r[key]) for r in table if r["name"] == name]
                     for name in dict.fromkeys(r["name"] for r in table)})
              for key, source in (("bpb_valid", raw.valid_data), ("bpb_extra", raw.extra_valid))]  # fmt: skip
    plot(panels, runs / "scaling.png", "held-out bits per byte at equal training FLOPs")
    print("\n" + md, end="")
    written = [runs / "scaling.md", runs / "scaling.json", runs / "scaling.png"]
    if noise is not None:
        (runs / "robustness.md").write_text(noise[1])
        (runs / "robustness.json").write_text(json.dumps({"rows": noise[0]}, indent=2) + "\n")
        print("\n" + noise[1], end="")
        written += [runs / "robustness.md", runs / "robustness.json"]
    print("written: " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
