"""Train the BPE-token baseline: `python -m blt.train_bpe --data train --valid-data valid`.

A Llama-style transformer over byte-level BPE tokens (blt.bpe: the tokenizer, TokenLM, and bits
per byte over the bytes blt.eval scores), trained with blt.train's loop and flags; --seq-len
counts tokens.

Tokenizer: --tokenizer DIR (a folder with tokenizer.json, e.g. another run's out/tokenizer or
out/model) or, without it, one trained with --vocab-size on the first --tokenizer-bytes of the
training documents into out/tokenizer (reused when there: a resumed run keeps its tokenizer).
Data: blt.data's byte shards, each document then encoded as BOS, tokens, EOS
(BPETokenizer.encode_documents) and cached as uint16 token shards beside the byte shards, in a
folder named by a hash of the tokenizer (bpe-<hash>/train.bin, valid.bin, meta.json).

Metrics: the loop's bpb and eval_bpb are bits per byte (blt.train's metrics.jsonl): held-out
nats over the evaluated windows / ln 2 / the bytes their target tokens stand for, and for the
training rows nats per token / ln 2 / the training stream's mean bytes per token; `loss` stays
nats per token. At the end, out/model holds token_lm_config.json, token_lm.safetensors,
tokenizer.json (load with blt.bpe.load_token_lm) and heldout.json: bpb, nats, bytes and tokens
of the whole held-out stream in fp32 (blt.bpe.stream_bits_per_byte, which equals
bpe_bits_per_byte of the held-out documents), windows of --seq-len tokens.
"""

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from blt.bpe import DEFAULT_VOCAB_SIZE, OFFSET, BPETokenizer, TokenLM, save_token_lm, stream_bits_per_byte
from blt.checkpoint import ENTROPY_CONFIG, ENTROPY_WEIGHTS, HELDOUT, TOKENIZER, load_weights, read_safetensors
from blt.config import ConfigError, load_json
from blt.data import SHARD_DTYPE, DataConfig, DataError, open_shard, prepare_data
from blt.tokens import BOS_ID, EOS_ID
from blt.tokens import OFFSET as BYTE_OFFSET
from blt.train import check_same_config, run
from blt.train_data import prepare
from blt.train_flags import add_common_args, add_lm_shape_args, check_common_args, lm_config, plain_lm_execution

ENCODE_DOCS = 4096  # documents per piece when encoding a shard
TOKENIZER_BYTES = 32 << 20  # default training text of a tokenizer trained here (4096 ids need far less: blt.bpe)
TOKENIZER_RECORD = "bpe.json"  # beside out/tokenizer/tokenizer.json: what it was trained with


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace, object]:
    p = argparse.ArgumentParser(prog="python -m blt.train_bpe", description="Train the BPE-token baseline LM.")
    add_common_args(p, out="runs/bpe")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer (a folder with tokenizer.json, or the file)")
    g.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="vocabulary of a tokenizer trained here, specials included (see blt.bpe)")  # fmt: skip
    g.add_argument("--tokenizer-bytes", type=int, default=TOKENIZER_BYTES, help="training text the tokenizer is trained on")
    add_lm_shape_args(p, "tokens")
    args = p.parse_args(argv)
    check_common_args(p, args)
    plain_lm_execution(args)
    if args.vocab_size < OFFSET + 256 or args.vocab_size > np.iinfo(SHARD_DTYPE).max + 1:
        p.error(f"--vocab-size must be in [{OFFSET + 256}, {np.iinfo(SHARD_DTYPE).max + 1}]")
    if args.tokenizer_bytes < 1:
        p.error("--tokenizer-bytes must be >= 1")
    return p, args, lm_config(p, args, "token LM")


# ---- tokenizer ---------------------------------------------------------------------------


def documents(stream: np.ndarray, limit: int | None = None):
    """The documents of a packed byte stream (BOS, byte + 4..., EOS each), as bytes; with limit,
    the first ones until about that many bytes."""
    starts = np.flatnonzero(stream == BOS_ID)
    ends = np.flatnonzero(stream == EOS_ID)
    total = 0
    for s, e in zip(starts, ends):
        doc = (np.asarray(stream[s + 1 : e]) - BYTE_OFFSET).astype(np.uint8).tobytes()
        yield doc
        total += len(doc)
        if limit is not None and total >= limit:
            return


def tokenizer_file(path: str) -> Path:
    path = Path(path)
    return path / TOKENIZER if path.is_dir() else path


def folder_tokenizer(folder: Path, record: dict, train_stream) -> BPETokenizer:
    """The tokenizer in folder if it was trained with `record` ({"vocab_size", "data",
    "tokenizer_bytes"}), else (none there) one trained on the first record["tokenizer_bytes"]
    of the training byte stream and saved there with the record. Another record: ConfigError."""
    if (folder / TOKENIZER).is_file():
        saved = json.loads((folder / TOKENIZER_RECORD).read_text()) if (folder / TOKENIZER_RECORD).is_file() else {}
        if saved != record:
            raise ConfigError(f"{folder} holds a tokenizer trained with {saved}, not {record}: pass --tokenizer "
                              f"{folder} to use it, or choose another folder")  # fmt: skip
        return BPETokenizer.load(folder / TOKENIZER)
    seen = []
    docs = (seen.append(len(d)) or d for d in documents(train_stream, record["tokenizer_bytes"]))
    tokenizer = BPETokenizer.train(docs, record["vocab_size"])
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{TOKENIZER}.tmp-{os.getpid()}"
    tokenizer.save(tmp)
    os.replace(tmp, folder / TOKENIZER)
    (folder / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"tokenizer: {tokenizer.vocab_size} ids, trained on {sum(seen)} bytes of {record['data']}; in {folder}")
    return tokenizer


def get_tokenizer(p: argparse.ArgumentParser, args) -> BPETokenizer:
    """--tokenizer's, out/tokenizer's (reused), or one trained here into out/tokenizer."""
    if args.tokenizer:
        file = tokenizer_file(args.tokenizer)
        if not file.is_file():
            p.error(f"--tokenizer {args.tokenizer}: no {TOKENIZER} there")
        return BPETokenizer.load(file)
    folder = Path(args.out) / "tokenizer"
    record = {"vocab_size": args.vocab_size, "data": args.data, "tokenizer_bytes": args.tokenizer_bytes}
    if not (folder / TOKENIZER).is_file() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("train the tokenizer in one process first (or pass --tokenizer DIR), then launch with torchrun")
    train = None
    if not (folder / TOKENIZER).is_file():
        train = prepare_data(DataConfig(source=args.data, valid_source=args.valid_data, valid_fraction=args.valid_fraction,
                                        cache_dir=args.cache_dir)).train  # fmt: skip
    try:
        return folder_tokenizer(folder, record, train)
    except ConfigError as e:
        p.error(str(e))


# ---- token shards ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Train and held-out BPE token streams, for blt.train's loop (see its `run`)."""

    train: np.ndarray
    valid: np.ndarray
    directory: Path
    bytes_per_token: float  # of the training stream: bytes its targets stand for / targets
    byte_counts: np.ndarray  # bytes each token id stands for (BPETokenizer.byte_counts)


def encode_shard(tokenizer: BPETokenizer, stream: np.ndarray, path: Path) -> int:
    """Encode a byte shard's documents into a token shard at path (atomically) -> its tokens."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n, docs = 0, []
    with open(tmp, "wb") as f:
        for doc in documents(stream):
            docs.append(doc)
            if len(docs) == ENCODE_DOCS:
                n += f.write(tokenizer.encode_documents(docs).tobytes()) // SHARD_DTYPE.itemsize
                docs = []
        if docs:
            n += f.write(tokenizer.encode_documents(docs).tobytes()) // SHARD_DTYPE.itemsize
    os.replace(tmp, path)
    return n


def token_shards(tokenizer: BPETokenizer, args, rank: int, world: int) -> TokenDataset:
    """The byte shards (blt.train_data.prepare), encoded once per tokenizer into token shards."""
    data = prepare(args, rank, world)
    key = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()[:16]
    directory = data.directory / f"bpe-{key}"
    meta_path = directory / "meta.json"

    def intact() -> dict | None:
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        sizes = [(directory / f"{s}.bin").stat().st_size if (directory / f"{s}.bin").is_file() else -1 for s in ("train", "valid")]
        return meta if sizes == [meta["train"] * SHARD_DTYPE.itemsize, meta["valid"] * SHARD_DTYPE.itemsize] else None

    if rank == 0 and intact() is None:
        directory.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        meta = {split: encode_shard(tokenizer, getattr(data, split), directory / f"{split}.bin") for split in ("train", "valid")}
        meta_path.write_text(json.dumps(meta) + "\n")
    if world > 1:
        dist.barrier()
    if intact() is None:
        raise DataError(f"token shards in {directory} are missing or cut short")
    train, valid = open_shard(directory / "train.bin"), open_shard(directory / "valid.bin")
    counts = tokenizer.byte_counts
    # bytes per training target token, over the whole stream (as many bytes as blt.eval would score)
    train_bytes = sum(int(counts[np.asarray(train[i + 1 : i + (1 << 24) + 1])].sum()) for i in range(0, len(train) - 1, 1 << 24))
    return TokenDataset(train, valid, directory, train_bytes / max(1, len(train) - 1), counts)


# ---- build and export --------------------------------------------------------------------


def build(cfg, vocab_size: int, checkpoint: Path | None) -> TokenLM:
    model = TokenLM(cfg, vocab_size)
    if checkpoint is not None:  # blt.train_state writes a non-BLT model as an entropy model's files
        check_same_config(cfg.__dict__, load_json(checkpoint / ENTROPY_CONFIG, "checkpoint config"), checkpoint)
        load_weights(model, read_safetensors(checkpoint / ENTROPY_WEIGHTS), f"checkpoint {checkpoint}")
    return model


def export(model: TokenLM, tokenizer: BPETokenizer, data: TokenDataset, device, args) -> None:
    """out/model, with the held-out bits per byte of the whole held-out stream (fp32)."""
    result = stream_bits_per_byte(model, data.valid, tokenizer.byte_counts, args.seq_len, args.batch_size, device)
    heldout = {**result._asdict(), "seq_len": args.seq_len, "data": args.valid_data or f"{args.data} (held-out split)"}
    save_token_lm(model, tokenizer, Path(args.out) / "model", extra_json={HELDOUT: heldout})
    print(f"held-out bits per byte {result.bpb:.4f} ({result.bytes} bytes, {result.tokens} tokens, fp32)")


def main(argv=None) -> None:
    p, args, cfg = parse_args(argv)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"execution: {'compile' if args.compile else 'eager'}", flush=True)
    try:
        tokenizer = get_tokenizer(p, args)
    except DataError as e:
        p.exit(1, f"error: {e}\n")
    run(
        args,
        build=lambda checkpoint: build(cfg, tokenizer.vocab_size, checkpoint),
        export=lambda model, data, device: export(model, tokenizer, data, device, args),
        data=lambda args, rank, world: token_shards(tokenizer, args, rank, world),
    )


if __name__ == "__main__":
    main()
