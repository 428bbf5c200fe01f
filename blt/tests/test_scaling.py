"""bench/scaling.py end to end on CPU processes (gloo): the runs, the table, the efficiency
column and the resumption (a finished run is not run again)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "stories.txt"


def run(runs: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--data", str(FIXTURE), "--device", "cpu",
           "--config", "tiny", "--gpus", "1", "2", "--modes", "ddp", "--steps", "6", "--skip-steps", "2",
           "--log-every", "2", "--batch-size", "2", "--seq-len", "64", "--train-args", "--patch-mode space",
           "--runs", str(runs)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_scaling_table_and_rerun(tmp_path):
    first = run(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((tmp_path / "table.json").read_text())
    assert [(r["mode"], r["processes"]) for r in results] == [("ddp", 1), ("ddp", 2)]
    assert all(r["bytes_per_s"] > 0 and r["rows"] == 2 and r["execution"] == "eager; attention SDPA (dense masks)" for r in results)
    lines = (tmp_path / "table.md").read_text().splitlines()
    one, two = results[0]["bytes_per_s"], results[1]["bytes_per_s"]
    assert lines[2].split("|")[7].strip() == "100.0%"
    assert lines[3].split("|")[7].strip() == f"{100 * two / (2 * one):.1f}%"
    again = run(tmp_path)  # both results kept: nothing trains again
    assert again.returncode == 0 and "torch.distributed.run" not in again.stdout
    assert json.loads((tmp_path / "table.json").read_text()) == results
