"""Nothing is lost and nothing foreign is touched: checkpoints, export, resume, locks, exit codes.

The runs train the tiny preset with static patching (no entropy model to train first) on the
fixture stories, in-process. Disk full is simulated by making the writers raise ENOSPC.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blt import checkpoint, export, train, train_entropy, train_state
from blt.checkpoint import CheckpointError, atomic_dir_write, load_model, save_model
from blt.config import tiny
from blt.model import BLT
from blt.tests.test_train import COMMON, losses, rows

STATIC = ["--config", "tiny", "--patch-mode", "static", "--patch-size", "4", "--batch-size", "4"]


def argv(work, out, steps, *extra) -> list[str]:
    return [*STATIC, *COMMON, "--cache-dir", str(work / "cache"), "--out", str(out), "--steps", str(steps), *extra]


def step_of(folder) -> int:
    return torch.load(folder / "train_state.pt", weights_only=True)["step"]


def error_line(capsys) -> str:
    """The one error line a refused command printed to stderr, last (after any progress bar)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    return lines[-1]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted 6-step run."""
    out = work / "reference"
    train.main(argv(work, out, 6))
    return out


@pytest.fixture(scope="module")
def saved(work):
    """A 4-step run saved at step 2 and at the end: checkpoint/ (step 4), checkpoint.prev/ (step 2)."""
    out = work / "saved"
    train.main(argv(work, out, 4, "--save-every", "2"))
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(run):
        out = tmp_path / run.name
        shutil.copytree(run, out)
        return out

    return copy


# ---- checkpoints: the previous one is kept; resume falls back to it -----------------------------


def test_checkpoint_keeps_the_previous_one(saved):
    assert step_of(saved / "checkpoint") == 4 and step_of(saved / "checkpoint.prev") == 2
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint", "checkpoint.prev", "metrics.jsonl", "model"]


def test_resume_falls_back_to_the_previous_checkpoint(work, saved, reference, copy_of, capsys):
    """A cut-off train_state.pt in the latest checkpoint: --resume warns in one line, continues from
    checkpoint.prev, and repeats the uninterrupted run's losses exactly."""
    out = copy_of(saved)
    state = out / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    train.main(argv(work, out, 6, "--resume"))
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert "train_state.pt is corrupt" in warning and "resuming from the previous checkpoint" in warning and "(step 2)" in warning
    assert losses(out) == losses(reference)


@pytest.mark.parametrize("damage", ["cut weights", "nan weights", "no latest", "bad json"])
def test_find_checkpoint_skips_a_damaged_latest(saved, copy_of, damage, capsys):
    out = copy_of(saved)
    latest = out / "checkpoint"
    if damage == "cut weights":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "nan weights":
        sd = load_file(latest / "model.safetensors")
        sd[sorted(sd)[0]][0] = float("nan")
        save_file(sd, latest / "model.safetensors")
    elif damage == "no latest":  # a crash between the two renames of a swap
        shutil.rmtree(latest)
    else:
        (latest / "config.json").write_text('{"encoder": ')
    folder, state = train_state.find_checkpoint(out)
    assert folder == out / "checkpoint.prev" and state["step"] == 2
    assert ("warning:" in capsys.readouterr().err) == (damage != "no latest")


def test_a_damaged_checkpoint_without_a_previous_one_is_a_one_line_error(work, saved, copy_of, capsys):
    out = copy_of(saved)
    shutil.rmtree(out / "checkpoint.prev")
    state = out / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 6, "--resume"))
    assert exit_info.value.code == 1
    assert "cannot resume:" in error_line(capsys)


# ---- no code runs from a checkpoint -------------------------------------------------------------


class Planted:
    """Unpickling this creates a file: what a malicious train_state.pt could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_never_unpickles_code(work, saved, copy_of, tmp_path, capsys):
    out = copy_of(saved)
    shutil.rmtree(out / "checkpoint.prev")
    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)
    state["rng"] = Planted(marker)
    torch.save(state, out / "checkpoint" / "train_state.pt")
    with pytest.raises(CheckpointError):
        try:
            checkpoint.read_train_state(out / "checkpoint")
        finally:
            assert not marker.exists(), "loading the train state ran code"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 6, "--resume"))
    assert exit_info.value.code == 1
    line = error_line(capsys)
    assert "cannot resume:" in line and "train_state.pt is corrupt, cut short or not a train state" in line
    assert not marker.exists()


def test_train_state_is_tensors_and_plain_values(saved):
    state = torch.load(saved / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["args"]["seed"] == 0
    assert isinstance(state["rng"][0]["numpy"][1], list) and len(state["rng"][0]["numpy"][1]) == 624


# ---- a full disk ----------------------------------------------------------------------------


def fail_on_call(n: int, real, error: Exception | None = None):
    """real(...), except that call n raises error, or (no error) writes a file that does not
    read back, without an error: a silent bad write."""
    calls = []

    def writer(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) != n:
            return real(obj, f, *args, **kwargs)
        if error is not None:
            raise error
        f.write(b"not a checkpoint")

    return writer


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what safetensors raises when the disk is full: its own error type, the OS error as text
ENOSPC_SAFETENSORS = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer, failure, steps", [("torch.save", "full", 4), ("save_file", "full", 6), ("torch.save", "garbage", 4)])
def test_disk_full_at_a_checkpoint(work, tmp_path, reference, monkeypatch, capsys, writer, failure, steps):
    """The second checkpoint's write (step 4: the last one, or one during the loop) fails, as
    torch.save and safetensors fail on a full disk or silently write a file that does not read
    back: one error line (on a line of its own, after the progress bar) naming the folder and
    what to do, exit code 1, the step-2 checkpoint intact, no temp folder; --resume then
    finishes the run."""
    out = tmp_path / "full"
    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", fail_on_call(2, torch.save, ENOSPC if failure == "full" else None))
    else:
        monkeypatch.setattr(checkpoint, "save_file", fail_on_call(2, checkpoint.save_file, ENOSPC_SAFETENSORS))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, steps, "--save-every", "2"))
    assert exit_info.value.code == 1
    line = error_line(capsys)
    if failure == "full":
        assert line == (f"error: could not write {out / 'checkpoint'}: No space left on device; "
                        "the last checkpoint is intact: free space and rerun with --resume")  # fmt: skip
    else:
        assert line.startswith(f"error: could not write {out / 'checkpoint'}: what was written does not read back (")
        assert line.endswith("the last checkpoint is intact: fix that and rerun with --resume")
    assert step_of(out / "checkpoint") == 2 and not (out / "checkpoint.prev").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]  # no temp folder, no lock
    monkeypatch.undo()
    train.main(argv(work, out, 6, "--resume"))
    assert losses(out) == losses(reference)


def test_disk_full_at_the_final_model(work, tmp_path, monkeypatch, capsys):
    """The model folder's write fails after the final checkpoint: the checkpoint is complete, and
    --resume writes the model; the final held-out row is logged once."""
    out = tmp_path / "full"
    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if path.parent.name.startswith(".model.tmp-"):
            raise ENOSPC
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 2))
    assert exit_info.value.code == 1
    assert error_line(capsys).startswith(f"error: could not write {out / 'model'}: No space left on device; the last")
    assert step_of(out / "checkpoint") == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]
    monkeypatch.undo()
    train.main(argv(work, out, 2, "--resume"))
    assert load_model(out / "model") is not None
    assert [r["step"] for r in rows(out) if "eval_bpb" in r] == [2]


# ---- nothing foreign is deleted -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(work):
    torch.manual_seed(0)
    cfg = tiny()
    cfg.patcher.mode = "static"
    path = work / "src"
    save_model(BLT(cfg), path)
    return path


def export_main(*args) -> str | None:
    """blt.export's error line (sys.exit prints it and exits with status 1), or None."""
    try:
        export.main(list(args))
    except SystemExit as e:
        return str(e.code)
    return None


def test_export_refuses_folders_it_did_not_write(model_dir, tmp_path):
    """--out holding a foreign file, a subfolder, the source folder itself, a folder inside it or
    around it: one error line, exit code 1, nothing changed."""
    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "data" / "sub").mkdir(parents=True)
    cases = [
        (foreign, "holds files this tool would not write there (notes.txt)"),
        (tmp_path / "data", "holds files this tool would not write there (sub)"),
        (model_dir, "is the --checkpoint folder"),
        (model_dir / "bf16", "is inside the --checkpoint folder"),
        (model_dir.parent, "contains the --checkpoint folder"),
    ]
    before = {p: p.read_bytes() for p in model_dir.iterdir()}
    for out, message in cases:
        line = export_main("--checkpoint", str(model_dir), "--out", str(out))
        assert line.startswith("error: ") and "\n" not in line and message in line, line
    assert (foreign / "notes.txt").read_text() == "mine" and (tmp_path / "data" / "sub").is_dir()
    assert {p: p.read_bytes() for p in model_dir.iterdir()} == before and not (model_dir / "bf16").exists()
    # a new, an empty and an existing model folder are written; the last replaced in place
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "new"):
        assert export_main("--checkpoint", str(model_dir), "--out", str(out)) is None
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_model_refuses_a_foreign_folder(model_dir, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="holds files this tool would not write there"):
        save_model(load_model(model_dir), tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_train_refuses_a_foreign_model_folder_before_training(work, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "draft.md").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 2))
    assert exit_info.value.code == 1 and "model holds files this tool would not write there (draft.md)" in error_line(capsys)
    assert not (out / "metrics.jsonl").exists() and (out / "model" / "draft.md").read_text() == "notes"


def test_stale_temp_folders_of_dead_writers_are_removed(model_dir, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, live = dead_pid(), sleeper.pid
        names = [f".model.tmp-{dead}", f".model.old-{dead}", f".model.tmp-{live}", f".other.tmp-{dead}", ".model.tmp-x"]
        for name in names:
            (tmp_path / name).mkdir()
        (tmp_path / f".model.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
        save_model(load_model(model_dir), tmp_path / "model")
    finally:
        sleeper.kill()
        sleeper.wait()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted([f".model.tmp-{live}", f".other.tmp-{dead}", ".model.tmp-x"])


@pytest.mark.parametrize("failure", ["full", "unreadable", "swap"])
def test_atomic_write_failure_keeps_the_old_folder(model_dir, tmp_path, monkeypatch, failure):
    """A write that raises, one whose files do not read back, and a failed second rename of the
    swap: WriteError, the old folder as it was, no temp folder."""
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def write(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"cut")
        if failure == "full":
            raise ENOSPC

    if failure == "swap":
        real = Path.rename

        def write(tmp):
            checkpoint.write_model_files(load_model(model_dir), tmp)

        def rename(src, dst):
            if src.name.startswith(".model.tmp"):  # the new folder into place
                raise ENOSPC
            return real(src, dst)

        monkeypatch.setattr(Path, "rename", rename)
    message = "what was written does not read back" if failure == "unreadable" else "No space left on device"
    with pytest.raises(checkpoint.WriteError, match=f"could not write {target}: {message}"):
        atomic_dir_write(target, write)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- non-finite weights ---------------------------------------------------------------------


def test_non_finite_weights_are_refused(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    sd = load_file(bad / "model.safetensors")
    name = sorted(sd)[3]
    sd[name].view(-1)[0] = float("inf")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"has inf or NaN values in tensor {name}$"):
        load_model(bad)
    model = load_model(model_dir)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[1] = float("nan")
    with pytest.raises(CheckpointError, match=f"in tensor {name} .*nothing was written"):
        save_model(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


# ---- one run per output folder --------------------------------------------------------------


def test_a_live_runs_lock_is_refused_and_a_dead_ones_taken_over(work, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    lock = out / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        for main in (train.main, train_entropy.main):
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_info:
                main(argv(work, out, 2) if main is train.main else [*COMMON, "--out", str(out), "--steps", "2"])
            assert exit_info.value.code == 1
            assert f"is in use by the run of PID {sleeper.pid} on {socket.gethostname()}" in error_line(capsys)
        assert lock.read_text() == f"{sleeper.pid} {socket.gethostname()}\n" and not (out / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    capsys.readouterr()
    train.main(argv(work, out, 2))  # the holder is dead now
    assert f"note: taking over {lock} from PID {sleeper.pid}" in capsys.readouterr().err
    assert not lock.exists() and len(losses(out)) == 2  # released at exit


def test_the_lock_is_held_while_training_and_released_on_errors(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    seen = []
    real = train.train
    monkeypatch.setattr(train, "train", lambda *a: seen.append((out / "run.lock").read_text()) or real(*a))
    with pytest.raises(SystemExit):
        train.main(argv(work, out, 2, "--resume"))  # no checkpoint: an error
    assert seen == [f"{os.getpid()} {socket.gethostname()}\n"] and not (out / "run.lock").exists()
    assert "no checkpoint in" in error_line(capsys)


def test_out_that_is_a_file_or_not_writable(work, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, afile, 2))
    assert exit_info.value.code == 1 and error_line(capsys) == f"error: --out {afile} is a file, not a folder: choose another --out"
    assert afile.read_text() == "x"
    # a read-only folder (chmod does not stop root, so the refusal is simulated)
    out, real_open = tmp_path / "readonly", os.open
    out.mkdir()

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 2))
    assert exit_info.value.code == 1
    assert error_line(capsys) == f"error: --out {out} is not writable (Permission denied): choose another --out or make it writable"


# ---- exit codes, metrics, flags ---------------------------------------------------------------


def test_a_signal_saves_and_exits_with_128_plus_its_number(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sigint"
    real = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, args: (step == 2 and os.kill(os.getpid(), signal.SIGINT)) or real(step, args))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(work, out, 6))
    assert exit_info.value.code == 130
    assert "stopped by a signal (SIGINT) after step 3" in capsys.readouterr().out
    assert step_of(out / "checkpoint") == 3 and not (out / "run.lock").exists()


def test_a_cut_off_metrics_row_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "lo')
    metrics = train_state.Metrics(path, resume_step=3, enabled=True)
    metrics.write(step=4, loss=0.25)
    metrics.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert f"warning: {path} line 4 is cut off" in capsys.readouterr().err


@pytest.mark.parametrize("main", [train.main, train_entropy.main])
def test_seed_beyond_64_bits_is_a_parser_error(work, tmp_path, main, capsys):
    args = argv(work, tmp_path / "seed", 1) if main is train.main else [*COMMON, "--out", str(tmp_path / "seed"), "--steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--seed", str(2**70)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --seed must be >= 0 and < 2**63")
