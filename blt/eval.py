"""Held-out bits per byte of a trained model: `python -m blt.eval --checkpoint DIR --data PATH`.

Every document of PATH is encoded as BOS, bytes, EOS and packed into one stream, which
`blt.data.iter_eval_batches` cuts into non-overlapping windows, so every token after the
first is a target exactly once:

    bpb = (sum of -ln p(target) over all targets) / ln 2 / (number of targets)

EOS (and the BOS that opens the next document) are targets and count as bytes; the BOE
padding of the last window is not. DIR is a BLT model folder (blt.train's out/model) or a
byte-LM folder (blt.train_entropy's out/model, the byte-level transformer baseline).
The last line printed is exactly `bpb=<float> bytes=<int> bytes_per_patch=<float>`.
A BLT is evaluated with the document masking its config says (`--doc-mask`/`--no-doc-mask`
override it): with it, each document is predicted from its own bytes only, as one alone.

`eval_sums` is also what blt.train uses for its held-out evaluations.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blt.checkpoint import CONFIG, ENTROPY_CONFIG, CheckpointError, load_entropy_model, load_model
from blt.data import DataError, encode_documents, iter_eval_batches, load_documents
from blt.masks import default_backend
from blt.model import BLT, BLTOutput
from blt.tokens import BOE_ID


def logits_and_patching(model, inputs):
    """Run a BLT or a byte LM (wrapped by DDP/FSDP or not): (B,T) -> logits, Patching or None."""
    out = model(inputs)
    return (out.logits, out.patching) if isinstance(out, BLTOutput) else (out, None)


def real_patches(patching, inputs: torch.Tensor) -> torch.Tensor:
    """Number of patches that start at a real byte (not at BOE padding); a byte LM's "patch" is
    one byte."""
    if patching is None:
        return (inputs != BOE_ID).sum()
    lengths = patching.patch_lengths
    starts = (lengths.cumsum(1) - lengths).clamp(max=inputs.shape[1] - 1)
    return ((lengths > 0) & (inputs.gather(1, starts) != BOE_ID)).sum()


@torch.no_grad()
def eval_sums(model, batches, device, amp_dtype: torch.dtype | None = None, byte_counts=None) -> torch.Tensor:
    """Sum over batches of (B, T+1) windows -> float64 tensor on `device`:
    [nats, target bytes, input tokens, patches], BOE (padding) ignored throughout.
    amp_dtype: autocast dtype (None: no autocast). byte_counts: bytes each token id stands for
    (a BPE vocabulary, blt.bpe); None: every token but BOE is one byte. The vocabulary is the
    logits' last dimension.

    Sums rather than means, so that ranks can add theirs up and the result stays exact."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    if byte_counts is not None:
        byte_counts = torch.as_tensor(byte_counts, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, patching = logits_and_patching(model, inputs)
        nats = F.cross_entropy(
            logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=BOE_ID, reduction="sum"
        )
        target_bytes = (targets != BOE_ID).sum() if byte_counts is None else byte_counts[targets].sum()
        sums += torch.stack([nats.double(), target_bytes, (inputs != BOE_ID).sum(), real_patches(patching, inputs)])
    return sums


def load_any(path: Path, device, doc_mask: bool | None = None):
    """A BLT folder (config.json) or a byte-LM folder (entropy_config.json). doc_mask: the BLT's
    document masking (None: as its config says)."""
    if path.is_dir() and not (path / CONFIG).exists() and (path / ENTROPY_CONFIG).exists():
        if doc_mask is not None:
            raise CheckpointError(f"{path} holds a byte LM: --doc-mask and --no-doc-mask apply to BLT folders")
        return load_entropy_model(path, device)
    model = load_model(path, device)
    if doc_mask is not None:
        model.cfg.doc_mask = doc_mask
    return model


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The flags of an evaluation (blt.eval, blt.robustness): model, data, windows, device."""
    p.add_argument("--checkpoint", required=True, help="model folder (BLT or byte LM)")
    p.add_argument("--data", required=True, help="file, directory, glob or source name (see blt.data)")
    p.add_argument("--seq-len", type=int, default=2048, help="bytes per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="a BLT's document masking: each document read alone in a window (default: as the "
                        "checkpoint's config says)")  # fmt: skip


def eval_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Check add_eval_args's values (one-line parser errors) -> the device to run on."""
    if args.seq_len < 2 or args.batch_size < 1:
        p.error("--seq-len must be >= 2 and --batch-size >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(args.device)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m blt.eval", description=__doc__.split("\n\n")[0])
    add_eval_args(p)
    args = p.parse_args(argv)
    device = eval_device(p, args)
    try:
        model = load_any(Path(args.checkpoint), device, args.doc_mask)
        tokens = encode_documents(list(load_documents(args.data)))
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    n_windows = math.ceil((len(tokens) - 1) / args.seq_len)
    batches = tqdm(
        iter_eval_batches(tokens, args.batch_size, args.seq_len),
        total=math.ceil(n_windows / args.batch_size), desc="eval", unit="batch", leave=False,
    )  # fmt: skip
    # fp32 throughout: the number is a measurement, not a training signal.
    nats, targets, inputs, patches = eval_sums(model, batches, device).tolist()
    attention = {"flex": "FlexAttention (compiled kernels)", "dense": "SDPA (dense masks)"}[default_backend(device)]
    print(f"execution: eager, float32; attention {attention}")
    masking = f", document masking {'on' if model.cfg.doc_mask else 'off'}" if isinstance(model, BLT) else ""
    print(f"model {args.checkpoint}{masking}, data {args.data}: {len(tokens)} tokens in {n_windows} windows "
          f"of {args.seq_len}")  # fmt: skip
    print(f"bpb={nats / math.log(2) / targets} bytes={int(targets)} bytes_per_patch={inputs / patches}")


if __name__ == "__main__":
    main()
