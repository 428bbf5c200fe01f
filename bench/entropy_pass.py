"""The one-off pass of `blt.train --precomputed-entropies`: the frozen entropy model over a whole
training stream, run as blt.train runs it (entropy_model.stream_entropies: pieces of
ENTROPY_CHUNK positions, each with the model's receptive field before it; bf16 autocast on CUDA).

    python bench/entropy_pass.py --checkpoint checkpoints [--data train.txt.xz] [--mbytes 64]
    python bench/entropy_pass.py --config bench --mbytes 64

The entropy model is the checkpoint's (a BLT or an entropy-model folder) or, with --config, a
preset's at random initialisation (the cost depends on the shapes only). The stream is the
encoded --data (documents as blt.data encodes them) or --mbytes million random bytes. Prints
positions per second and what that rate makes of a gigabyte of text.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt.checkpoint import ENTROPY_CONFIG, CheckpointError, load_entropy_model, load_model  # noqa: E402
from blt.config import ConfigError, preset  # noqa: E402
from blt.data import DataError, encode_documents, load_documents  # noqa: E402
from blt.entropy_model import EntropyModel, stream_entropies  # noqa: E402
from blt.train_data import ENTROPY_CHUNK  # noqa: E402
from blt.train_flags import entropy_model_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a BLT checkpoint folder, or an entropy model's")
    src.add_argument("--config", help="a preset's entropy model, randomly initialised (e.g. bench)")
    ap.add_argument("--data", help="text to encode and score (file or glob, as blt.train --data)")
    ap.add_argument("--mbytes", type=float, default=64.0, help="without --data: this many million random bytes")
    ap.add_argument("--batch", type=int, default=8, help="pieces per forward (stream_entropies' batch)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.mbytes <= 0 or args.batch < 1:
        sys.exit("--mbytes must be > 0 and --batch >= 1")
    device = torch.device(args.device)
    try:
        folder = entropy_model_dir(args.checkpoint) if args.checkpoint else None
        if folder is not None and (folder / ENTROPY_CONFIG).exists():
            model = load_entropy_model(folder, device)
        elif folder is not None:  # a BLT's folder: its entropy model
            model = load_model(args.checkpoint, device).entropy_model
        else:
            torch.manual_seed(0)
            model = EntropyModel(preset(args.config).entropy_model).to(device)
        if args.data:
            tokens = encode_documents(list(load_documents(args.data)))
        else:
            rng = np.random.default_rng(0)
            tokens = rng.integers(4, 260, int(args.mbytes * 1e6)).astype(np.uint16)
    except (CheckpointError, ConfigError, DataError, OSError) as err:
        sys.exit(f"error: {err}")
    if len(tokens) == 0:
        sys.exit(f"error: --data {args.data} holds no documents")
    model.eval()
    context = model.receptive_field or ENTROPY_CHUNK
    dtype = torch.bfloat16 if device.type == "cuda" else None
    out = np.zeros(len(tokens), dtype=np.float16)
    warm = tokens[: (context + ENTROPY_CHUNK) * args.batch + context]  # compiles / warms the kernels
    stream_entropies(model, warm, np.zeros(len(warm), np.float16), context, ENTROPY_CHUNK, args.batch, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stream_entropies(model, tokens, out, context, ENTROPY_CHUNK, args.batch, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cfg = model.cfg
    print(f"{name}  torch {torch.__version__}  entropy model dim {cfg.dim} x {cfg.n_layers} layers, window {cfg.window}")
    print(f"stream: {len(tokens):,} positions ({'--data ' + args.data if args.data else 'random bytes'}); "
          f"pieces of {ENTROPY_CHUNK} with {context} of context, {args.batch} per forward")  # fmt: skip
    print(f"{len(tokens) / sec:,.0f} positions/s: {sec:.1f} s here, {1e9 / (len(tokens) / sec) / 60:.1f} min per GB of text")


if __name__ == "__main__":
    main()
