"""Show where a BLT checkpoint cuts a text into patches, like Figure 3 of the BLT paper.

    python -m blt.visualize --text "Daenerys Targaryen is in Game of Thrones" --out patches.png
    python -m blt.visualize --text "..." --terminal [--checkpoint DIR] [--mode monotonic] [--threshold 1.2]

The folder's entropy model runs over BOS + the text's bytes and blt.patcher.patch_starts, with
the folder's PatcherConfig (max_patch_length included; mode and θ overridable), places the
boundaries. Whether byte p opens a patch is decided by H[p-1], the entropy of the prediction made
at the byte before it, so the curve shows H(x_p | x_<p) at byte p. The BOS patch is left out:
counts are over the text's bytes.

PNG: the entropy per byte (bytes that open a patch in red), θ dashed (entropy and combined
modes, which threshold H itself), patch boundaries as vertical lines over alternating shading,
the bytes as x tick labels, 80 bytes per row. Terminal (--terminal): the text with patches
separated by '|' (alternating background colours instead when stdout is a TTY), an entropy
sparkline under it, and `bytes=<n> patches=<m> bytes_per_patch=<x> threshold=<θ>`.
Modes without entropies (static, space, byte) show the boundaries, and the curve if the folder
holds an entropy model.
"""

import argparse
import os
import sys
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from blt.checkpoint import ENTROPY_WEIGHTS, CheckpointError, load_entropy_model, load_model
from blt.config import PATCH_MODES, PatcherConfig
from blt.patcher import patch_starts
from blt.tokens import encode

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints"
ROW_BYTES = 80  # bytes per plot row; columns per terminal row
SPECIAL = {" ": "␣", "\n": "⏎", "\t": "⇥"}
SPARKS = "▁▂▃▄▅▆▇█"
SHADES = ("#dce9f5", "#f7e3cc")  # plot background of even / odd patches
ANSI_BG = ("\x1b[48;5;153m", "\x1b[48;5;223m")  # terminal background of even / odd patches


@dataclass
class PatchView:
    data: bytes
    starts: list[bool]  # per byte: does it open a patch?
    entropies: list[float] | None  # per byte p: H(x_p | x_<p) in nats
    cfg: PatcherConfig

    @property
    def lengths(self) -> list[int]:
        cuts = [i for i, s in enumerate(self.starts) if s] + [len(self.data)]
        return [b - a for a, b in zip(cuts, cuts[1:])]

    def summary(self) -> str:
        n, m = len(self.data), len(self.lengths)
        theta = f"{self.cfg.threshold:.4g}" if self.cfg.needs_entropy else "none"
        return f"bytes={n} patches={m} bytes_per_patch={n / m:.2f} threshold={theta}"


def analyse(data: bytes, cfg: PatcherConfig, entropy_model=None) -> PatchView:
    """Patch BOS + data as the model would; entropies need an entropy model, else None."""
    tokens = torch.tensor([encode(data)])
    H = entropy_model.entropies(tokens) if entropy_model is not None else None
    starts = patch_starts(tokens, cfg, H)[0, 1 : len(data) + 1]  # position 0 is BOS
    return PatchView(data, starts.tolist(), None if H is None else H[0, : len(data)].tolist(), cfg)


def byte_labels(data: bytes) -> list[str]:
    """One label per byte: a character on its (first) byte, '·' on the rest of a multi-byte
    UTF-8 character, SPECIAL for whitespace, two hex digits for anything else."""
    out = []
    while len(out) < len(data):
        i = len(out)
        for n in range(1, 5):
            try:
                ch = data[i : i + n].decode()
                break
            except UnicodeDecodeError:
                pass
        else:
            out.append(f"{data[i]:02x}")
            continue
        if ch in SPECIAL:
            out.append(SPECIAL[ch])
        elif ch.isprintable():
            out += ["◌" + ch if unicodedata.combining(ch) else ch] + ["·"] * (n - 1)
        else:
            out += [f"{b:02x}" for b in data[i : i + n]]
    return out


def _width(s: str) -> int:
    """Terminal columns of s: wide East Asian characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 1 + (unicodedata.east_asian_width(c) in "WF") for c in s)


def sparkline(entropies: list[float]) -> list[str]:
    """One bar per byte, scaled to the largest entropy in the text."""
    top = max(max(entropies), 1e-9)
    return [SPARKS[round(h / top * (len(SPARKS) - 1))] for h in entropies]


def render_terminal(view: PatchView, color: bool, columns: int = ROW_BYTES) -> str:
    """Rows of at most `columns` cells: the bytes (patches split by '|', or coloured), the
    entropy sparkline aligned under them; rows separated by a blank line; then the summary."""
    labels = [lab if color or lab != "|" else "¦" for lab in byte_labels(view.data)]  # '|' is ours
    sparks = sparkline(view.entropies) if view.entropies else [" "] * len(labels)
    rows, text, spark, used, patch = [], "", "", 0, -1
    for i, (label, bar) in enumerate(zip(labels, sparks)):
        cells = [(label, bar.ljust(_width(label)))]
        if view.starts[i]:
            patch += 1
            if i and not color:
                cells.insert(0, ("|", " "))
        for t, s in cells:
            w = _width(t)
            if used + w > columns and used:
                rows.append((text, spark))
                text, spark, used = "", "", 0
            if color:
                t, s = (f"{ANSI_BG[patch % 2]}{x}\x1b[0m" for x in (t, s))
            text, spark, used = text + t, spark + s, used + w
    rows.append((text, spark))
    blocks = [t + ("\n" + s.rstrip() if view.entropies else "") for t, s in rows]
    return "\n\n".join(blocks) + "\n\n" + view.summary()


def plot(view: PatchView, out: str | Path, row_bytes: int = ROW_BYTES) -> None:
    """Save the figure as PNG: one row of subplots per `row_bytes` bytes."""
    from matplotlib import font_manager
    from matplotlib.figure import Figure  # draws with Agg when saved; no pyplot, no GUI
    from matplotlib.ft2font import FT2Font

    n, H, cfg = len(view.data), view.entropies, view.cfg
    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    labels = [
        lab if all(font.get_char_index(ord(c)) for c in lab) else f"{b:02x}"
        for lab, b in zip(byte_labels(view.data), view.data)
    ]  # fmt: skip
    cuts = [i for i, s in enumerate(view.starts) if s] + [n]
    theta = cfg.threshold if cfg.mode in ("entropy", "combined") else None
    top = 1.35 * max((H or [1.0]) + ([theta] if theta is not None else []))
    rows, span = -(-n // row_bytes), min(n, row_bytes)
    fig = Figure(figsize=(max(8.0, 1.5 + 0.17 * span), 0.8 + 2.2 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for r, ax in enumerate(axes):
        lo, hi = r * row_bytes, min(n, (r + 1) * row_bytes)
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if a < hi and b > lo:
                ax.axvspan(a - 0.5, b - 0.5, color=SHADES[k % 2], lw=0)
                ax.axvline(a - 0.5, color="0.4", lw=0.8)
        if H:
            xs = range(lo, hi)
            ax.plot(xs, H[lo:hi], "-o", color="C0", ms=3, lw=1, label="H(x_p | x_<p)")
            opens = [i for i in xs if view.starts[i]]
            ax.plot(opens, [H[i] for i in opens], "o", color="C3", ms=4, label="opens a patch", zorder=3)
        if theta is not None:
            ax.axhline(theta, ls="--", color="k", lw=0.9, label=f"θ = {theta:.3g}")
        ax.set_xlim(lo - 0.5, lo + span - 0.5)
        ax.set_ylim(0, top)
        ax.set_xticks(range(lo, hi), labels[lo:hi], fontsize=7)
        ax.tick_params(axis="x", length=0)
        ax.set_ylabel("entropy (nats)" if H else "")
        if H is None:
            ax.set_yticks([])
    if H or theta is not None:
        axes[0].legend(loc="upper right", fontsize=7, ncols=3)
    axes[0].set_title(f"{cfg.mode} patching, max_patch_length={cfg.max_patch_length}\n{view.summary()}", fontsize=9)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blt.visualize", description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="text to patch (UTF-8)")
    ap.add_argument("--out", help="PNG to write (default: patches.png, or none with --terminal)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="model folder (default: checkpoints/ beside the blt package)")  # fmt: skip
    ap.add_argument("--terminal", action="store_true", help="print the patches, entropies and a summary")
    ap.add_argument("--threshold", type=float, help="θ instead of the checkpoint's")
    ap.add_argument("--mode", choices=PATCH_MODES, help="patching mode instead of the checkpoint's")
    args = ap.parse_args(argv)
    data = os.fsencode(args.text)  # the exact argv bytes
    try:
        if not data:
            raise ValueError("--text is empty")
        model = load_model(args.checkpoint)
        p = model.cfg.patcher
        cfg = replace(p, mode=args.mode or p.mode, threshold=p.threshold if args.threshold is None else args.threshold)
        em = model.entropy_model
        if em is None and (Path(args.checkpoint) / ENTROPY_WEIGHTS).is_file():
            em = load_entropy_model(args.checkpoint, cfg=model.cfg.entropy_model)
        if cfg.needs_entropy and em is None:
            raise ValueError(f"mode {cfg.mode!r} needs an entropy model; {args.checkpoint} has none")
    except (CheckpointError, ValueError) as e:
        default = isinstance(e, CheckpointError) and args.checkpoint == str(DEFAULT_CHECKPOINT)
        hint = " (no model there yet: train one, or pass --checkpoint DIR)" if default else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    view = analyse(data, cfg, em)
    if args.terminal:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(encoding="utf-8", errors="replace")
        print(render_terminal(view, color=sys.stdout.isatty()), flush=True)
    out = args.out or (None if args.terminal else "patches.png")
    if out:
        plot(view, out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
