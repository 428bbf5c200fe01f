"""Plot the learning curves of one or more training runs (blt.train's metrics.jsonl).

    python -m blt.plot_metrics runs/blt runs/baseline/metrics.jsonl --out curves.png --labels BLT "byte LM"
    python -m blt.plot_metrics runs/push/* --table        # a Markdown table of the runs instead

Two panels, one colour per run: bits per byte against training bytes, and against training
seconds (the rows' `elapsed`: wall-clock seconds spent in training steps, evaluations excluded).
Held-out BPB (evaluation rows) is drawn solid with markers, training BPB (log rows) lighter, and
the held-out BPB of a run's weight average (`--ema`: eval_bpb_ema) dashed.

--table prints one row a run: its steps and training bytes at the last row, its last and best
held-out BPB (the step of the best), the last held-out BPB of its weight average, and its
training seconds; with --out it draws the plot too.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

METRICS = "metrics.jsonl"


class MetricsError(ValueError):
    """A metrics file that is missing, empty or malformed."""


@dataclass
class Run:
    label: str
    train: list[dict]  # rows with "bpb"
    evals: list[dict]  # rows with "eval_bpb"


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder or its metrics.jsonl -> Run (label: the run folder's name by default)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise MetricsError(f"metrics file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"bytes", "elapsed"} <= row.keys() or not {"bpb", "eval_bpb"} & row.keys():
            raise MetricsError(f"{path}:{n}: not a metrics row (needs bytes, elapsed and bpb or eval_bpb)")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path} has no metrics rows")
    label = label or path.resolve().parent.name
    return Run(label, [r for r in rows if "bpb" in r], [r for r in rows if "eval_bpb" in r])


def plot(runs: list[Run], out: str | Path) -> None:
    from matplotlib.figure import Figure  # draws with Agg when saved; no pyplot, no GUI

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for i, run in enumerate(runs):
        for ax, x in zip(axes, ("bytes", "elapsed")):
            if run.train:
                ax.plot([r[x] for r in run.train], [r["bpb"] for r in run.train],
                        color=f"C{i}", alpha=0.35, lw=1, label=f"{run.label} (training)")  # fmt: skip
            if run.evals:
                ax.plot([r[x] for r in run.evals], [r["eval_bpb"] for r in run.evals],
                        "o-", color=f"C{i}", ms=3, lw=1.6, label=f"{run.label} (held-out)")  # fmt: skip
            averaged = [r for r in run.evals if "eval_bpb_ema" in r]
            if averaged:
                ax.plot([r[x] for r in averaged], [r["eval_bpb_ema"] for r in averaged],
                        "s--", color=f"C{i}", ms=3, lw=1.2, label=f"{run.label} (held-out, average)")  # fmt: skip
    held_out = [r["eval_bpb"] for run in runs for r in run.evals]
    if held_out:  # early training BPB is far above the range that matters
        axes[0].set_ylim(top=1.15 * max(held_out))
    axes[0].set(xlabel="training bytes", ylabel="bits per byte", title="held-out BPB vs training bytes")
    axes[1].set(xlabel="training seconds (wall clock)", title="held-out BPB vs training time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)


def table(runs: list[Run]) -> str:
    """One Markdown row a run (module docstring)."""

    def bpb(x) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = ["| run | steps | training bytes | held-out BPB (last) | best (step) | weight average (last) | training s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        last = max(run.train + run.evals, key=lambda r: (r["bytes"], "eval_bpb" in r))
        best = min(run.evals, key=lambda r: r["eval_bpb"]) if run.evals else None
        averaged = [r["eval_bpb_ema"] for r in run.evals if "eval_bpb_ema" in r]
        cells = [run.label, str(last.get("step", "-")), f"{last['bytes']:,.0f}",
                 bpb(run.evals[-1]["eval_bpb"] if run.evals else None),
                 f"{bpb(best['eval_bpb'])} ({best.get('step', '-')})" if best else "-",
                 bpb(averaged[-1] if averaged else None), f"{last['elapsed']:,.0f}"]  # fmt: skip
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blt.plot_metrics", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (blt.train --out) or metrics.jsonl files")
    ap.add_argument("--out", help="PNG to write (default curves.png; with --table, none unless given)")
    ap.add_argument("--labels", nargs="+", help="one legend label per run (default: the run folders' names)")
    ap.add_argument("--table", action="store_true", help="print a Markdown table of the runs (module docstring)")
    args = ap.parse_args(argv)
    try:
        if args.labels and len(args.labels) != len(args.runs):
            raise MetricsError(f"{len(args.labels)} labels for {len(args.runs)} runs")
        runs = [read_run(path, label) for path, label in zip(args.runs, args.labels or [None] * len(args.runs))]
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.table:
        print(table(runs))
    out = args.out or (None if args.table else "curves.png")
    if out:
        plot(runs, out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
