"""The BPE-token baseline of the FLOP-matched comparison (paper §4: BLT against a Llama-style
model over a BPE tokenizer): a byte-level BPE tokenizer, the token LM, and its held-out bits
per byte over exactly the bytes `blt.eval` scores.

Tokenizer. Byte-level BPE trained with the `tokenizers` library (a bench/test-only dependency,
imported when a tokenizer is trained or loaded). Bytes are bytes, as in `blt.data`: a document
is split into pre-tokens by a GPT-2-style regex run over its raw bytes (letters, digits and
whitespace are ASCII classes; every byte >= 0x80 falls in the "other" class, so UTF-8
characters stay inside one pre-token and a multi-byte character may be split across
tokens), each pre-token's bytes are written in the GPT-2 byte alphabet (one printable
character per byte value), and BPE merges within pre-tokens. The library sees only the
alphabet, never decoded text, so every byte string round-trips exactly, invalid UTF-8
included, with no normalisation. (The library's own ByteLevel pre-tokenizer takes `str`, so it
could not encode invalid UTF-8; that is why the split is done here.) The limit: a pre-token
never crosses an ASCII letter/digit/space boundary, so no token does either.

Ids. 0, 1, 2 are BOE (padding), BOS and EOS as in `blt.tokens`; BPE token k is id k + OFFSET.
A document is BOS, its tokens, EOS, and documents are packed end to end, as
`blt.data.encode_documents` packs bytes. The specials are not in the library's vocabulary, so
no text can ever encode to one.

Vocabulary size (`DEFAULT_VOCAB_SIZE` = 4096, specials included). Trained on ~7.8 MB of
TinyStories and measured on 500 other stories, 1024 gives 3.06 bytes per token, 4096 gives 3.91
and 16384 only 4.08 (the trainer stops at 13663: there are no more pairs to merge). So 4096 gets
nearly all the compression there is, while the embedding and output tables (2 x 4096 x dim) do
not dominate a small model: at dim 512 they are 4.2M parameters, against ~25M in 8 layers.

Bits per byte. blt.eval's stream is BOS, bytes, EOS per document, and every token after the
first is a target: each document's bytes and EOS, and the BOS of every document but the first.
The BPE stream has the same specials in the same places, so its targets (every token after the
first) cover exactly the same bytes, each special counting as its one "byte":

    bpb = (sum over target tokens of -ln p(token)) / ln 2 / (sum of len(doc) + 2 over docs - 1)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blt.checkpoint import (
    TOKEN_LM_CONFIG, TOKEN_LM_WEIGHTS, TOKENIZER, CheckpointError, atomic_dir_write, load_weights, read_safetensors,
    write_json,
)
from blt.config import ConfigError, EntropyModelConfig, entropy_config_from_dict, load_json
from blt.data import SHARD_DTYPE, iter_eval_batches
from blt.entropy_model import EntropyModel
from blt.tokens import BOE_ID, BOS_ID, EOS_ID

OFFSET = EOS_ID + 1  # BPE token k is id k + 3
DEFAULT_VOCAB_SIZE = 4096

# GPT-2's pre-tokenizer with ASCII classes, over bytes decoded as Latin-1 (one character per
# byte). Its pieces tile the input: every byte is whitespace, an ASCII letter or digit, or other.
PRE_TOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", re.ASCII)


def byte_alphabet() -> list[str]:
    """GPT-2's byte alphabet: alphabet[b] is the printable character that stands for byte b.
    Printable Latin-1 bytes stand for themselves; the others take U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = [], 0
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


ALPHABET = byte_alphabet()
_TO_ALPHABET = {b: c for b, c in enumerate(ALPHABET)}  # str.translate table: Latin-1 char -> alphabet char
_FROM_ALPHABET = {c: b for b, c in enumerate(ALPHABET)}


def pre_tokens(doc: bytes) -> list[str]:
    """A document's pre-tokens, each written in the byte alphabet."""
    return [piece.translate(_TO_ALPHABET) for piece in PRE_TOKEN.findall(doc.decode("latin-1"))]


class BPETokenizer:
    """Byte-level BPE over raw bytes (see the module docstring); ids are shifted by OFFSET."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer with a BPE model over the byte alphabet
        n = tokenizer.get_vocab_size()
        self.vocab_size = n + OFFSET
        self.token_bytes = [b""] * OFFSET + [bytes(_FROM_ALPHABET[c] for c in tokenizer.id_to_token(k)) for k in range(n)]
        # Bytes each id stands for in bits per byte: a special is one "byte", BOE padding none.
        self.byte_counts = np.array([0, 1, 1] + [len(t) for t in self.token_bytes[OFFSET:]], dtype=np.int64)

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int = DEFAULT_VOCAB_SIZE) -> BPETokenizer:
        """Train on documents (raw bytes). vocab_size counts the specials and must be at least
        OFFSET + 256; on little text the trainer may stop short of it (see .vocab_size)."""
        from tokenizers import Tokenizer, models, trainers

        if vocab_size < OFFSET + 256:
            raise ValueError(f"vocab_size {vocab_size} < {OFFSET + 256} (3 specials + 256 bytes)")
        tokenizer = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - OFFSET, initial_alphabet=ALPHABET, show_progress=False)
        tokenizer.train_from_iterator((pre_tokens(doc) for doc in documents), trainer=trainer)
        return cls(tokenizer)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, doc: bytes) -> list[int]:
        """Raw bytes -> token ids, no specials."""
        words = pre_tokens(doc)
        if not words:
            return []
        return [k + OFFSET for k in self.tokenizer.encode(words, is_pretokenized=True).ids]

    def decode(self, ids) -> bytes:
        """Token ids -> raw bytes; specials are dropped."""
        return b"".join(self.token_bytes[int(i)] for i in ids)

    def encode_documents(self, docs: Sequence[bytes]) -> np.ndarray:
        """One packed stream, BOS, tokens..., EOS for each document (uint16, as blt.data's shards)."""
        if self.vocab_size > np.iinfo(SHARD_DTYPE).max + 1:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit {SHARD_DTYPE}")
        stream = []
        for doc in docs:
            stream += [BOS_ID, *self.encode(doc), EOS_ID]
        return np.asarray(stream, dtype=SHARD_DTYPE)


class TokenLM(EntropyModel):
    """The Llama-style token LM: the entropy model's transformer (blt.entropy_model) with the
    BPE vocabulary; cfg.window counts tokens. tokens (B,T) -> logits (B,T,vocab_size)."""

    def __init__(self, cfg: EntropyModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)


def eval_byte_count(docs: Sequence[bytes]) -> int:
    """The bytes blt.eval scores for these documents: every token of BOS, bytes, EOS per
    document, packed, but the first."""
    return sum(len(doc) + 2 for doc in docs) - 1 if docs else 0


class BitsPerByte(NamedTuple):
    bpb: float
    nats: float  # sum of -ln p over the target tokens
    bytes: int  # eval_byte_count(docs)
    tokens: int  # target tokens


def bpe_bits_per_byte(
    model: TokenLM, tokenizer: BPETokenizer, documents: Sequence[bytes], seq_len: int = 2048, batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> BitsPerByte:  # fmt: skip
    """Held-out bits per byte of a token LM over the same bytes blt.eval scores (module docstring).

    The token stream is cut as blt.eval cuts bytes (blt.data.iter_eval_batches: windows of
    seq_len tokens, every token after the first a target once, BOE padding ignored), so a window
    here spans ~bytes-per-token times more text than a byte window of the same seq_len. fp32.
    """
    stream = tokenizer.encode_documents(documents)
    n_bytes = eval_byte_count(documents)
    covered = int(tokenizer.byte_counts[stream[1:]].sum())
    if covered != n_bytes:  # cannot happen while encode round-trips; it is the claim bpb rests on
        raise AssertionError(f"the target tokens cover {covered} bytes, blt.eval counts {n_bytes}")
    return stream_bits_per_byte(model, stream, tokenizer.byte_counts, seq_len, batch_size, device)


@torch.no_grad()
def stream_bits_per_byte(
    model: TokenLM, stream: np.ndarray, byte_counts: np.ndarray, seq_len: int = 2048, batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> BitsPerByte:  # fmt: skip
    """bpe_bits_per_byte of an already encoded stream (BOS, tokens, EOS per document, packed),
    its bytes counted with the tokenizer's byte_counts (blt.train_bpe's held-out shard). fp32."""
    device = torch.device(device)
    n_bytes = int(byte_counts[np.asarray(stream[1:])].sum())
    model = model.to(device).eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    targets_seen = 0
    for batch in iter_eval_batches(stream, batch_size, seq_len):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs).float()
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=BOE_ID, reduction="sum").double()
        targets_seen += int((targets != BOE_ID).sum())
    nats = nats.item()
    return BitsPerByte(nats / np.log(2) / n_bytes, nats, n_bytes, targets_seen)


# ---- the model folder (blt.train_bpe's out/model) ------------------------------------------


def save_token_lm(model: TokenLM, tokenizer: BPETokenizer, path: str | Path, extra_json: dict | None = None) -> None:
    """Write a token LM's model folder atomically: TOKEN_LM_CONFIG ({"model": its
    EntropyModelConfig, "vocab_size": n}), TOKEN_LM_WEIGHTS (safetensors), TOKENIZER, and the
    extra JSON files given ({file name: object})."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        write_json(tmp / TOKEN_LM_CONFIG, {"model": model.cfg.__dict__, "vocab_size": model.output.out_features})
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / TOKEN_LM_WEIGHTS)
        tokenizer.save(tmp / TOKENIZER)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)

    atomic_dir_write(path, write)


def load_token_lm(path: str | Path, device: torch.device | str = "cpu") -> tuple[TokenLM, BPETokenizer]:
    """A token LM folder (save_token_lm) -> (model in eval mode, tokenizer); tensors and JSON only."""
    path = Path(path)
    if not (path / TOKEN_LM_CONFIG).is_file():
        raise CheckpointError(f"no token LM in {path} ({TOKEN_LM_CONFIG} missing)")
    try:
        record = load_json(path / TOKEN_LM_CONFIG, "token LM config")
        cfg = entropy_config_from_dict(record["model"])
        vocab_size = int(record["vocab_size"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / TOKEN_LM_CONFIG}: not a token LM config ({e})") from None
    tokenizer = BPETokenizer.load(path / TOKENIZER)
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids, the model {vocab_size}")
    model = TokenLM(cfg, vocab_size)
    load_weights(model, read_safetensors(path / TOKEN_LM_WEIGHTS), f"token LM weights in {path}")
    return model.to(device).eval(), tokenizer
