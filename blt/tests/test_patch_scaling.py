"""bench/patch_scaling.py and bench/heldout_split.py on CPU with tiny budgets and shapes.

One real run of the study (a held-out slice split off a synthetic book, an entropy model, a BLT and
the BPE baseline at two budgets, the noise table; the byte baseline's folder is scored in
test_robustness.py), then: the table and the plot, a re-run that trains
and evaluates nothing, and a changed setting refused (these call main() in-process).
"""

import contextlib
import importlib.util
import io
import json
import math
import random
from pathlib import Path

import pytest

from blt.config import GlobalConfig, LocalEncoderConfig, tiny
from blt.data import DataError, is_heldout, load_documents
from blt.robustness import NOISES

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = str(Path(__file__).parent / "fixtures" / "stories.txt")
BUDGETS = [5e8, 1e9]
CONTENDERS = ["blt-entropy", "bpe-baseline"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ps():
    return load("patch_scaling")


@pytest.fixture(scope="module")
def split_mod():
    return load("heldout_split")


def book(path: Path, paragraphs: int = 120) -> Path:
    """A book-length document without separators: paragraphs of random words, blank lines between."""
    rng = random.Random(0)
    words = "the a cat dog sun ran saw big little happy tree park ball and then river hill old man said".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))).capitalize() + "."
                       for _ in range(paragraphs))  # fmt: skip
    path.write_text(text + "\n")
    return path


def argv(work: Path, *extra) -> list[str]:
    return ["--budgets", *map(str, BUDGETS), "--ref-budget", "1e9", "--data", str(work / "split" / "train"),
            "--valid-data", FIXTURE, "--extra-valid", str(work / "split" / "heldout.txt"),
            "--cache-dir", str(work / "cache"), "--runs", str(work / "runs"), "--config", "tiny", "--seq-len", "128",
            "--batch-size", "2", "--lr", "3e-3", "--warmup", "2", "--threads", "1", "--device", "cpu",
            "--train-entropy", "6", "--entropy-dim", "32", "--entropy-layers", "1", "--entropy-heads", "2",
            "--baseline-dim", "32", "--baseline-layers", "1", "--baseline-heads", "2",
            "--contenders", ",".join(CONTENDERS), "--robustness", "--robustness-bytes", "2000",
            "--extra-train-args", "--eval-every 0 --save-every 0", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first(tmp_path_factory, split_mod, ps):
    """The study run in this process (its trainings are subprocesses, four at a time)."""
    work = tmp_path_factory.mktemp("scaling")
    split_mod.split([str(book(work / "book.txt"))], work / "split", 0.25, 512, 0, [FIXTURE])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ps.main(argv(work, "--parallel", "4"))
    return work, out.getvalue()


def test_table_plot_and_noise_table(first):
    work, out = first
    runs = work / "runs"
    rows = json.loads((runs / "scaling.json").read_text())["rows"]
    assert [(r["budget"], r["name"]) for r in rows] == [(b, n) for b in BUDGETS for n in CONTENDERS]
    for r in rows:
        assert all(math.isfinite(r[k]) and 0 < r[k] < 16 for k in ("bpb_valid", "bpb_extra")), r
        assert abs(r["train_flops"] - r["budget"]) <= 0.5 * r["bytes_per_step"] * r["train_flops_per_byte"]
        assert r["params_total"] > r["params_non_embedding"] > 0 and r["inference_flops_per_byte"] > 0
        assert r["train_bytes"] == r["steps"] * r["bytes_per_step"]
    # every contender is scored on the same bytes of each held-out set
    assert len({r["eval_bytes"] for r in rows}) == 1 and len({r["eval_bytes_extra"] for r in rows}) == 1
    # widths x (budget / 1e9) ** 0.25: the smaller budget trains the narrower BLT (global 64 -> 48)
    blt = {r["budget"]: r for r in rows if r["name"] == "blt-entropy"}
    assert blt[5e8]["shape"] == "global 48x2, local 32" and blt[1e9]["shape"] == "global 64x2, local 32"
    assert blt[5e8]["params_total"] < blt[1e9]["params_total"]
    md = (runs / "scaling.md").read_text()
    assert md in out and len([line for line in md.splitlines() if line.startswith(("| 5e+08", "| 1e+09"))]) == 4
    assert (runs / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    noise = json.loads((runs / "robustness.json").read_text())["rows"]
    assert [(r["budget"], r["name"]) for r in noise] == [(b, n) for b in BUDGETS for n in CONTENDERS]
    assert all(math.isfinite(r[k]) for r in noise for k in ("clean", *NOISES))
    # one entropy model and one tokenizer for every budget
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["1e9", "5e8", "bpe-tokenizer", "entropy"]


def test_rerun_trains_and_evaluates_nothing(first, ps, capsys):
    work, _ = first
    before = json.loads((work / "runs" / "scaling.json").read_text())["rows"]
    ps.main(argv(work))
    out = capsys.readouterr().out
    assert out.count("skip ") == len(BUDGETS) * len(CONTENDERS) + 1  # and the entropy model
    assert "-m blt.train" not in out and "bpb " not in out.replace("noised bpb", "")
    assert json.loads((work / "runs" / "scaling.json").read_text())["rows"] == before


def test_a_changed_setting_is_refused(first, ps, capsys):
    work, _ = first
    for flag, message in [("--width-exponent", "(--width-exponent: 0.25 there, 0.0 now)"), ("--lr", "(--lr: 0.003 there")]:
        with pytest.raises(SystemExit) as e:
            ps.main(argv(work, flag, "0" if flag == "--width-exponent" else "1e-3"))
        assert e.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_widths_scale_by_whole_heads(ps):
    s = 0.1**0.25  # 1e15 against the reference 1e16
    g = ps.scaled(GlobalConfig(dim=512, n_layers=5, n_heads=8), s)
    assert (g.dim, g.n_heads, g.n_layers, g.head_dim) == (256, 4, 5, 64)  # 512 x 0.562 = 288 -> 4.5 heads -> 4
    assert ps.scaled(GlobalConfig(dim=512, n_layers=5, n_heads=8, n_kv_heads=2), 1.3).n_heads == 12  # 10.4 heads: 3 groups of 4
    e = ps.scaled(LocalEncoderConfig(dim=32, n_heads=2, ffn_hidden=96), 0.1)
    assert (e.dim, e.n_heads, e.ffn_hidden) == (16, 1, 48)  # at least one head; the FFN keeps its ratio
    cfg = ps.scaled_blt(tiny(), 2.0)
    assert cfg.encoder.dim == cfg.decoder.dim == 64 and cfg.global_model.dim == 128


def test_heldout_split(tmp_path, split_mod):
    source = book(tmp_path / "book.txt", 80)
    record = split_mod.split([str(source)], tmp_path / "out", 0.3, 400, 0, [FIXTURE])
    train = list(load_documents(str(tmp_path / "out" / "train" / "book.txt")))
    held = list(load_documents(str(tmp_path / "out" / "heldout.txt")))
    chunks = list(split_mod.chunks(source.read_bytes(), 400))
    assert sorted(train + held) == sorted(chunks) and held and train  # read back exactly, nothing lost
    assert all(is_heldout(c, 0.3, 0) for c in held) and not any(is_heldout(c, 0.3, 0) for c in train)
    assert b"".join(c.replace(b"\n", b"") for c in chunks) == source.read_bytes().replace(b"\n", b"")
    assert all(len(c) >= 400 for c in chunks[:-1]) and (tmp_path / "out" / "train" / "stories.txt").is_file()
    assert record["heldout_chunks"] == len(held)
    # run again: nothing rewritten (blt.data's cache keys on modification times); other settings refused
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "out").rglob("*.txt"))]
    split_mod.split([str(source)], tmp_path / "out", 0.3, 400, 0, [FIXTURE])
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out").rglob("*.txt"))] == mtimes
    with pytest.raises(DataError, match="other inputs or settings"):
        split_mod.split([str(source)], tmp_path / "out", 0.2, 400, 0, [FIXTURE])
    # a file without blank lines is cut at line ends once a chunk is twice as long
    lines = b"\n".join(b"verse %d of a long book" % i for i in range(200))
    assert all(len(c) <= 2 * 400 + 30 for c in split_mod.chunks(lines, 400))
