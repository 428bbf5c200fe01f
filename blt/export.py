"""Re-save a model folder, e.g. with bf16 weights to ship it small:

    python -m blt.export --checkpoint runs/blt/model --out checkpoints --dtype bf16

Loading casts the weights back to float32, so a bf16 export costs only the rounding of
each weight (measure it with blt.eval before shipping).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from blt.checkpoint import THRESHOLD, CheckpointError, load_model, save_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m blt.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model folder to read")
    p.add_argument("--out", required=True, help="model folder to write (replaced atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="storage dtype of the weights")
    args = p.parse_args(argv)
    try:
        model = load_model(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    src = Path(args.checkpoint)
    extra = {}
    if (src / THRESHOLD).is_file():
        extra[THRESHOLD] = json.loads((src / THRESHOLD).read_text())
    save_model(model, args.out, extra_json=extra, dtype=DTYPES[args.dtype])
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, {args.dtype} weights)")


if __name__ == "__main__":
    main()
