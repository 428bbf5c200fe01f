"""bench/patch_size_study.py on CPU with tiny shapes: θ calibrated to the requested patch sizes,
every run at the reference's forward FLOPs per byte and the same training bytes, the table and
the plot, a re-run that trains nothing, and other settings refused.

The two entropy models are saved here untrained (blt.train_entropy's training of them is
flop_matched's entropy_job, run by test_flop_matched.py and test_patch_scaling.py); only the
three BLT runs train, side by side.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from blt.checkpoint import save_entropy_model
from blt.config import tiny
from blt.entropy_model import EntropyModel
from blt.flops import blt_flops_per_byte
from blt.tests.test_patch_scaling import load

FIXTURE = str(Path(__file__).parent / "fixtures" / "stories.txt")
SHAPES = ["32x1x2", "48x1x2"]
TARGETS = [2.5, 4.0]  # part (a); part (b) at 4
TOLERANCE = 0.02  # forward FLOPs per byte against the reference (the FFN width moves in steps of 16)


@pytest.fixture(scope="module")
def st():
    return load("patch_size_study")


def argv(work: Path, *extra) -> list[str]:
    return ["--flops", "1e9", "--data", FIXTURE, "--valid-data", FIXTURE, "--extra-valid", str(work / "extra.txt"),
            "--cache-dir", str(work / "cache"), "--runs", str(work / "runs"), "--config", "tiny",
            "--ref-bytes-per-patch", "4", "--patch-sizes", *map(str, TARGETS), "--entropy-models", *SHAPES,
            "--entropy-patch-size", "4", "--entropy-window", "64", "--seq-len", "128", "--batch-size", "2",
            "--lr", "3e-3", "--warmup", "2", "--threads", "1", "--device", "cpu", "--parallel", "3",
            "--extra-train-args", "--eval-every 0 --save-every 0", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first(tmp_path_factory, st):
    work = tmp_path_factory.mktemp("study")
    (work / "extra.txt").write_text("A small dog ran to the park and back.\n<|endoftext|>\nThe sun was warm.\n")
    parser = st.parser()
    for seed, shape in enumerate(SHAPES):
        torch.manual_seed(seed)
        cfg = st.entropy_shape(parser, tiny(), shape, 64)
        save_entropy_model(EntropyModel(cfg), work / "runs" / f"entropy-{shape}" / "model")
    st.main(argv(work))
    return work, json.loads((work / "runs" / "study.json").read_text())


def test_theta_calibrated_and_flops_equalised(first):
    work, study = first
    rows = study["rows"]
    assert [(r["entropy_model"], r["target_bytes_per_patch"], r["parts"]) for r in rows] == [
        ("32x1x2", 2.5, "a"), ("32x1x2", 4.0, "a, b"), ("48x1x2", 4.0, "b")]  # fmt: skip
    reference = blt_flops_per_byte(tiny(), 4, 128).forward
    assert study["reference_flops_per_byte"] == pytest.approx(reference)
    for r in rows:
        # θ gives the requested mean patch size on the training sample it was calibrated on
        assert r["train_bytes_per_patch"] == pytest.approx(r["target_bytes_per_patch"], rel=0.1), r
        assert r["threshold"] is not None and math.isfinite(r["threshold"])
        assert abs(r["matched_ratio"] - 1) <= TOLERANCE, r
        assert r["train_flops_per_byte"] == pytest.approx(3 * r["matched_flops_per_byte"])  # entropy model not charged
        assert all(math.isfinite(r[k]) and 0 < r[k] < 16 for k in ("bpb_valid", "bpb_extra", "entropy_bpb_valid"))
    # the same training bytes for every run, to within a step; the larger patches pay for a wider global model
    assert max(r["steps"] for r in rows) - min(r["steps"] for r in rows) <= 1
    widths = [int(r["global"].split("x")[0]) for r in rows[:2]]
    assert widths[0] < widths[1]
    assert rows[0]["entropy_params"] < rows[2]["entropy_params"]
    runs = work / "runs"
    assert (runs / "study.png").read_bytes()[:4] == b"\x89PNG" and (runs / "study.md").read_text().count("\n| ") == 4


def test_rerun_trains_nothing_and_other_settings_are_refused(first, st, capsys):
    work, study = first
    st.main(argv(work))
    out = capsys.readouterr().out
    assert out.count("skip ") == 5 and "-m blt.train" not in out  # three BLTs, two entropy models
    assert json.loads((work / "runs" / "study.json").read_text())["rows"] == study["rows"]
    for extra, message in [(["--ref-bytes-per-patch", "3"], "was started with other settings (config.global_model.dim: 48"),
                           (["--lr", "1e-3"], "was started with other settings (lr: 0.003 there, 0.001 now)")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            st.main(argv(work, *extra))
        assert e.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_fit_global_matches_the_reference_at_the_tinystories_shapes(st):
    from blt.config import tinystories

    base = tinystories()
    reference = blt_flops_per_byte(base, 4.5, 2048).forward
    for size in (3, 4.5, 6, 8):
        cfg = st.fit_global(base, size, 4.5, reference, 2048)
        assert blt_flops_per_byte(cfg, size, 2048).forward == pytest.approx(reference, rel=0.002)
        assert cfg.global_model.head_dim == 64 and cfg.global_model.hidden % 16 == 0
    assert st.fit_global(base, 8, 4.5, reference, 2048).global_model.dim == 704  # 512 x sqrt(8 / 4.5), whole heads
