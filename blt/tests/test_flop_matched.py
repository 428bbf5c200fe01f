"""bench/flop_matched.py end to end on the fixture stories (CPU, tiny shapes, one thread).

One real run of the command (entropy model + four contenders, each a subprocess), then: the table,
the FLOP matching, a re-run that skips everything, a resumed contender, and the one-line errors
(these call main() in-process, which spares an interpreter start-up each).
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "flop_matched.py"
FIXTURE = str(Path(__file__).parent / "fixtures" / "stories.txt")
BUDGET = 5e8  # tiny BLT ~6e5 train FLOPs/byte x 256 bytes/step: 3-4 steps; the baseline ~13
NAMES = ["blt-entropy", "blt-space", "blt-static", "byte-baseline", "bpe-baseline"]


def argv(work: Path, *extra) -> list[str]:
    return ["--flops", str(BUDGET), "--data", FIXTURE, "--valid-data", FIXTURE, "--cache-dir", str(work / "cache"),
            "--runs", str(work / "runs"), "--config", "tiny", "--seq-len", "128", "--batch-size", "2",
            "--lr", "3e-3", "--warmup", "2", "--threads", "1", "--device", "cpu",
            "--train-entropy", "6", "--entropy-dim", "32", "--entropy-layers", "1", "--entropy-heads", "2",
            "--baseline-dim", "32", "--baseline-layers", "1", "--baseline-heads", "2",
            "--extra-train-args", "--eval-every 0 --save-every 0", *extra]  # fmt: skip


def run_script(work: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *argv(work)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout



@pytest.fixture(scope="module")
def first(tmp_path_factory):
    work = tmp_path_factory.mktemp("flop_matched")
    return work, run_script(work)


@pytest.fixture(scope="module")
def fm():
    """The script as a module, for in-process calls of main()."""
    spec = importlib.util.spec_from_file_location("flop_matched", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(work: Path) -> dict:
    return json.loads((work / "runs" / "table.json").read_text())


def test_table_and_flop_matching(first):
    work, out = first
    t = table(work)
    rows = {r["name"]: r for r in t["rows"]}
    assert list(rows) == NAMES
    for r in rows.values():
        assert math.isfinite(r["bpb"]) and 0 < r["bpb"] < 16, r
        assert r["steps"] >= 2
        # the BPE baseline's windows are tokens: as many as cover ~--seq-len bytes
        tokens_per_step = 2 * r["seq_len"]
        assert r["bytes_per_step"] == pytest.approx(tokens_per_step * r["train_bytes_per_patch"] if r["name"] == "bpe-baseline" else 2 * 128)
        assert r["train_bytes"] == r["steps"] * r["bytes_per_step"]
        step_flops = r["bytes_per_step"] * r["train_flops_per_byte"]
        assert abs(r["train_flops"] - BUDGET) <= 0.5 * step_flops + 1e-6 * BUDGET, r  # within half a step
        assert r["params_total"] > r["params_non_embedding"] > 0
        assert r["inference_flops_per_byte"] * 3 <= r["train_flops_per_byte"]
    # static patch size = the entropy run's mean bytes/patch on the training text, rounded;
    # the baseline steps once per byte
    k = math.floor(rows["blt-entropy"]["train_bytes_per_patch"] + 0.5)
    assert rows["blt-static"]["patching"] == f"static, {k} bytes"
    assert rows["byte-baseline"]["bytes_per_patch"] == 1.0
    bpe = rows["bpe-baseline"]
    assert bpe["model"] == "BPE transformer" and bpe["bytes_per_patch"] > 1.5  # bytes per token, measured
    assert bpe["seq_len"] == max(16, round(128 / bpe["bytes_per_patch"]))
    assert bpe["eval_bytes"] == rows["byte-baseline"]["eval_bytes"]  # the same held-out bytes
    assert bpe["eval_bytes_per_patch"] == pytest.approx(bpe["bytes_per_patch"])  # measured on the same text
    # its training bytes are the training text's (the sample is all of it here): what its run counted
    metrics = (work / "runs" / "bpe-baseline" / "metrics.jsonl").read_text().splitlines()
    (last,) = [r for r in map(json.loads, metrics) if "bytes" in r][-1:]
    assert last["bytes"] == pytest.approx(last["step"] * bpe["bytes_per_step"], rel=1e-9)
    assert rows["blt-entropy"]["entropy_model_params"] > 0 and rows["blt-space"]["entropy_model_params"] == 0
    # the measured patch sizes are what blt.eval sees on the same held-out windows
    for name in NAMES[:3]:
        assert rows[name]["eval_bytes_per_patch"] == pytest.approx(rows[name]["bytes_per_patch"])
    md = (work / "runs" / "table.md").read_text()
    assert md in out
    assert len([line for line in md.splitlines() if line.startswith(("| BLT", "| byte", "| BPE"))]) == 5
    for name in ["entropy model", *NAMES]:
        assert f"train {name}:" in out


def test_rerun_skips_trained_contenders(first):
    work, _ = first
    before = table(work)
    weights = sorted((work / "runs").glob("*/model/*.safetensors"))
    mtimes = [w.stat().st_mtime_ns for w in weights]
    out = run_script(work)
    for name in ["entropy model", *NAMES]:
        assert f"skip {name}:" in out
    assert "-m blt.train" not in out and "-m blt.eval" not in out  # neither trained nor re-evaluated
    assert table(work)["rows"] == before["rows"]
    assert len(weights) >= 6 and [w.stat().st_mtime_ns for w in weights] == mtimes  # no model rewritten


def test_interrupted_contender_resumes(first, fm, capsys):
    """A run with a checkpoint but no model folder (as after an interruption) continues with --resume."""
    work, _ = first
    before = {r["name"]: r for r in table(work)["rows"]}
    shutil.rmtree(work / "runs" / "blt-static" / "model")
    fm.main(argv(work))
    out = capsys.readouterr().out
    assert "resume blt-static:" in out and "--resume" in out
    assert "skip blt-entropy:" in out and "skip byte-baseline:" in out
    after = {r["name"]: r for r in table(work)["rows"]}
    assert after["blt-static"]["bpb"] == pytest.approx(before["blt-static"]["bpb"], abs=1e-6)


def test_parallel_runs_match_sequential_ones(first, fm, capsys):
    """--parallel 2 retrains two deleted contenders side by side, each logging to its train.log,
    and gets the sequential run's results (CPU, deterministic)."""
    work, _ = first
    before = {r["name"]: r for r in table(work)["rows"]}
    for name in ("blt-space", "byte-baseline"):
        shutil.rmtree(work / "runs" / name)
    fm.main(argv(work, "--parallel", "2"))
    out = capsys.readouterr().out
    assert "train blt-space:" in out and "train byte-baseline:" in out and "skip blt-entropy:" in out
    for name in ("blt-space", "byte-baseline"):
        assert f"{name}: finished" in out
        assert "done:" in (work / "runs" / name / "train.log").read_text()
    after = {r["name"]: r for r in table(work)["rows"]}
    for name in NAMES:
        assert after[name]["bpb"] == pytest.approx(before[name]["bpb"], abs=1e-6), name


def error_of(fm, capsys, args, code) -> str:
    with pytest.raises(SystemExit) as e:
        fm.main(args)
    assert e.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_one_line_errors(first, fm, capsys, tmp_path):
    work, _ = first
    common = ["--data", FIXTURE, "--valid-data", FIXTURE, "--cache-dir", str(work / "cache"), "--config", "tiny",
              "--seq-len", "128", "--batch-size", "2", "--threads", "1", "--device", "cpu", "--runs"]  # fmt: skip
    entropy = str(work / "runs" / "entropy")

    msg = error_of(fm, capsys, ["--flops", "1e16", *common, str(tmp_path / "a")], 2)
    assert "needs an entropy model" in msg
    msg = error_of(fm, capsys, ["--flops", "1e16", *common, str(tmp_path / "a"), "--entropy-model", str(tmp_path / "none")], 2)
    assert "no entropy model there" in msg
    msg = error_of(fm, capsys, ["--flops", "-1", *common, str(tmp_path / "a"), "--entropy-model", entropy], 2)
    assert "--flops must be" in msg
    msg = error_of(fm, capsys, ["--flops", "1e16", *common, str(tmp_path / "a"), "--entropy-model", entropy, "--parallel", "0"], 2)
    assert msg.endswith("error: --parallel must be >= 1")
    msg = error_of(fm, capsys, ["--flops", "1e16", *common, str(tmp_path / "a"), "--entropy-model", entropy,
                                "--baseline-dim", "30", "--baseline-heads", "4"], 2)  # fmt: skip
    assert "not divisible" in msg or "must be even" in msg
    msg = error_of(fm, capsys, ["--flops", "1e6", *common, str(tmp_path / "a"), "--entropy-model", entropy], 1)
    assert msg.startswith("error: --flops 1e+06 is less than one training step of blt-entropy")
    # the same runs folder with another budget would mix runs: refused before any training
    msg = error_of(fm, capsys, argv(work, "--flops", str(2 * BUDGET)), 1)
    assert "was started with other settings (steps:" in msg
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").glob("*/plan.json"))
