"""blt.train, blt.train_entropy and blt.eval end to end on the fixture stories (CPU, tiny shapes).

Most runs call `main(argv)` in-process (no interpreter start-up); the SIGTERM, torchrun and
traceback checks need real processes. Everything runs on one thread: these models are far too
small to gain from more, and a second thread on a busy 2-core machine is much slower.
"""

import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from blt import eval as blt_eval
from blt import one_graph, train, train_data, train_entropy
from blt.checkpoint import from_pretrained, load_entropy_model
from blt.data import encode_documents, load_documents
from blt.model import BLT
from blt.tokens import VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = str(Path(__file__).parent / "fixtures" / "stories.txt")
STEPS = 12
# Constant learning rate after warmup (min-lr = lr): the schedule then does not depend on
# --steps, so a run cut short with --steps k and resumed with --steps N must repeat the losses.
COMMON = ["--data", FIXTURE, "--valid-data", FIXTURE, "--seq-len", "64", "--grad-accum", "2", "--lr", "3e-3",
          "--min-lr", "3e-3", "--warmup", "3", "--log-every", "1", "--eval-every", "0", "--eval-batches", "0",
          "--save-every", "0"]  # fmt: skip



@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def entropy_dir(work) -> Path:
    out = work / "entropy"
    train_entropy.main([*COMMON, "--cache-dir", str(work / "cache"), "--out", str(out), "--steps", "15",
                        "--batch-size", "4", "--dim", "32", "--layers", "2", "--heads", "2", "--window", "64"])  # fmt: skip
    return out


def blt_argv(work, entropy_dir, out, steps, batch_size=4, *extra) -> list[str]:
    return ["--config", "tiny", "--entropy-model", str(entropy_dir), *COMMON, "--cache-dir", str(work / "cache"),
            "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size), *extra]  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in rows(out) if "loss" in r]


@pytest.fixture(scope="module")
def reference(work, entropy_dir) -> Path:
    """An uninterrupted single-process run: STEPS steps, global batch 4."""
    out = work / "reference"
    train.main(blt_argv(work, entropy_dir, out, STEPS))
    return out


def run_cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


# ---- train_entropy ---------------------------------------------------------------------------


def test_train_entropy_writes_calibrated_model(entropy_dir):
    model_dir = entropy_dir / "model"
    assert {p.name for p in model_dir.iterdir()} == {"entropy_config.json", "entropy_model.safetensors", "patcher_threshold.json"}
    model = load_entropy_model(model_dir)
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.n_heads, model.cfg.window) == (32, 2, 2, 64)
    cal = json.loads((model_dir / "patcher_threshold.json").read_text())
    assert set(cal) == {"threshold", "mode", "target_bytes_per_patch", "achieved_bytes_per_patch", "data", "split",
                        "doc_mask", "bytes"}  # fmt: skip
    assert cal["doc_mask"] is True  # trained and calibrated within documents, as new BLT configs read it
    assert cal["mode"] == "entropy" and cal["target_bytes_per_patch"] == 4.5 and cal["data"] == FIXTURE
    assert cal["split"] == "train"  # θ from training text, never from the text it is measured on
    assert abs(cal["achieved_bytes_per_patch"] - 4.5) < 0.25
    assert cal["bytes"] > 3000  # the whole fixture, in rows of --seq-len
    train_loss = losses(entropy_dir)
    assert len(train_loss) == 15 and train_loss[-1] < train_loss[0] - 1.0
    assert (entropy_dir / "checkpoint" / "train_state.pt").is_file()


# ---- train -----------------------------------------------------------------------------------


def test_threshold_is_calibrated_on_the_chosen_split(tmp_path):
    """θ comes from the --calibrate-on stream (training text by default): calibrating on two
    different streams gives each stream's own θ, and the exported model records the training one."""
    from blt.config import PatcherConfig, tiny
    from blt.patcher import calibrate_threshold

    torch.manual_seed(0)
    model = train_entropy.EntropyModel(tiny().entropy_model)
    train_stream = np.random.default_rng(0).integers(4, 40, 700).astype(np.uint16)  # few distinct bytes
    valid_stream = np.random.default_rng(1).integers(4, 260, 700).astype(np.uint16)
    args = Namespace(seq_len=128, batch_size=4, calibrate_mode="entropy", target_bytes_per_patch=3.0, calibrate_on="train",
                     data="train.txt", valid_data="valid.txt", valid_fraction=0.01, out=str(tmp_path),
                     doc_mask=False)  # fmt: skip
    record = train_entropy.calibrate(model, train_stream, args, "cpu")
    rows = torch.from_numpy(train_stream[: 700 // 128 * 128].astype(np.int64)).view(-1, 128)
    want, _ = calibrate_threshold(model.entropies(rows), rows, PatcherConfig(mode="entropy"), 3.0)
    assert record["threshold"] == pytest.approx(want) and record["data"] == "train.txt" and record["split"] == "train"
    train_entropy.export(model, Namespace(train=train_stream, valid=valid_stream), "cpu", args)
    saved = json.loads((tmp_path / "model" / "patcher_threshold.json").read_text())
    assert saved["threshold"] == pytest.approx(want)
    args.calibrate_on = "valid"
    other = train_entropy.calibrate(model, valid_stream, args, "cpu")
    assert other["data"] == "valid.txt" and other["threshold"] != pytest.approx(record["threshold"])


def test_a_threshold_calibrated_the_other_way_is_noted(tmp_path, capsys):
    """A BLT reading within documents given θ calibrated across them (a record from before the
    key: across), or the other way round, is told in one line; a matching one says nothing."""
    from blt.train_flags import calibrated_threshold

    (tmp_path / "patcher_threshold.json").write_text(json.dumps({"threshold": 1.5, "mode": "entropy",
                                                                 "target_bytes_per_patch": 4.5}))  # fmt: skip
    assert calibrated_threshold(tmp_path, "entropy", doc_mask=False) == 1.5 and capsys.readouterr().err == ""
    assert calibrated_threshold(tmp_path, "entropy", doc_mask=True) == 1.5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibrated across documents" in err and "--doc-mask" in err


def test_doc_mask_calibration_is_the_patching_of_a_doc_masked_blt():
    """--doc-mask: θ comes from entropies read within documents, patched as a BLT with document
    masking patches, so that BLT gets the target bytes/patch; the record says how. Across
    documents (--no-doc-mask) the entropies and θ differ."""
    from blt.config import PatcherConfig, tiny
    from blt.patcher import patch

    torch.manual_seed(0)
    model = train_entropy.build(tiny().entropy_model, None, doc_mask=True)
    assert model.doc_mask  # the training loop's forward reads within documents
    docs = [bytes(np.random.default_rng(i).integers(97, 123, n).astype(np.uint8)) for i, n in enumerate([30, 9, 50] * 8)]
    stream = encode_documents(docs)
    args = Namespace(seq_len=128, batch_size=4, calibrate_mode="entropy", target_bytes_per_patch=3.0, calibrate_on="train",
                     data="train.txt", valid_data=None, valid_fraction=0.01, doc_mask=True)  # fmt: skip
    record = train_entropy.calibrate(model, stream, args, "cpu")
    assert record["doc_mask"] is True
    rows = torch.from_numpy(stream[: len(stream) // 128 * 128].astype(np.int64)).view(-1, 128)
    cfg = PatcherConfig(mode="entropy", threshold=record["threshold"])
    got = patch(rows, cfg, model, doc_mask=True).mean_patch_length().item()
    assert got == pytest.approx(record["achieved_bytes_per_patch"]) and abs(got - 3.0) < 0.3
    assert not torch.equal(model.entropies(rows, True), model.entropies(rows, False))
    across = train_entropy.calibrate(model, stream, Namespace(**{**vars(args), "doc_mask": False}), "cpu")
    assert across["doc_mask"] is False and across["threshold"] != pytest.approx(record["threshold"])


def test_train_blt_learns_and_writes_checkpoint_and_model(reference, entropy_dir):
    loss = losses(reference)
    assert len(loss) == STEPS
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.5
    train_rows = [r for r in rows(reference) if "loss" in r]
    assert set(train_rows[0]) == {"step", "loss", "bpb", "lr", "bytes", "bytes_per_s", "bytes_per_patch", "grad_norm", "elapsed"}
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert train_rows[-1]["bytes"] == STEPS * 4 * 2 * 64
    assert all(1.0 <= r["bytes_per_patch"] <= 8.0 for r in train_rows)  # tiny preset: max_patch_length 8
    (final_eval,) = [r for r in rows(reference) if "eval_bpb" in r]
    assert final_eval["step"] == STEPS and 0 < final_eval["eval_bpb"] < 8

    ckpt, model_dir = reference / "checkpoint", reference / "model"
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "entropy_model.safetensors", "train_state.pt"}
    assert {p.name for p in model_dir.iterdir()} == {"config.json", "model.safetensors", "entropy_model.safetensors", "patcher_threshold.json"}
    state = torch.load(ckpt / "train_state.pt", weights_only=True)  # tensors and plain values only
    assert state["step"] == STEPS and state["batcher"]["step"] == STEPS * 2
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    model = from_pretrained(model_dir)
    theta = json.loads((entropy_dir / "model" / "patcher_threshold.json").read_text())["threshold"]
    assert model.cfg.patcher.threshold == theta and model.cfg.patcher.mode == "entropy"
    a, b = load_file(ckpt / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_repeats_the_uninterrupted_losses(work, entropy_dir, reference):
    out = work / "resumed"
    train.main(blt_argv(work, entropy_dir, out, 5))
    train.main(blt_argv(work, entropy_dir, out, STEPS, 4, "--resume"))
    assert losses(out) == losses(reference)  # exact, CPU fp32
    a, b = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_average_is_the_ema_of_the_steps():
    """blt.ema: avg = w at the start, then avg <- avg + (1 - decay)(w - avg) after each step;
    applied() lends the average to the model and gives the weights back exactly; a saved
    average continues only with its own decay and parameters."""
    from blt.ema import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    ema = WeightAverage(model, 0.8)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        want = {n: 0.8 * want[n] + 0.2 * p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert ema.names == ["0.weight", "0.bias", "1.weight"]
    assert all(torch.allclose(a, want[n], atol=1e-6) for n, a in zip(ema.names, ema.avg))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied():
        assert torch.equal(model[0].weight, ema.avg[0]) and torch.equal(model[1].bias, trained["1.bias"])
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    other = WeightAverage(model, 0.8)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.avg, ema.avg))
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, 0.9).load_state_dict(ema.state_dict())


def test_ema_run_exports_the_average_and_resumes_it(work, entropy_dir):
    """--ema: metrics give the average's held-out bpb beside the weights'; the exported model is
    the average (the checkpoint's weights are the trained ones); a resumed run continues the
    same average (bit for bit on the CPU); resuming with another --ema is refused."""
    argv = partial(blt_argv, work, entropy_dir)
    whole, cut = work / "ema", work / "ema-resumed"
    train.main(argv(whole, STEPS, 4, "--ema", "0.5"))
    train.main(argv(cut, 5, 4, "--ema", "0.5"))
    with pytest.raises(SystemExit):
        train.main(argv(cut, STEPS, 4, "--resume", "--ema", "0.9"))
    train.main(argv(cut, STEPS, 4, "--resume", "--ema", "0.5"))
    (final,) = [r for r in rows(whole) if "eval_bpb" in r]
    assert set(final) >= {"eval_bpb", "eval_bpb_ema"} and final["eval_bpb"] != final["eval_bpb_ema"]
    state = torch.load(whole / "checkpoint" / "train_state.pt", weights_only=True)
    exported, trained = load_file(whole / "model" / "model.safetensors"), load_file(whole / "checkpoint" / "model.safetensors")
    averaged = [k for k in exported if not k.startswith("entropy_model.")]
    assert averaged and all(torch.equal(exported[k], state["ema"]["avg"][k]) for k in averaged)
    assert not all(torch.equal(exported[k], trained[k]) for k in averaged)
    resumed = load_file(cut / "model" / "model.safetensors")
    assert losses(cut) == losses(whole) and all(torch.equal(resumed[k], exported[k]) for k in exported)


def test_sigterm_saves_a_checkpoint_that_resumes(work, entropy_dir, reference):
    out = work / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blt.train", *blt_argv(work, entropy_dir, out, 100000)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # the shell's convention: 143
    assert "stopped by a signal (SIGTERM)" in stdout and "Traceback" not in stderr
    step = torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)["step"]
    assert step == len(losses(out)) >= 2
    train.main(blt_argv(work, entropy_dir, out, step + 2, 4, "--resume"))
    n = min(step + 2, STEPS)
    assert losses(out)[:n] == losses(reference)[:n]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_matches_single_process(work, entropy_dir, reference, mode):
    """2 processes x batch 2 (gloo) = 1 process x batch 4. FSDP runs in two parts, so that its
    sharded checkpoint is saved and resumed too, with held-out evaluations (forwards without a
    backward) just before the checkpoints."""
    out = work / mode
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "blt.train"]  # a free port
    parts = [STEPS] if mode == "ddp" else [STEPS // 2, STEPS]
    for i, steps in enumerate(parts):
        extra = ["--dist", mode] + (["--resume"] if i else []) + (["--eval-every", "3", "--save-every", "3"] if mode == "fsdp" else [])
        result = run_cli(*torchrun, *blt_argv(work, entropy_dir, out, steps, 2, *extra), timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    final_evals = [[r["eval_bpb"] for r in rows(run) if "eval_bpb" in r][-1] for run in (out, reference)]
    assert final_evals[0] == pytest.approx(final_evals[1], abs=1e-5)  # the ranks' sums add up to the exact bpb
    a, b = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_one_graph_under_ddp_matches_single_process(work, entropy_dir, reference):
    """--one-graph under --dist ddp (gloo): the one graph computes the plain model's gradients
    and blt.distributed.average_gradients averages them over the ranks, as DDP would; 2
    processes x batch 2 give the 1-process losses of batch 4. Run eagerly here
    (TORCH_COMPILE_DISABLE): the logic is what the CPU can check, the padded patch counts and
    packed rows included, against the plain eager reference."""
    out = work / "ddp-one-graph"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "blt.train"]
    result = run_cli(*torchrun, *blt_argv(work, entropy_dir, out, STEPS, 2, "--dist", "ddp", "--one-graph"),
                     env={"TORCH_COMPILE_DISABLE": "1"}, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "execution: one graph" in result.stdout
    assert losses(out) == pytest.approx(losses(reference), abs=1e-4)


# ---- eval ------------------------------------------------------------------------------------


def direct_bpb(model_dir: Path, seq_len: int, windows: int | None = None) -> tuple[float, int]:
    """bpb of the first `windows` windows (default all), window by window, without padding or batching."""
    model = from_pretrained(model_dir)
    tokens = torch.from_numpy(encode_documents(list(load_documents(FIXTURE))).astype("int64"))
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in list(range(0, len(tokens) - 1, seq_len))[:windows]:
            window = tokens[start : start + seq_len + 1][None]
            logits = model(window[:, :-1]).logits
            nats += F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return nats / math.log(2) / count, count


def parse_last_line(text: str) -> dict:
    last = text.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split(" "))
    assert list(fields) == ["bpb", "bytes", "bytes_per_patch"], last
    return {"bpb": float(fields["bpb"]), "bytes": int(fields["bytes"]), "bytes_per_patch": float(fields["bytes_per_patch"])}


def test_eval_prints_exact_bpb(reference, entropy_dir, capsys):
    blt_eval.main(["--checkpoint", str(reference / "model"), "--data", FIXTURE, "--seq-len", "100", "--batch-size", "3"])
    got = parse_last_line(capsys.readouterr().out)
    want_bpb, want_bytes = direct_bpb(reference / "model", 100)
    assert got["bytes"] == want_bytes == len(encode_documents(list(load_documents(FIXTURE)))) - 1
    assert got["bpb"] == pytest.approx(want_bpb, rel=1e-5)
    assert 1.0 < got["bytes_per_patch"] <= 8.0

    blt_eval.main(["--checkpoint", str(entropy_dir / "model"), "--data", FIXTURE])  # the byte LM
    byte_lm = parse_last_line(capsys.readouterr().out)
    assert byte_lm["bytes"] == want_bytes and byte_lm["bytes_per_patch"] == 1.0 and 0 < byte_lm["bpb"] < 9


def test_train_time_eval_is_exact(reference):
    train_bpb = [r["eval_bpb"] for r in rows(reference) if "eval_bpb" in r][-1]  # --eval-batches 0: all
    assert train_bpb == pytest.approx(direct_bpb(reference / "model", 64)[0], rel=1e-5)
    model = from_pretrained(reference / "model")
    valid = encode_documents(list(load_documents(FIXTURE)))
    args = Namespace(seq_len=64, batch_size=4, eval_batches=2)
    first_two = train.evaluate(model, valid, args, 0, 1, torch.device("cpu"), None)
    assert first_two == pytest.approx(direct_bpb(reference / "model", 64, windows=8)[0], rel=1e-5)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-3"], "--steps must be >= 1"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--config", "nope"], "unknown preset 'nope'"),
        (["--patch-mode", "words"], "invalid choice: 'words'"),
        (["--config", "tiny"], "needs --entropy-model"),
        (["--config", "tiny", "--entropy-model", "/no/such/dir"], "no entropy model there"),
        (["--config", "tiny", "--patch-mode", "static", "--patch-size", "0"], "--patch-size must be >= 1"),
        (["--dtype", "bf16", "--device", "cpu"], "needs --device cuda"),
        (["--dist", "ddp"], "needs torchrun"),
        (["--tune-kernels"], "--tune-kernels tunes the --one-graph compilation"),
        (["--attention", "flash"], "--attention flash runs inside --one-graph on CUDA"),
        (["--patch-pad", "0", "--one-graph"], "--patch-pad must be >= 1"),
        (["--patch-pad", "32"], "--patch-pad pads the --one-graph patch count"),
        (["--bf16-residual"], "--bf16-residual needs bf16 autocast"),
    ],
)
def test_bad_cli_values_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dim", "30", "--heads", "4"], "not divisible"),
        (["--target-bytes-per-patch", "0.5"], "--target-bytes-per-patch must be >= 1"),
        (["--config", "/no/such.json"], "not found"),
    ],
)
def test_bad_train_entropy_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_entropy.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_init_from_starts_at_the_source_weights(work, entropy_dir, reference, capsys):
    out = work / "init-from"
    train.main(blt_argv(work, entropy_dir, out, 2, 4, "--init-from", str(reference)))
    first, fresh = losses(out)[0], losses(reference)[0]
    assert first < fresh - 0.5 and abs(first - sum(losses(reference)[-3:]) / 3) < 0.5
    assert capsys.readouterr().out.splitlines()[0] == "execution: eager; attention SDPA (dense masks)"  # the CPU's choice
    # another architecture: a one-line error naming the flag
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(blt_argv(work, entropy_dir, work / "init-bad", 2, 4, "--init-from", str(reference), "--config",
                            str(_wider_tiny(work))))  # fmt: skip
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --init-from") and "does not match" in line


def _wider_tiny(work) -> Path:
    from blt.config import preset

    cfg = preset("tiny")
    cfg.global_model.dim = 96
    path = work / "wider.json"
    cfg.to_json(path)
    return path


def test_resume_refuses_a_different_run(work, entropy_dir, reference, capsys):
    out = work / "mismatch"
    shutil.copytree(reference / "checkpoint", out / "checkpoint")
    cases = [
        (["--resume", "--max-patch-length", "4"], "different model config (patcher.max_patch_length: checkpoint has 8, this run has 4)"),
        (["--resume", "--seq-len", "32"], "checkpoint has --seq-len 64, this run has 32"),
        ([], "exists: pass --resume"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(blt_argv(work, entropy_dir, out, STEPS, 4, *extra))
        assert exit_info.value.code == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and message in line
    with pytest.raises(SystemExit):
        train.main(blt_argv(work, entropy_dir, work / "nothing-here", STEPS, 4, "--resume"))
    assert "error: --resume: no checkpoint in" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["train", "train_entropy", "eval", "generate", "export", "visualize", "plot_metrics"])
def test_every_command_prints_its_help(tool, capsys):
    """--help renders (argparse formats help strings with %: a bare % in one breaks it)."""
    module = importlib.import_module(f"blt.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_errors_reach_the_shell_without_traceback(tmp_path):
    result = run_cli("-m", "blt.train", "--steps", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("error: --steps must be >= 1")
    result = run_cli("-m", "blt.eval", "--checkpoint", str(tmp_path / "missing"), "--data", FIXTURE)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: checkpoint folder not found: {tmp_path / 'missing'}"]
    result = run_cli("-m", "blt.eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "none.txt"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


# ---- the learning-rate schedule --------------------------------------------------------------


def test_lr_schedules():
    args = Namespace(lr=1.0, min_lr=0.1, warmup=10, steps=110, schedule="cosine", decay_frac=0.2)
    lrs = [train.lr_at(s, args) for s in range(args.steps)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    args.schedule = "wsd"
    lrs = [train.lr_at(s, args) for s in range(args.steps)]
    assert set(lrs[9:88]) == {1.0} and lrs[88] < 1.0 and lrs[-1] == pytest.approx(0.1)


def compile_with(monkeypatch, backend) -> None:
    """torch.compile (Module.compile too) with this dynamo backend and no inductor options."""
    real = torch.compile

    def compile(model=None, *args, **kwargs):
        kwargs.pop("options", None)
        kwargs["backend"] = backend
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)


@pytest.fixture
def traced_only(monkeypatch):
    """torch.compile through dynamo and AOTAutograd, without inductor's code generation: the
    tracing, guards and recompiles are those of a real compile, the C++ compilation of every
    block variant (minutes on two cores) is left out. Returns the list of compiled graphs."""
    graphs = []

    def aot_eager_counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    compile_with(monkeypatch, aot_eager_counting)
    return graphs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_compiled_training_matches_eager(work, entropy_dir, reference, traced_only):
    """--compile (every transformer block traced and compiled on its own) trains the same losses
    as the eager reference, with a held-out evaluation in between (train and eval variants of
    every block), and raises dynamo's recompile limit so that no block falls back to eager."""
    out = work / "compiled"
    train.main(blt_argv(work, entropy_dir, out, 3, 4, "--compile", "--eval-every", "2"))
    assert losses(out) == pytest.approx(losses(reference)[:3], abs=2e-4)
    assert torch._dynamo.config.recompile_limit >= 64
    assert traced_only, "no block went through torch.compile"


def _count_packings(monkeypatch) -> list:
    """Record the slot count of every packing_plan the model makes."""
    import blt.packing

    made, plan = [], blt.packing.packing_plan
    monkeypatch.setattr(blt.packing, "packing_plan", lambda lengths, slots, align=1: made.append(slots) or plan(lengths, slots, align))
    return made


def test_packed_training_matches_padded(work, entropy_dir, reference, monkeypatch):
    """--pack-patches without --one-graph (the global transformer on exactly the rows' patches,
    packed) trains the padded reference's losses, held-out evaluation included."""
    out = work / "packed"
    made = _count_packings(monkeypatch)
    train.main(blt_argv(work, entropy_dir, out, 3, 4, "--pack-patches"))
    assert len(made) >= 3 * 2  # every micro-batch of the 3 steps was packed
    assert losses(out) == pytest.approx(losses(reference)[:3], abs=2e-4)
    train_bpb = [r["eval_bpb"] for r in rows(out) if "eval_bpb" in r][-1]  # evaluated packed
    assert train_bpb == pytest.approx(direct_bpb(out / "model", 64)[0], rel=1e-5)  # and padded


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_one_graph_training_matches_eager(work, entropy_dir, reference, monkeypatch):
    """--one-graph (patching outside, the whole forward and loss compiled on patch counts padded
    to a multiple of 128; CUDA graphs on a GPU, plain inductor here) trains the eager losses and
    reports the real bytes/patch, not the padded one; it resumes. Its global transformer runs on
    packed rows unless --no-pack-patches."""
    out = work / "one_graph"
    made = _count_packings(monkeypatch)
    train.main(blt_argv(work, entropy_dir, out, 3, 4, "--one-graph"))
    # packed by default: the 3 x 2 training micro-batches on slots padded to --patch-pad (then the
    # held-out evaluation, outside the graph, on exactly the slots it needs)
    assert len(made) > 6 and all(slots % 128 == 0 for slots in made[:6])
    assert losses(out) == pytest.approx(losses(reference)[:3], abs=2e-4)
    bpp = [r["bytes_per_patch"] for r in rows(out) if "bytes_per_patch" in r]
    assert bpp == pytest.approx([r["bytes_per_patch"] for r in rows(reference) if "bytes_per_patch" in r][:3])
    train.main(blt_argv(work, entropy_dir, out, 5, 4, "--one-graph", "--resume"))  # optimizer state restored
    assert losses(out) == pytest.approx(losses(reference)[:5], abs=2e-4)
    # one micro-batch per step: the gradients are kept as the graph gives them (same micro-batch
    # shape as above, so the compiled graphs are reused rather than compiled again)
    single = [work / "eager_single", work / "one_graph_single"]
    train.main(blt_argv(work, entropy_dir, single[0], 3, 4, "--grad-accum", "1"))
    made.clear()
    train.main(blt_argv(work, entropy_dir, single[1], 3, 4, "--grad-accum", "1", "--one-graph", "--no-pack-patches"))
    assert losses(single[1]) == pytest.approx(losses(single[0]), abs=2e-4)
    assert not made  # the padded (B, P) layout
    with pytest.raises(SystemExit):
        train.main(blt_argv(work, entropy_dir, work / "bad", 3, 4, "--one-graph", "--activation-checkpointing"))


def test_one_graph_patches_the_upcoming_batch_early():
    """OneGraph(batch, upcoming) queues the patcher for `upcoming` and reuses it on the next
    call: each batch is patched once, with the patches and loss of an unpipelined call."""
    from blt.config import tiny
    from blt.entropy_model import EntropyModel

    torch.manual_seed(0)
    cfg = tiny()
    model = BLT(cfg, EntropyModel(cfg.entropy_model))
    og = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False)
    og.loss = og._loss  # eager: this test is about the patcher's schedule
    patched = []
    og.starts = lambda inputs, entropies=None: patched.append(inputs) or og._starts(inputs)
    batches = [torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(4, 260, (2, 48))], 1) for _ in range(3)]
    model.cfg.patcher.threshold = model.entropy_model.entropies(torch.cat(batches)).median().item()

    expected = []
    for batch in batches:
        loss, patching = og(batch)  # no upcoming batch: patched here, nothing left pending
        expected.append((loss.item(), patching.patch_lengths))
        assert og.pending is None
    assert len(patched) == 3
    assert all(e[1].shape != expected[0][1].shape or not torch.equal(e[1], expected[0][1]) for e in expected[1:])
    patched.clear()

    for i, batch in enumerate(batches):
        loss, patching = og(batch, batches[i + 1] if i + 1 < len(batches) else None)
        assert loss.item() == pytest.approx(expected[i][0], abs=1e-6)
        assert torch.equal(patching.patch_lengths, expected[i][1])
    assert [p.data_ptr() for p in patched] == [b[:, :-1].data_ptr() for b in batches]  # each once, in order
    # a different batch than the pending one is patched anew, not given the pending patches
    og(batches[0], batches[1])
    loss, patching = og(batches[2])
    assert torch.equal(patching.patch_lengths, expected[2][1]) and len(patched) == 6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_one_graph_patch_pad_changes_shapes_not_losses():
    """The padded patch count is the next multiple of patch_pad, and so is the packed global
    transformer's (model.pack_patches), unless packing would take as many slots as the padded
    rows (one row: then the padded layout, slots 0); the loss depends on none of these."""
    from blt.config import tiny
    from blt.entropy_model import EntropyModel

    torch.manual_seed(0)
    cfg = tiny()
    model = BLT(cfg, EntropyModel(cfg.entropy_model))
    batch = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(4, 260, (2, 80))], 1)
    model.cfg.patcher.threshold = model.entropy_model.entropies(batch[:, :-1]).median().item()
    losses, shapes = [], []
    for pad in (1, 5, 16, 128):
        og = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False, patch_pad=pad)
        og.loss = lambda inputs, targets, starts, num, *rest, og=og: shapes.append(num) or og._loss(inputs, targets, starts, num, *rest)
        loss, patching = og(batch)
        losses.append(loss.item())
        real = patching.patch_lengths.shape[1]
        assert shapes[-1] == -(-real // pad) * pad
    assert len(set(shapes)) > 2
    assert losses == pytest.approx([losses[0]] * 4, abs=1e-5)
    # packed: the global transformer gets the total patch count padded to patch_pad, same loss
    model.pack_patches = True
    og = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False, patch_pad=16)
    slots = []
    og.loss = lambda *args: slots.append(args[-1]) or og._loss(*args)
    loss, patching = og(batch)
    total = int((patching.patch_lengths > 0).sum())
    assert slots == [-(-total // 16) * 16] and slots[0] < batch.shape[0] * shapes[2]
    assert loss.item() == pytest.approx(losses[0], abs=1e-5)
    og(batch[:1])  # one row packs into as many slots as it pads to
    assert slots[-1] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_one_graph_packed_loss_traces_and_matches(traced_only, monkeypatch):
    """The packed global transformer traced into the loss graph (dynamo and AOTAutograd) gives
    the eager padded layout's loss and gradients."""
    from blt.config import tiny
    from blt.entropy_model import EntropyModel

    torch.manual_seed(0)
    cfg = tiny()
    model = BLT(cfg, EntropyModel(cfg.entropy_model))
    batch = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(4, 260, (3, 150))], 1)
    model.cfg.patcher.threshold = model.entropy_model.entropies(batch[:, :-1]).median().item()
    eager = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False)
    eager.loss = eager._loss
    want, patching = eager(batch)
    assert len(set((patching.patch_lengths > 0).sum(1).tolist())) > 1  # rows of different lengths
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.pack_patches = True
    made = _count_packings(monkeypatch)
    loss, _ = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False, patch_pad=8)(batch)
    total = int((patching.patch_lengths > 0).sum())
    assert made and set(made) == {-(-total // 8) * 8}  # packed into the padded count, traced
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert traced_only and loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert len(grads) == len(want_grads) and all((g - w).abs().max() < 1e-5 for g, w in zip(grads, want_grads))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
@pytest.mark.parametrize("patches", ["every byte", "one long patch", "median"])
def test_one_graph_traces_any_patch_count(traced_only, patches):
    """The loss graph on the extremes of the patch count (every byte a patch: many blocks of
    packed patches; one patch a row: the fewest) gives the eager model's loss on those patches."""
    from blt.config import tiny
    from blt.entropy_model import EntropyModel

    torch.manual_seed(0)
    cfg = tiny()
    model = BLT(cfg, EntropyModel(cfg.entropy_model))
    model.pack_patches = True
    batch = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(4, 260, (3, 400))], 1)
    entropies = model.entropy_model.entropies(batch[:, :-1])
    model.cfg.patcher.threshold = {"every byte": 0.0, "one long patch": 1e6, "median": entropies.median().item()}[patches]
    model.cfg.patcher.max_patch_length = None
    loss, patching = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False)(batch)
    counts = (patching.patch_lengths > 0).sum(1)
    want_counts = {"every byte": [400] * 3, "one long patch": [2] * 3}.get(patches)  # BOS, then the rest
    assert want_counts is None or counts.tolist() == want_counts
    eager = model(batch[:, :-1], batch[:, 1:], patching.patch_lengths, patching.next_starts_patch).loss
    assert traced_only and loss.item() == pytest.approx(eager.item(), abs=1e-5)


def test_given_entropies_patch_as_the_entropy_model_would():
    """A (tokens, entropies) batch is patched from the given entropies, eagerly and by OneGraph:
    given the entropy model's own, the patches and loss of a plain batch; given others, others."""
    from blt.config import tiny
    from blt.entropy_model import EntropyModel

    torch.manual_seed(0)
    cfg = tiny()
    model = BLT(cfg, EntropyModel(cfg.entropy_model))
    batch = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(4, 260, (2, 60))], 1)
    H = model.entropy_model.entropies(batch[:, :-1])
    model.cfg.patcher.threshold = H.median().item()
    og = one_graph.OneGraph(model, torch.device("cpu"), accumulate=False)
    og.loss, og.starts = og._loss, og._starts  # eager: this test is about what is patched
    live_loss, live = train.loss_and_patching(model, batch)
    for run in (lambda b: train.loss_and_patching(model, b, cfg), og):
        loss, patching = run((batch, H))
        assert torch.equal(patching.patch_lengths, live.patch_lengths)
        assert loss.item() == pytest.approx(live_loss.item(), abs=1e-6)
        shifted = run((batch, H.roll(1, dims=1)))[1]
        assert shifted.patch_lengths.shape != live.patch_lengths.shape or not torch.equal(shifted.patch_lengths, live.patch_lengths)


def test_train_with_precomputed_entropies(work, entropy_dir):
    """--precomputed-entropies: the frozen entropy model's entropies of the whole training stream
    are computed once into the shard cache (each with its full context), and the training steps
    patch from them."""
    from blt.checkpoint import load_model
    from blt.data import Batcher, open_shard
    from blt.patcher import patch_starts, patching_from_starts

    out = work / "precomputed"
    train.main(blt_argv(work, entropy_dir, out, 2, 4, "--precomputed-entropies"))
    (cached,) = (work / "cache").glob("*/train.entropies-*.f16")
    tokens = open_shard(cached.parent / "train.bin")
    entropies = np.memmap(cached, dtype=np.float16, mode="r")
    assert len(entropies) == len(tokens)
    em = load_entropy_model(entropy_dir / "model")
    cfg = load_model(out / "model").cfg
    assert cfg.doc_mask  # a new config: the entropy model reads within documents
    start = 1000  # a window long past the stream's start: its first receptive field is context only
    live = em.entropies(torch.from_numpy(tokens[start : start + 400].astype(np.int64))[None], cfg.doc_mask)[0]
    reach = em.receptive_field
    assert np.abs(entropies[start + reach : start + 400] - live[reach:].numpy()).max() < 1e-2
    assert np.abs(entropies[start : start + 10] - live[:10].numpy()).max() > 1e-2  # context the window lacks
    # step 1 (two micro-batches) patched from the cached entropies
    batcher = Batcher(tokens, 4, 64, seed=0, entropies=entropies)
    means = []
    for micro in range(2):
        batch, H = batcher.batch_at(micro)
        starts = patch_starts(batch[:, :-1], cfg.patcher, H, cfg.doc_mask)
        means.append(patching_from_starts(starts).mean_patch_length().item())
    assert rows(out)[0]["bytes_per_patch"] == pytest.approx(sum(means) / 2, abs=1e-6)
    with pytest.raises(SystemExit):
        train.main(blt_argv(work, entropy_dir, work / "bad", 2, 4, "--precomputed-entropies", "--patch-mode", "static"))


def test_entropy_pass_bench(entropy_dir):
    """bench/entropy_pass.py times --precomputed-entropies' pass over a whole encoded text with a
    trained entropy model (a train_entropy folder), and names bad input in one line."""
    from blt.data import encode_documents, load_documents

    n = len(encode_documents(list(load_documents(FIXTURE))))
    bench = ["bench/entropy_pass.py", "--device", "cpu", "--batch", "1"]
    result = run_cli(*bench, "--checkpoint", str(entropy_dir), "--data", FIXTURE, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"stream: {n:,} positions (--data {FIXTURE})" in result.stdout
    assert "positions/s" in result.stdout.splitlines()[-1]
    for args, message in ((["--checkpoint", str(entropy_dir / "missing")], "error: checkpoint folder not found"),
                          (["--config", "tiny", "--mbytes", "0"], "--mbytes must be > 0")):  # fmt: skip
        result = run_cli(*bench, *args, timeout=600)
        assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1], result.stderr


def test_lookahead_peeks_without_moving_the_batcher():
    from blt.data import Batcher

    tokens = torch.arange(1000).numpy()
    plain, seen = Batcher(tokens, 2, 16, seed=3), Batcher(tokens, 2, 16, seed=3)
    ahead = train_data.Lookahead(seen, torch.device("cpu"))
    for _ in range(4):
        upcoming = ahead.peek()
        assert ahead.peek() is upcoming and seen.step == plain.step
        batch = next(ahead)
        assert batch is upcoming
        assert torch.equal(batch, next(plain))
    assert seen.state_dict() == plain.state_dict()


@pytest.fixture
def broken_compiler(monkeypatch):
    """torch.compile whose backend fails on every graph, as inductor did on one shape (a sort
    inside a combined kernel): each compiled function raises dynamo's BackendCompilerFailed at
    its first call. Returns the list of failed compilations."""
    failures = []

    def backend(gm, example_inputs):
        failures.append(gm)
        raise RuntimeError("simulated compiler failure")

    compile_with(monkeypatch, backend)
    yield failures
    torch.compiler.set_stance("default")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_failed_compilation_falls_back_without_losing_a_step(work, entropy_dir, reference, broken_compiler, capsys):
    """--one-graph whose compilation fails goes on with each block compiled, and when that fails
    too, eagerly: one warning line each, every step trained once, the eager losses."""
    out = work / "fallback"
    train.main(blt_argv(work, entropy_dir, out, 3, 4, "--one-graph"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "--one-graph failed to compile" in warnings[0], warnings
    assert "continuing eagerly" in warnings[1] and len(broken_compiler) >= 2
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]
    assert losses(out) == pytest.approx(losses(reference)[:3], abs=2e-4)


def test_only_compiler_errors_fall_back():
    """Errors of the model, the data or the device propagate; compiler errors, also when
    another error was raised from them, step down one path at a time."""
    from torch._dynamo.exc import TorchDynamoException

    compile_error = TorchDynamoException("ops.sort is only supported in persistent reductions")
    assert one_graph.is_compile_error(compile_error)
    try:
        raise ValueError("wrapped") from compile_error
    except ValueError as e:
        assert one_graph.is_compile_error(e)
    assert not one_graph.is_compile_error(RuntimeError("CUDA out of memory"))
    model = torch.nn.Linear(2, 2)
    execution = one_graph.Fallback(model, one_graph=None, compiled=False)
    with pytest.raises(TorchDynamoException):
        execution.fall_back(compile_error)  # eager already: nothing slower to go to
