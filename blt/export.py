"""Re-save a model folder, e.g. with bf16 weights to ship it small:

    python -m blt.export --checkpoint runs/blt/model --out checkpoints --dtype bf16

Loading casts the weights back to float32, so a bf16 export costs only the rounding of
each weight (measure it with blt.eval before shipping).

--out must be new, empty or a model folder (then replaced atomically); a folder holding any
other file, the --checkpoint folder itself, or one inside or around it is refused.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from blt.checkpoint import THRESHOLD, CheckpointError, check_replaceable, load_model, save_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_apart(src: Path, out: Path) -> None:
    """Refuse an --out that would replace the source folder or a folder around it, or write into it."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise CheckpointError(f"--out {out} is the --checkpoint folder: choose another folder")
    if s in o.parents:
        raise CheckpointError(f"--out {out} is inside the --checkpoint folder {src}: choose a folder outside it")
    if o in s.parents:
        raise CheckpointError(f"--out {out} contains the --checkpoint folder {src}: choose a folder outside it")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m blt.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model folder to read")
    p.add_argument("--out", required=True, help="model folder to write: new, empty, or a model folder (replaced atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="storage dtype of the weights")
    args = p.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    try:
        check_apart(src, out)
        check_replaceable(out)  # before the work, not after
        model = load_model(src)
        extra = {}
        if (src / THRESHOLD).is_file():
            extra[THRESHOLD] = json.loads((src / THRESHOLD).read_text())
        save_model(model, out, extra_json=extra, dtype=DTYPES[args.dtype])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.dtype} weights)")


if __name__ == "__main__":
    main()
