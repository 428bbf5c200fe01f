"""Train the byte-level LM: `python -m blt.train_entropy`.

It is BLT's entropy model (paper §2.3). After training, the entropy threshold θ is calibrated
so that --calibrate-mode patching of training text (--calibrate-on; held-out text is for
measuring, and a θ fitted on it would leak into every number measured there) gives
--target-bytes-per-patch bytes per patch on average, and saved as patcher_threshold.json next to the weights, where
`blt.train --entropy-model` finds it. Trained bigger, the same model is the plain byte-level
transformer baseline (blt.eval reads its folder too).

Flags and outputs are blt.train's (same loop, see there), plus the model shape (--dim
--layers --heads --window, over --config, a JSON file of EntropyModelConfig; default: the
tinystories preset's entropy model) and the calibration target. out/model/ holds
entropy_config.json, entropy_model.safetensors and patcher_threshold.json.

--doc-mask (the default) trains it within documents, as the official entropy model (block-causal
local attention), and calibrates θ on entropies read so and patched as a BLT with document
masking patches (a document's first two bytes open patches): so θ gives the target patch size
in the BLTs of new configs, which read it within documents. --no-doc-mask trains and calibrates
across documents (the shipped entropy model, the byte-level baseline of the FLOP-matched
comparison).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from blt.checkpoint import ENTROPY_CONFIG, THRESHOLD, load_entropy_model, save_entropy_model
from blt.config import PatcherConfig, load_json
from blt.entropy_model import EntropyModel
from blt.patcher import calibrate_threshold
from blt.train import check_same_config, run
from blt.train_flags import add_common_args, add_lm_shape_args, check_common_args, lm_config, plain_lm_execution

CALIBRATION_TOKENS = 256 * 1024  # the first 256 KiB of the --calibrate-on stream


def parse_args(argv=None) -> tuple[argparse.Namespace, object]:
    p = argparse.ArgumentParser(prog="python -m blt.train_entropy", description="Train the byte LM / entropy model.")
    add_common_args(p, out="runs/entropy")
    add_lm_shape_args(p, "bytes")
    g = p.add_argument_group("calibration")
    g.add_argument("--target-bytes-per-patch", type=float, default=4.5, help="mean patch size θ is calibrated to")
    g.add_argument("--calibrate-mode", choices=("entropy", "monotonic", "combined"), default="entropy")
    g.add_argument("--calibrate-on", choices=("train", "valid"), default="train",
                   help="calibrate θ on the training text (default) or on the held-out text (as before 2026-12)")  # fmt: skip
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="train and calibrate within documents (default), or across them")  # fmt: skip
    args = p.parse_args(argv)
    check_common_args(p, args)
    plain_lm_execution(args)
    if args.target_bytes_per_patch < 1:
        p.error("--target-bytes-per-patch must be >= 1")
    return args, lm_config(p, args, "entropy model")


def build(cfg, checkpoint: Path | None, doc_mask: bool) -> EntropyModel:
    if checkpoint is not None:
        check_same_config(cfg.__dict__, load_json(checkpoint / ENTROPY_CONFIG, "checkpoint config"), checkpoint)
        model = load_entropy_model(checkpoint)
    else:
        model = EntropyModel(cfg)
    model.doc_mask = doc_mask  # how the training loop's forward reads its windows
    return model


@torch.no_grad()
def calibrate(model: EntropyModel, stream: np.ndarray, args, device) -> dict:
    """θ for --calibrate-mode on the first CALIBRATION_TOKENS of a token stream (the
    --calibrate-on split), cut into rows of --seq-len (one shorter row if the stream is
    shorter than that)."""
    n = min(len(stream), CALIBRATION_TOKENS)
    T = min(args.seq_len, n)
    tokens = torch.from_numpy(stream[: n // T * T].astype(np.int64)).view(-1, T)
    model.to(device).eval()
    entropies = torch.cat([model.entropies(rows.to(device), args.doc_mask).cpu()
                           for rows in tokens.split(args.batch_size)])  # fmt: skip
    theta, achieved = calibrate_threshold(entropies, tokens, PatcherConfig(mode=args.calibrate_mode),
                                          args.target_bytes_per_patch, doc_mask=args.doc_mask)  # fmt: skip
    held_out = args.valid_data or f"{args.data} (held-out split, fraction {args.valid_fraction})"
    return {
        "threshold": theta,
        "mode": args.calibrate_mode,
        "target_bytes_per_patch": args.target_bytes_per_patch,
        "achieved_bytes_per_patch": achieved,
        "data": args.data if args.calibrate_on == "train" else held_out,
        "split": args.calibrate_on,
        "doc_mask": args.doc_mask,
        "bytes": tokens.numel(),
    }


def export(model: EntropyModel, data, device, args) -> None:
    record = calibrate(model, data.train if args.calibrate_on == "train" else data.valid, args, device)
    save_entropy_model(model, Path(args.out) / "model", extra_json={THRESHOLD: record})
    print(f"θ = {record['threshold']:.4f} gives {record['achieved_bytes_per_patch']:.3f} bytes/patch "
          f"({record['mode']} patching, {record['bytes']} {record['split']} bytes)")  # fmt: skip


def main(argv=None) -> None:
    args, cfg = parse_args(argv)
    run(args, build=lambda checkpoint: build(cfg, checkpoint, args.doc_mask), export=lambda model, data, device: export(model, data, device, args))


if __name__ == "__main__":
    main()
