"""A training run's state in its output folder, and how --resume continues from it: the
checkpoints (model folder, optimizer, step, every RNG and the batcher), the run lock, and
stopping on a signal with a checkpoint.

In --out:
    checkpoint/     the latest checkpoint, replaced atomically: a model folder (what
                    blt.checkpoint writes) + train_state.pt (optimizer, step, RNG states,
                    batcher state, the flags; tensors and plain values, loaded weights_only)
    checkpoint.prev/  the checkpoint before it: a new one is written beside them, read back,
                    then swapped in, so two are on disk and three while one is written
    run.lock        "PID host" of the run writing the folder, while it runs: a second run on
                    the same --out is refused; a dead run's lock is taken over
    metrics.jsonl   one JSON row per logged step and evaluation (Metrics)

Resuming: the batch at step k is a pure function of (--seed, k) (blt.data.Batcher) and the
checkpoint holds everything else that changes, so a resumed CPU fp32 run repeats the losses
of an uninterrupted one exactly. The learning rate is a function of (step, --steps): resume
with the same --steps, or extend a run with `--schedule wsd` before its decay starts. A latest
checkpoint that does not read back whole gives way to checkpoint.prev, with a warning; a
metrics row cut off by a crash is dropped, with a warning.
SIGINT/SIGTERM finish the current step, save a checkpoint and exit with code 128 + the
signal's number (a second signal kills). A write that fails (a full disk) stops the run with
one error line, exit code 1, the last checkpoint intact and no temp folder left.
"""

import json
import os
import random
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
)

from blt.checkpoint import (
    CHECKPOINT_FILES,
    TRAIN_STATE,
    CheckpointError,
    WriteError,
    atomic_dir_write,
    pid_alive,
    read_train_state,
    verify_folder,
    write_entropy_model_files,
    write_model_files,
)
from blt.distributed import full_copy
from blt.model import BLT

CHECKPOINT, PREVIOUS, LOCK = "checkpoint", "checkpoint.prev", "run.lock"  # in --out
# Flags that must not change on --resume: they decide which bytes each step sees.
RESUME_FIXED = ("data", "valid_data", "valid_fraction", "seq_len", "grad_accum", "seed")


# ---- checkpoints -------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """Every RNG's state, as tensors and plain values (what torch.load(weights_only=True) reads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_checkpoint(path: Path, raw, optimizer, step, batcher, args, elapsed, rank, world, device, ema=None) -> None:
    """Model folder + train_state.pt, written together atomically; the checkpoint they replace
    becomes checkpoint.prev, the one before it is deleted. Collective (FSDP state dicts, every
    rank's RNG state); rank 0 writes. ema: the run's blt.ema.WeightAverage, if any."""
    optim_state = get_optimizer_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    plain = full_copy(raw, rank)
    if rank == 0:
        # the flags through JSON: plain values only, as weights_only loading requires
        state = {"step": step, "optimizer": optim_state, "batcher": batcher.state_dict(), "rng": rngs,
                 "args": json.loads(json.dumps(vars(args))), "elapsed": elapsed, "world_size": world}  # fmt: skip
        if ema is not None:
            state["ema"] = ema.state_dict()

        def write(tmp: Path) -> None:
            write_weights(plain, tmp)
            with open(tmp / TRAIN_STATE, "wb") as f:  # a file object: a full disk raises OSError, not RuntimeError
                torch.save(state, f)

        atomic_dir_write(path, write, own=CHECKPOINT_FILES, keep=path.with_name(PREVIOUS))
    if world > 1:
        dist.barrier()


def write_weights(model, folder: Path) -> None:
    (write_model_files if isinstance(model, BLT) else write_entropy_model_files)(model, folder)


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).exists() or (out / PREVIOUS).exists()


def find_checkpoint(out: Path) -> tuple[Path, dict]:
    """--resume: the latest checkpoint that reads back whole, and its train state. When the latest
    is corrupt or cut short (a crash, a full disk, a bad copy), the previous one, with a warning."""
    folders = [folder for folder in (out / CHECKPOINT, out / PREVIOUS) if folder.exists()]
    if not folders:
        raise CheckpointError(f"--resume: no checkpoint in {out / CHECKPOINT}")
    problems = []
    for folder in folders:
        try:
            verify_folder(folder)
            state = read_train_state(folder)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from the previous checkpoint, {folder} (step {state['step']})",
                  file=sys.stderr)  # fmt: skip
        return folder, state
    raise CheckpointError(f"cannot resume: {'; '.join(problems)}")


def check_resumable(state: dict, args, world: int) -> None:
    """Refuse to continue a checkpoint with flags that change which bytes each step sees."""
    saved = state["args"]
    if saved.get("ema", 0.0) != args.ema:  # checkpoints from before --ema: off
        raise CheckpointError(f"cannot resume: checkpoint has --ema {saved.get('ema', 0.0)}, this run has {args.ema}")
    for key in RESUME_FIXED:
        if saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"cannot resume: checkpoint has {flag} {saved[key]}, this run has {getattr(args, key)}")
    if saved["batch_size"] * state["world_size"] != args.batch_size * world:
        raise CheckpointError(
            f"cannot resume: checkpoint's global batch is {saved['batch_size']} x {state['world_size']} processes, "
            f"this run's is {args.batch_size} x {world} (keep --batch-size x processes the same)"
        )


# ---- metrics ------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl, written by rank 0. On resume, rows after the checkpoint's step (logged by
    the interrupted run after its last save) are dropped, so every step appears once; so is a
    row cut off by a crash, with a warning."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.file = path, None
        if not enabled:
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and path.exists():
                kept = [line for line, row in self._rows(path) if row["step"] <= resume_step]
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)  # a crash meanwhile leaves the old file whole
            elif resume_step is None:
                path.write_text("")
            self.file = path.open("a")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WriteError(path, e) from None

    @staticmethod
    def _rows(path: Path) -> list[tuple[str, dict]]:
        """(line, row) of every complete row; a line cut off (or not a row) is dropped with a warning."""
        rows = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "step" in row:
                rows.append((line, row))
            else:
                print(f"warning: {path} line {number} is cut off or not a metrics row: dropped", file=sys.stderr)
        return rows

    def write(self, **row) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                raise WriteError(self.path, e) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---- the run lock and signals ------------------------------------------------------------


def take_lock(out: Path) -> Path:
    """One run per output folder: out/run.lock holds the PID and host of the run writing there.
    A live holder's lock is refused; a dead one's (on this host) is taken over. -> the lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"--out {out} is a file, not a folder: choose another --out") from None
    except OSError as e:
        raise CheckpointError(f"--out {out} cannot be created ({e.strerror}): choose a writable --out") from None
    path, host = out / LOCK, socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None and not path.exists():
                continue  # released meanwhile
            if holder is not None and holder[1] == host and not pid_alive(holder[0]):
                print(f"note: taking over {path} from PID {holder[0]}, which is no longer running", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            who = f"the run of PID {holder[0]} on {holder[1]}" if holder else "another run"
            raise CheckpointError(f"{out} is in use by {who}: wait for it to end or choose another --out "
                                  f"(if no run uses it, delete {path})") from None  # fmt: skip
        except OSError as e:
            raise CheckpointError(f"--out {out} is not writable ({e.strerror}): "
                                  "choose another --out or make it writable") from None  # fmt: skip
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        return path


def read_lock(path: Path) -> tuple[int, str] | None:
    """(PID, host) of a lock file; None if it is gone or unreadable."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def release_lock(path: Path) -> None:
    """Remove the lock, if it is still ours."""
    if read_lock(path) == (os.getpid(), socket.gethostname()):
        path.unlink()


class StopOnSignal:
    """Inside the `with` block the first SIGINT/SIGTERM is only recorded, so the loop can finish
    its step and save; the handler then steps aside, so a second signal acts as usual."""

    def __enter__(self):
        self.caught = []  # signal numbers
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.caught.append(signum)
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
