"""recipes/tinystories.sh's control flow, with a stand-in `python` that records each command
and writes what the real one would: a rerun after an interruption skips the finished stages
and resumes the interrupted one."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Records its arguments; `--out DIR` gets a model folder (or, for blt.train while STOP_BLT is
# set, a checkpoint and the exit code of a run stopped by SIGTERM).
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
out=""
prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$2" in
  blt.train_entropy) mkdir -p "$out/model" && touch "$out/model/entropy_config.json" ;;
  blt.train)
    if [ -n "${STOP_BLT:-}" ]; then mkdir -p "$out/checkpoint"; exit 143; fi
    mkdir -p "$out/model" && touch "$out/model/config.json" ;;
esac
"""


def run_recipe(tmp_path: Path, **env) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "RUNS": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "export"), "DATA": "train.txt", "VALID": "valid.txt", **env}  # fmt: skip
    proc = subprocess.run(["bash", "recipes/tinystories.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, [line.split()[1] for line in calls.read_text().splitlines()], calls.read_text()


def test_recipe_reruns_skip_finished_stages_and_resume_the_interrupted_one(tmp_path):
    rc, modules, _ = run_recipe(tmp_path, STOP_BLT="1")
    assert rc == 143 and modules == ["blt.train_entropy", "blt.train"]  # stopped in the BLT stage
    rc, modules, calls = run_recipe(tmp_path)
    assert rc == 0 and modules == ["blt.train", "blt.export", "blt.eval"]  # the entropy model is done
    assert "--resume" in calls.splitlines()[0]  # the BLT continues from its checkpoint
    rc, modules, calls = run_recipe(tmp_path)
    assert rc == 0 and modules == ["blt.export", "blt.eval"]  # everything trained: export and evaluate again


def test_recipe_with_pretraining_runs_both_blt_stages(tmp_path):
    rc, modules, calls = run_recipe(tmp_path, PRETRAIN="mix")
    assert rc == 0 and modules == ["blt.train_entropy", "blt.train", "blt.train", "blt.export", "blt.eval"]
    pretrain, finetune = calls.splitlines()[1:3]
    assert "--data mix" in pretrain and "--init-from" in finetune and "--resume" not in calls


def test_recipe_on_several_gpus_trains_the_blt_under_torchrun(tmp_path):
    rc, modules, calls = run_recipe(tmp_path, GPUS="2", ACCUM="1")
    assert rc == 0 and modules == ["blt.train_entropy", "torch.distributed.run", "blt.export", "blt.eval"]
    blt = calls.splitlines()[1]
    assert "--nproc_per_node 2 -m blt.train --dist ddp" in blt and "--grad-accum 1" in blt


def test_recipe_variants_change_the_shape_and_share_an_entropy_model(tmp_path):
    rc, modules, calls = run_recipe(tmp_path, CONFIG="wide.json", ENT_FLAGS="--dim 256 --layers 4")
    entropy, blt = calls.splitlines()[:2]
    assert rc == 0 and modules[0] == "blt.train_entropy" and entropy.endswith(f"--dim 256 --layers 4 --out {tmp_path}/runs/entropy")
    assert "--config wide.json" in blt and f"--entropy-model {tmp_path}/runs/entropy " in blt
    rc, modules, calls = run_recipe(tmp_path, RUNS=str(tmp_path / "other"), ENTROPY=str(tmp_path / "runs" / "entropy"))
    assert rc == 0 and modules == ["blt.train", "blt.export", "blt.eval"]  # no second entropy model
    assert f"--entropy-model {tmp_path}/runs/entropy " in calls and "--config tinystories" in calls


def test_recipe_user_flags_come_after_the_recipes_own_and_reach_their_stage(tmp_path):
    rc, _, calls = run_recipe(tmp_path, PRETRAIN="mix", BLT_FLAGS="--ema 0.995 --dropout 0.15", FT_FLAGS="--dropout 0.3",
                              PRE_FLAGS="--lr 2e-3")  # fmt: skip
    pretrain, finetune = (line.split() for line in calls.splitlines()[1:3])

    def last(args, flag):  # argparse keeps a repeated flag's last value
        return args[len(args) - 1 - args[::-1].index(flag) + 1]

    assert rc == 0 and "--ema" in pretrain and "--ema" in finetune
    assert last(pretrain, "--dropout") == "0.15" and last(pretrain, "--lr") == "2e-3"
    assert last(finetune, "--dropout") == "0.3" and last(finetune, "--lr") == "1e-3"
