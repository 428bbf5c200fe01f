"""blt.visualize (patch plots and terminal rendering) and blt.plot_metrics (learning curves).

A tiny random-init model with a sharpened entropy model and a calibrated θ is saved once; the
CLIs run in-process (one subprocess checks `python -m` and the exit code).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blt import config as C
from blt import plot_metrics, visualize
from blt.checkpoint import from_pretrained, save_model
from blt.entropy_model import EntropyModel
from blt.model import BLT
from blt.patcher import calibrate_threshold, patch_starts
from blt.tokens import encode

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = ("Once upon a time, there was a little girl named Lily. She liked to play outside in the sun.\n"
        "One day she saw a big red ball | and ran to get it.")  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = C.tiny()  # entropy patching, max_patch_length=8
    em = EntropyModel(cfg.entropy_model)
    with torch.no_grad():
        em.output.weight.mul_(8.0)  # random init gives near-uniform entropies: sharpen them
    tokens = torch.tensor([encode(TEXT)])
    cfg.patcher.threshold, _ = calibrate_threshold(em.entropies(tokens), tokens, cfg.patcher, 3.5)
    path = tmp_path_factory.mktemp("vis") / "model"
    save_model(BLT(cfg, em), path)
    return path


def expected_lengths(ckpt: Path, text: str, **override) -> list[int]:
    """Patch lengths of the text's bytes, straight from patch_starts (BOS patch dropped)."""
    model = from_pretrained(ckpt)
    cfg = C.PatcherConfig(**{**model.cfg.patcher.__dict__, **override})
    tokens = torch.tensor([encode(text)])
    starts = patch_starts(tokens, cfg, model.entropy_model.entropies(tokens))[0, 1 : tokens.shape[1]].tolist()
    cuts = [i for i, s in enumerate(starts) if s] + [len(starts)]
    return [b - a for a, b in zip(cuts, cuts[1:])]


def terminal(ckpt: Path, capsys, text: str = TEXT, *flags: str) -> tuple[list[str], list[str], str]:
    """Run --terminal (stdout is not a TTY under capsys) -> (text rows, sparkline rows, summary)."""
    assert visualize.main(["--text", text, "--checkpoint", str(ckpt), "--terminal", *flags]) == 0
    *blocks, summary = capsys.readouterr().out.rstrip("\n").split("\n\n")
    rows = [b.split("\n") for b in blocks]
    assert all(len(r) == 2 for r in rows)
    return [r[0] for r in rows], [r[1] for r in rows], summary


def test_terminal_segmentation_matches_patch_starts(ckpt, capsys):
    texts, sparks, summary = terminal(ckpt, capsys)
    segments = "".join(texts).split("|")
    lengths = expected_lengths(ckpt, TEXT)
    assert [len(s) for s in segments] == lengths  # ASCII: one character per byte
    assert "".join(segments).replace("␣", " ").replace("⏎", "\n").replace("¦", "|") == TEXT
    assert len(set(lengths)) > 1 and max(lengths) <= 8  # mixed sizes, max_patch_length honoured
    assert len(texts) > 1 and all(len(t) <= visualize.ROW_BYTES for t in texts)  # wrapped
    for t, s in zip(texts, sparks):  # the sparkline sits under the bytes, blank under the '|'
        assert len(s) <= len(t) and all((c == " ") == (d == "|") for c, d in zip(s, t))
        assert set(s) <= set(visualize.SPARKS + " ")
    n, m = len(TEXT.encode()), len(lengths)
    theta = from_pretrained(ckpt).cfg.patcher.threshold
    assert summary == f"bytes={n} patches={m} bytes_per_patch={n / m:.2f} threshold={theta:.4g}"


def test_overrides_and_other_modes(ckpt, capsys):
    texts, _, summary = terminal(ckpt, capsys, TEXT, "--threshold", "100")  # only max_patch_length cuts
    assert [len(s) for s in "".join(texts).split("|")][:-1] == [8] * (len(TEXT) // 8)
    assert summary.endswith("threshold=100")
    for mode in ("monotonic", "combined"):
        texts, _, _ = terminal(ckpt, capsys, TEXT, "--mode", mode)
        assert [len(s) for s in "".join(texts).split("|")] == expected_lengths(ckpt, TEXT, mode=mode)
    texts, sparks, summary = terminal(ckpt, capsys, TEXT, "--mode", "static")
    assert {len(s) for s in "".join(texts).split("|")[:-1]} == {4}
    assert summary.endswith("threshold=none") and any(s.strip() for s in sparks)  # the curve is still there


def test_non_ascii_labels_and_alignment(ckpt, capsys):
    assert visualize.byte_labels("é a\n\t".encode() + b"\xff") == ["é", "·", "␣", "a", "⏎", "⇥", "ff"]
    assert visualize.byte_labels("中😀".encode()) == ["中", "·", "·", "😀", "·", "·", "·"]
    text = "naïve 中文 😀 \x01 ok"
    texts, sparks, summary = terminal(ckpt, capsys, text)
    assert summary.startswith(f"bytes={len(text.encode())} ") and "01" in texts[0]
    for t, s in zip(texts, sparks):  # wide characters take two columns, the sparkline follows
        assert visualize._width(s) <= visualize._width(t)


def test_entropy_alignment(ckpt):
    """The entropy shown at byte p is the one that decides whether p opens a patch."""
    model = from_pretrained(ckpt)
    cfg = C.PatcherConfig(mode="entropy", threshold=model.cfg.patcher.threshold, max_patch_length=None)
    view = visualize.analyse(TEXT.encode(), cfg, model.entropy_model)
    assert view.starts[0] and view.starts[1:] == [h > cfg.threshold for h in view.entropies[1:]]


def test_colour_rendering(ckpt):
    model = from_pretrained(ckpt)
    view = visualize.analyse(TEXT.encode(), model.cfg.patcher, model.entropy_model)
    blocks = visualize.render_terminal(view, color=True).split("\n\n")[:-1]
    text = "".join(block.split("\n")[0] for block in blocks)
    cells = re.findall(r"\x1b\[(48;5;\d+)m(.*?)\x1b\[0m", text)
    assert "".join(c for _, c in cells) == "".join(visualize.byte_labels(TEXT.encode()))  # no '|': colours
    colours = [code for (code, _), start in zip(cells, view.starts) if start]  # one per patch
    assert len(colours) == len(view.lengths) and all(a != b for a, b in zip(colours, colours[1:]))


def test_png(ckpt, tmp_path):
    for name, text in (("short.png", "Hi there"), ("long.png", TEXT)):
        out = tmp_path / name
        assert visualize.main(["--text", text, "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        data = out.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    out = tmp_path / "sub" / "static.png"
    assert visualize.main(["--text", "naïve 中文", "--checkpoint", str(ckpt), "--out", str(out), "--mode", "space"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_checkpoint_without_entropy_model(tmp_path, capsys):
    cfg = C.tiny()
    cfg.patcher.mode = "space"
    save_model(BLT(cfg), tmp_path / "space")
    argv = ["--text", "Hello there, how are you?", "--checkpoint", str(tmp_path / "space")]
    assert visualize.main([*argv, "--terminal", "--out", str(tmp_path / "s.png")]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["Hello␣|there,|␣how␣|are␣|you?", ""]  # no sparkline
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    assert visualize.main([*argv, "--mode", "entropy"]) == 1
    assert "needs an entropy model" in capsys.readouterr().err


def test_visualize_errors(ckpt, tmp_path, capsys):
    for argv, msg in (
        (["--text", "", "--checkpoint", str(ckpt)], "--text is empty"),
        (["--text", "hi", "--checkpoint", str(tmp_path / "nope")], "checkpoint folder not found"),
    ):
        assert visualize.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_visualize_cli_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blt.visualize", "--text", "hi", "--checkpoint", str(tmp_path / "x")],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def write_metrics(path: Path, steps: int = 50, speed: float = 1.0) -> None:
    rows = []
    for step in range(10, steps + 1, 10):
        b, t = step * 4096, step * 0.5 / speed
        rows.append({"step": step, "loss": 3 / step**0.3, "bpb": 4.3 / step**0.3, "lr": 1e-3, "bytes": b,
                     "bytes_per_s": 8192.0, "bytes_per_patch": 4.0, "grad_norm": 1.0, "elapsed": t})  # fmt: skip
        if step % 20 == 0:
            rows.append({"step": step, "eval_bpb": 4.5 / step**0.3, "bytes": b, "elapsed": t})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_metrics(tmp_path):
    write_metrics(tmp_path / "blt" / "metrics.jsonl")
    write_metrics(tmp_path / "base" / "metrics.jsonl", speed=2.0)
    run = plot_metrics.read_run(tmp_path / "blt")
    assert run.label == "blt" and len(run.train) == 5 and len(run.evals) == 2
    out = tmp_path / "curves.png"
    argv = [str(tmp_path / "blt"), str(tmp_path / "base" / "metrics.jsonl"), "--out", str(out), "--labels", "BLT", "LM"]
    assert plot_metrics.main(argv) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_plot_metrics_table(tmp_path, capsys):
    write_metrics(tmp_path / "blt" / "metrics.jsonl")
    rows = (tmp_path / "blt" / "metrics.jsonl").read_text().splitlines()
    rows = [r.replace('"eval_bpb"', '"eval_bpb_ema": 1.25, "eval_bpb"') if '"step": 40, "eval_bpb"' in r else r
            for r in rows]  # the step-40 evaluation of the average  # fmt: skip
    rows.append(json.dumps({"step": 60, "eval_bpb": 9.0, "bytes": 60 * 4096, "elapsed": 30.0}))  # worse, last
    (tmp_path / "ema" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "ema" / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert plot_metrics.main([str(tmp_path / "blt"), str(tmp_path / "ema"), "--table"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and not (tmp_path / "curves.png").exists()  # a table alone: no plot
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0] == ["blt", "50", "204,800", f"{4.5 / 40**0.3:.4f}", f"{4.5 / 40**0.3:.4f} (40)", "-", "25"]
    assert cells[1] == ["ema", "60", "245,760", "9.0000", f"{4.5 / 40**0.3:.4f} (40)", "1.2500", "30"]
    out = tmp_path / "both.png"
    assert plot_metrics.main([str(tmp_path / "ema"), "--table", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_metrics_errors(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "bpb": 2.0, "bytes": 1, "elapsed": 1}\n{oops\n')
    (tmp_path / "odd.jsonl").write_text('{"step": 1}\n')
    write_metrics(tmp_path / "ok.jsonl")
    for argv, msg in (
        ([str(tmp_path / "missing")], "metrics file not found"),
        ([str(tmp_path / "empty.jsonl")], "has no metrics rows"),
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        ([str(tmp_path / "odd.jsonl")], "odd.jsonl:1: not a metrics row"),
        ([str(tmp_path / "ok.jsonl"), "--labels", "a", "b"], "2 labels for 1 runs"),
    ):
        assert plot_metrics.main([*argv, "--out", str(tmp_path / "c.png")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err
    assert not (tmp_path / "c.png").exists()
