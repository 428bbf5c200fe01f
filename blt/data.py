"""Byte-level data: text documents -> cached token-id shards -> training and eval batches.

Documents come from `blt.sources` (hub files, URLs, local files, directories and globs;
bytes kept as they are).

Encoding: each document becomes BOS, (byte + 4)..., EOS (see `blt.tokens`). The
documents are packed end to end into one stream, and training windows cross document
boundaries; a BLT with document masking (config doc_mask, blt.masks) attends within each.

Held-out split: a document is held out if a keyed hash of its bytes is below
`valid_fraction`. The split is deterministic, needs one pass only (so it works when
streaming), and puts identical documents on the same side, so duplicates cannot leak
from train into held-out. If a separate validation source is given, it is the held-out
set and the fraction is not used.

Shard format: a flat little-endian uint16 array of token ids (`*.bin`), memory-mapped,
plus `meta.json`. See `SHARD_DTYPE` for why it is uint16. Shards live in
`cache_dir/<name>-<key>/`. The key is a hash of the data files (path, size and mtime
for local files; the URL for remote ones) and of the split settings. A re-run with
the same inputs reuses the shards. Every file is written to a temporary name and then
renamed into place with `os.replace`. Beside each shard, `<shard>.json` records its
length in bytes and the SHA-256 of its bytes; it is written after the shard, and
`meta.json` after both. A shard is used only when its record exists and matches (the
check reads the whole file once, about a second per GB); otherwise, with a one-line
note, the shards are rebuilt. So a truncated or corrupted cache, or a crash at any point
of a build, never gives wrong data. With several processes, call `prepare_data` on one
rank first, then a barrier.

Batches: `Batcher` draws random windows of T+1 tokens and returns (B, T+1) int64
tensors: inputs = [:, :-1], targets = [:, 1:]. The global batch at step k depends only
on (seed, k). Rank r takes rows [r*B, (r+1)*B), so any world size with the same global
batch sees the same data. `iter_eval_batches` walks the held-out stream once, in
non-overlapping windows, so that held-out bits per byte is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .sources import URL, DataError, read_documents, resolve_source
from .sources import DOC_SEPARATOR, load_documents  # noqa: F401  (blt.data: the data API in one import)
from .tokens import BOE_ID, BOS_ID, EOS_ID, OFFSET

# Why uint16 token ids and not uint8 bytes? Ids go up to 259, so they do not fit in a
# byte. Storing uint8 bytes plus an int64 array of document offsets would halve the disk
# space, but every window would then need a searchsorted over the offsets to put back
# BOS/EOS. With uint16, the file is exactly the stream the model sees, and a batch is one
# fancy index. TinyStories takes about 4.4 GB as uint16, which is fine here.
SHARD_DTYPE = np.dtype("<u2")
FORMAT_VERSION = 1  # bump when the shard contents change; it is part of the cache key

_WRITE_CHUNK = 1 << 24  # text bytes gathered before encoding and writing a shard piece
_HASH_CHUNK = 1 << 24  # bytes read per call when checking a shard's SHA-256


# ---------------------------------------------------------------------------- encoding


def encode_documents(docs: Sequence[bytes]) -> np.ndarray:
    """Encode documents as one packed stream: BOS, (byte + 4)..., EOS for each (uint16)."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths + 2)  # one past each document's EOS
    starts = ends - lengths - 2  # each document's BOS
    out = np.empty(int(ends[-1]) if len(docs) else 0, dtype=SHARD_DTYPE)
    is_byte = np.ones(len(out), dtype=bool)
    is_byte[starts] = False
    is_byte[ends - 1] = False
    out[is_byte] = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(SHARD_DTYPE) + OFFSET
    out[starts] = BOS_ID
    out[ends - 1] = EOS_ID
    return out


def is_heldout(doc: bytes, valid_fraction: float, seed: int) -> bool:
    """Hold out a document when a keyed hash of its bytes, mapped to [0, 1), is below the fraction.

    `seed` must be >= 0; it is the hash key.
    """
    digest = hashlib.blake2b(doc, digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64


# ------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class ShardInfo:
    """What a shard file holds."""

    docs: int
    tokens: int


class ShardWriter:
    """Write encoded documents to a shard in one pass, atomically, with its record.

    The data goes to a temporary file in the same directory. On a clean exit from the
    `with` block that file is renamed onto `path`, then its record (length and SHA-256,
    see `check_record`) is written. On an error it is deleted, and any older `path` is left
    as it was. Writing no documents raises DataError.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._sha256 = hashlib.sha256()
        self._bytes = 0
        self.docs = 0
        self.tokens = 0

    def add(self, doc: bytes) -> None:
        self._pending.append(doc)
        self._pending_bytes += len(doc)
        self.docs += 1
        self.tokens += len(doc) + 2
        if self._pending_bytes >= _WRITE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            piece = encode_documents(self._pending).tobytes()
            self._sha256.update(piece)
            self._bytes += len(piece)
            self._file.write(piece)
        self._pending, self._pending_bytes = [], 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.docs == 0:
            self._abort()
            if exc_type is None:
                raise DataError(f"no documents to write to {self.path}")
            return
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        _write_record(self.path, self._bytes, self._sha256.hexdigest())

    def _abort(self) -> None:
        self._file.close()
        os.unlink(self._tmp)

    @property
    def info(self) -> ShardInfo:
        return ShardInfo(docs=self.docs, tokens=self.tokens)


def build_shard(docs: Iterable[bytes], path: str | os.PathLike) -> ShardInfo:
    """Encode documents into a uint16 shard at `path` (atomically) and return what it holds."""
    with ShardWriter(path) as writer:
        for doc in docs:
            writer.add(doc)
    return writer.info


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard as a read-only uint16 array of token ids."""
    return np.memmap(path, dtype=SHARD_DTYPE, mode="r")


def _record_path(path: Path) -> Path:
    """Where the record of a cached file lives: `<name>.json` beside it."""
    return path.with_name(path.name + ".json")


def _write_record(path: Path, size: int, sha256: str) -> None:
    """Record a cached file's length and SHA-256, atomically, once the file is in place."""
    _write_atomic(_record_path(path), json.dumps({"bytes": size, "sha256": sha256}).encode())


def check_record(path: Path, size: int | None = None) -> str | None:
    """Why the cached file at `path` cannot be trusted, or None when it matches its record
    (and is `size` bytes long, if given). Reads the whole file."""
    if not path.is_file():
        return "missing"
    try:
        record = json.loads(_record_path(path).read_text())
        want_size, want_sha256 = record["bytes"], record["sha256"]
    except FileNotFoundError:
        return "no checksum record"
    except (ValueError, TypeError, KeyError, OSError):
        return "unreadable checksum record"
    actual = path.stat().st_size
    if actual != want_size:
        return f"{actual} bytes, its record says {want_size} (truncated?)"
    if size is not None and actual != size:
        return f"{actual} bytes, {size} expected"
    if _sha256(path) != want_sha256:
        return "SHA-256 differs from its record (corrupted)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ prepare_data


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split."""

    source: str = "tinystories"
    valid_source: str | None = None  # if set, this is the held-out set; valid_fraction is unused
    valid_fraction: float = 0.01  # share of the source's documents held out when there is no valid_source
    split_seed: int = 0  # the hash key of the split (>= 0)
    cache_dir: str = "data_cache"
    streaming: bool = False  # URLs only: read while downloading, without caching the raw file


@dataclass(frozen=True, eq=False)
class ByteDataset:
    """Train and held-out token streams, memory-mapped from the shard cache."""

    train: np.ndarray
    valid: np.ndarray
    directory: Path


def prepare_data(config: DataConfig) -> ByteDataset:
    """Build the train/held-out shards for a config, or reuse cached ones, and map them."""
    train_files = resolve_source(config.source)
    valid_files = resolve_source(config.valid_source) if config.valid_source else None
    if valid_files is None and not 0 < config.valid_fraction < 1:
        raise DataError(f"valid_fraction must be in (0, 1) without a valid_source, got {config.valid_fraction}")
    if config.split_seed < 0:
        raise DataError(f"split_seed must be >= 0, got {config.split_seed}")
    directory = Path(config.cache_dir) / f"{_slug(config.source)}-{_cache_key(config, train_files, valid_files)}"
    meta_path = directory / "meta.json"
    if not (meta_path.exists() and _shards_intact(directory)):
        meta_path.unlink(missing_ok=True)  # until both shards are rebuilt, nothing here is trusted
        meta = _build_shards(config, train_files, valid_files, directory)
        _write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return ByteDataset(
        train=open_shard(directory / "train.bin"), valid=open_shard(directory / "valid.bin"), directory=directory
    )


def _shards_intact(directory: Path) -> bool:
    for name in ("train.bin", "valid.bin"):
        problem = check_record(directory / name)
        if problem:
            _note(f"cached shard {directory / name}: {problem}; rebuilding the shards")
            return False
    return True


def _build_shards(config: DataConfig, train_files: list[str], valid_files: list[str] | None, directory: Path) -> dict:
    """Write train.bin and valid.bin, and return the metadata that describes them."""
    docs = read_documents(config.source, train_files, config.streaming)
    if valid_files is not None:
        train = build_shard(docs, directory / "train.bin")
        valid = build_shard(read_documents(config.valid_source, valid_files, config.streaming), directory / "valid.bin")
    else:
        train, valid = _build_split_shards(docs, directory, config.valid_fraction, config.split_seed)
    return {
        "format": FORMAT_VERSION,
        "dtype": SHARD_DTYPE.str,
        "train_files": train_files,
        "valid_files": valid_files,
        "split": None if valid_files else {"valid_fraction": config.valid_fraction, "seed": config.split_seed},
        "train": asdict(train),
        "valid": asdict(valid),
    }


def _build_split_shards(docs: Iterable[bytes], directory: Path, fraction: float, seed: int) -> tuple[ShardInfo, ShardInfo]:
    """Write train.bin and valid.bin in one pass, holding out documents with `is_heldout`."""
    with ShardWriter(directory / "train.bin") as train, ShardWriter(directory / "valid.bin") as valid:
        for doc in docs:
            (valid if is_heldout(doc, fraction, seed) else train).add(doc)
        for name, writer in (("held-out", valid), ("train", train)):
            if writer.docs == 0:
                raise DataError(
                    f"the {name} split is empty ({train.docs + valid.docs} documents, valid_fraction={fraction}): "
                    "change valid_fraction or give a valid_source"
                )
    return train.info, valid.info


def _cache_key(config: DataConfig, train_files: list[str], valid_files: list[str] | None) -> str:
    """Hash of everything the shard contents depend on. The streaming flag is not part of it."""
    spec = {
        "format": FORMAT_VERSION,
        "train": [_fingerprint(f) for f in train_files],
        "valid": [_fingerprint(f) for f in valid_files] if valid_files else None,
        "split": None if valid_files else [config.valid_fraction, config.split_seed],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(file: str) -> list:
    """A local file is identified by path, size and mtime; a URL by itself."""
    if URL.match(file):
        return [file]
    stat = os.stat(file)
    return [file, stat.st_size, stat.st_mtime_ns]


def _slug(name: str) -> str:
    """A readable, filesystem-safe prefix for the cache directory."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name or name)[:40] or "data"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------ precomputed entropies

ENTROPY_DTYPE = np.dtype("<f2")  # entropies are at most ln 260 = 5.56 nats: float16 keeps ~3e-3


def entropy_shard(tokens: np.ndarray, path: str | os.PathLike, compute) -> np.ndarray:
    """The entropy of every position of a token stream, memory-mapped from `path` as float16.

    `path` is used when it matches its record (`check_record`: length and SHA-256) and holds one
    entropy per token. Otherwise (with a one-line note if a file was there) `compute(tokens, out)`
    fills a new map of the stream's length (e.g. entropy_model.stream_entropies); it is written
    beside `path`, renamed into place and then recorded, so an interrupted build leaves nothing
    behind that a later run would trust. The caller puts whatever the entropies depend on
    (entropy model, context, dtype) in the file name."""
    path = Path(path)
    size = len(tokens) * ENTROPY_DTYPE.itemsize
    problem = check_record(path, size)
    if problem:
        if problem != "missing":
            _note(f"cached entropies {path}: {problem}; recomputing them")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            out = np.memmap(tmp, dtype=ENTROPY_DTYPE, mode="w+", shape=(len(tokens),))
            compute(tokens, out)
            out.flush()
            del out
            sha256 = _sha256(Path(tmp))
            os.replace(tmp, path)
            _write_record(path, size, sha256)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return np.memmap(path, dtype=ENTROPY_DTYPE, mode="r")


# ----------------------------------------------------------------------------- batches


class Batcher:
    """Random training windows from a token stream; resumable and split across ranks.

    Step k's global batch is `global_batch_size` windows of `seq_len + 1` tokens. The
    start of each window is drawn uniformly by a generator seeded with (seed, k), so the
    batch is a pure function of (seed, k). Rank r returns rows [r*B, (r+1)*B) as a
    (B, seq_len+1) int64 tensor, where B = `batch_size` is the per-rank batch. The rows
    of all ranks together are exactly the batch a single process would draw with
    batch_size = B * world_size. Each step costs one numpy fancy index into the memory map.

    With `entropies` (entropy_shard: one per token of the stream) a batch is a pair: the token
    rows and the (B, seq_len) float16 entropies of their first seq_len positions, the inputs.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        entropies: np.ndarray | None = None,
    ):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(tokens) < seq_len + 1:
            raise DataError(f"the token stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        if entropies is not None and len(entropies) != len(tokens):
            raise DataError(f"{len(entropies)} entropies for a stream of {len(tokens)} tokens")
        self.tokens, self.entropies = tokens, entropies
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.global_batch_size = batch_size * world_size
        self.step = 0

    def batch_at(self, step: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch at `step` (it does not change `self.step`)."""
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        index = mine[:, None] + np.arange(self.seq_len + 1)
        windows = torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))
        if self.entropies is None:
            return windows
        return windows, torch.from_numpy(np.asarray(self.entropies[index[:, :-1]]))

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step. The world size may change, but the global batch and seq_len must not."""
        for key in ("global_batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: saved {key}={state[key]}, this batcher has {getattr(self, key)}")
        self.seed = state["seed"]
        self.step = state["step"]


def iter_eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Walk a held-out stream once, for exact bits per byte.

    Window i is tokens[i*T : i*T + T + 1]. So the targets ([:, 1:]) of all windows
    together are tokens[1:], each exactly once. tokens[0] is a BOS, which is never a
    target. The last window is padded with BOE_ID (0), and the loss must ignore targets
    equal to 0. Batches hold up to `batch_size` windows, and the last one may hold fewer.
    With several ranks, rank r takes windows r, r + world_size, ...; their union is the
    whole stream.
    """
    n = len(tokens)
    starts = np.arange(0, n - 1, seq_len)[rank::world_size]
    offsets = np.arange(seq_len + 1)
    for i in range(0, len(starts), batch_size):
        idx = starts[i : i + batch_size, None] + offsets
        windows = np.where(idx < n, tokens[np.minimum(idx, n - 1)], BOE_ID)
        yield torch.from_numpy(windows.astype(np.int64))
