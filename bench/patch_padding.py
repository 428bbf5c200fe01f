"""How much of the global transformer's work is padding, on real text (CPU is enough).

    python bench/patch_padding.py --checkpoint checkpoints --data valid [--batch-size 16]
        [--seq-len 2048] [--batches 3] [--patch-pad 128]

Cuts the text into consecutive (B, T) windows, patches them with the model's own patcher (its
entropy model and θ), and prints, per batch, each row's patch count and the share of padding
in the global transformer's input: as `blt.train --one-graph` lays it out, (B, P) with every row
padded to the longest and P to a multiple of --patch-pad, and as `--pack-patches` does on a GPU:
all rows end to end, each row's segment padded to a multiple of FlexAttention's block size
(blt.packing), and the total to a multiple of --patch-pad. Last, what `--one-graph` does, which
packs a batch only when that makes fewer slots than the padded rows: its padding, and how many
shapes its loss graph is compiled for over these batches (one per padded P, and one per
(padded P, packed total) pair that it packs).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt.checkpoint import CheckpointError, from_pretrained  # noqa: E402
from blt.data import DataError, encode_documents, load_documents  # noqa: E402
from blt.masks import BLOCK  # noqa: E402
from blt.packing import aligned_slot_count  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a model folder (ours or BltForCausalLM)")
    ap.add_argument("--data", required=True, help="text: train|valid|tinystories, or a path/glob of local files")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--patch-pad", type=int, default=128)
    args = ap.parse_args()
    if min(args.batch_size, args.seq_len, args.batches, args.patch_pad) < 1:
        sys.exit("--batch-size, --seq-len, --batches and --patch-pad must be >= 1")
    B, T = args.batch_size, args.seq_len
    need, docs, size = args.batches * B * T, [], 0
    try:
        model = from_pretrained(args.checkpoint).eval()
        for doc in load_documents(args.data):
            docs.append(doc)
            size += len(doc) + 2  # BOS and EOS
            if size >= need:
                break
    except (CheckpointError, DataError) as err:
        sys.exit(f"error: {err}")
    tokens = torch.as_tensor(encode_documents(docs).astype("int64"))
    if tokens.numel() < need:
        sys.exit(f"--data holds {tokens.numel()} tokens; {args.batches} batches of {B} x {T} need {need}")
    real_sum = padded_sum = packed_sum = chosen_sum = 0
    shapes = set()
    for i in range(args.batches):
        with torch.no_grad():
            patching = model.patch(tokens[i * B * T : (i + 1) * B * T].view(B, T))
        rows = (patching.patch_lengths > 0).sum(1)
        real, padded = int(rows.sum()), patching.padded(args.patch_pad).patch_lengths.numel()
        packed = -(-int(aligned_slot_count(rows, BLOCK)) // args.patch_pad) * args.patch_pad
        real_sum, padded_sum, packed_sum = real_sum + real, padded_sum + padded, packed_sum + packed
        chosen_sum += min(packed, padded)
        shapes.add((padded // B, packed) if packed < padded else padded // B)
        print(f"batch {i}: patches per row {rows.min().item()}-{rows.max().item()}; "
              f"padding {100 * (1 - real / padded):.1f}% as (B, P), {100 * (1 - real / packed):.1f}% packed")  # fmt: skip
    print(f"all {args.batches} batches of {B} x {T} bytes (mean {B * T * args.batches / real_sum:.2f} bytes/patch): "
          f"padding {100 * (1 - real_sum / padded_sum):.1f}% as (B, P), {100 * (1 - real_sum / packed_sum):.1f}% packed")  # fmt: skip
    print(f"--one-graph (packs a batch when that makes fewer slots): padding {100 * (1 - real_sum / chosen_sum):.1f}%, "
          f"{len(shapes)} shapes to compile: {sorted(shapes, key=str)}")  # fmt: skip


if __name__ == "__main__":
    main()
