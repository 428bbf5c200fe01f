"""Bits per byte on clean vs noised text: `python -m blt.robustness --checkpoint DIR --data PATH`.

The paper's five character-level noise types (arXiv:2412.09871, §6 "Byte Modeling Improves
Robustness", §6.1 "Character-Level Tasks", paragraph "Noisy Data"; results in Table 3 on
noised HellaSwag prompts and completions). Here they are applied to each held-out document:

    AntSpeak    the whole text in upper case, written as space-separated characters
    Drop        10% of the characters removed at random
    RandomCase  a random 50% of the characters upper-cased, the other 50% lower-cased
    Repeat      20% of the characters repeated, at most four times
    UpperCase   every character upper-cased

The paper gives no code or further detail (the official code has none of these names), so
some choices are ours, each documented where it is made and the numbers exposed as flags:

- A character is a Unicode code point. Documents are bytes (blt.data keeps invalid UTF-8),
  so they are decoded with `surrogateescape`: an invalid byte is one character that case
  changes leave alone, and encoding gives it back unchanged.
- "10%", "50%", "20%" are exact counts: round(fraction · n) characters chosen uniformly
  without replacement (not an independent coin per character).
- AntSpeak puts one space between every two characters of the upper-cased text; an
  original space is a character like any other, so it becomes three spaces in a row.
- Repeat: each chosen character is followed by r extra copies, r uniform in 1..4, so it
  appears 2 to 5 times.

Each document is noised with its own `random.Random`, seeded from (seed, noise name,
document index), so a document's noise does not depend on the other documents or on
which noise types are run.

What the numbers mean: the text changes, so the noised BPB is how well the model
predicts the *noised* bytes, averaged over the noised text's own byte count (AntSpeak
roughly doubles it, Drop shortens it). It is not a score on the clean text given noisy
input. Both numbers are `blt.eval.eval_sums` over the same packing as `blt.eval`
(BOS, bytes, EOS per document), so the clean BPB is exactly what `blt.eval` prints for
the same documents.

Models: --checkpoint is any model folder of this repository: a BLT (blt.train), a byte LM
(blt.train_entropy: the byte-level baseline) or a BPE token LM (blt.train_bpe: the BPE
baseline). A token LM is scored with blt.bpe.bpe_bits_per_byte, over the same bytes as
blt.eval counts, in windows of the token count it was trained on (its heldout.json; else
--seq-len tokens): its noised text is tokenized afresh, so noise that breaks words into
rare pieces costs it tokens as well as bits.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

from blt.bpe import bpe_bits_per_byte, load_token_lm
from blt.checkpoint import HELDOUT, TOKEN_LM_CONFIG, CheckpointError
from blt.data import DataError, encode_documents, iter_eval_batches, load_documents
from blt.eval import add_eval_args, eval_device, eval_sums, load_any

DROP_FRACTION = 0.1
UPPER_FRACTION = 0.5
REPEAT_FRACTION = 0.2
MAX_REPEATS = 4


def ant_speak(text: str) -> str:
    """Upper-case the text and put one space between every two characters."""
    return " ".join(text.upper())


def drop(text: str, rng: random.Random, fraction: float = DROP_FRACTION) -> str:
    """Remove round(fraction · n) characters chosen uniformly at random."""
    gone = set(_choose(len(text), fraction, rng))
    return "".join(c for i, c in enumerate(text) if i not in gone)


def random_case(text: str, rng: random.Random, fraction: float = UPPER_FRACTION) -> str:
    """Upper-case round(fraction · n) characters chosen uniformly at random, lower-case the rest."""
    upper = set(_choose(len(text), fraction, rng))
    return "".join(c.upper() if i in upper else c.lower() for i, c in enumerate(text))


def repeat(text: str, rng: random.Random, fraction: float = REPEAT_FRACTION, max_repeats: int = MAX_REPEATS) -> str:
    """Follow round(fraction · n) random characters with 1..max_repeats extra copies each."""
    extra = {i: rng.randint(1, max_repeats) for i in sorted(_choose(len(text), fraction, rng))}
    return "".join(c * (1 + extra.get(i, 0)) for i, c in enumerate(text))


def upper_case(text: str) -> str:
    return text.upper()


def _choose(n: int, fraction: float, rng: random.Random) -> list[int]:
    return rng.sample(range(n), round(fraction * n))


NOISES = {"AntSpeak": ant_speak, "Drop": drop, "RandomCase": random_case, "Repeat": repeat, "UpperCase": upper_case}
RANDOM = {"Drop", "RandomCase", "Repeat"}  # the ones that take an rng


def noise_document(doc: bytes, name: str, seed: int, index: int, **params) -> bytes:
    """Apply one noise type to one document's bytes (see the module docstring for characters).

    params: the keyword arguments of that noise function (fraction, max_repeats)."""
    text = doc.decode("utf-8", errors="surrogateescape")
    if name in RANDOM:
        # str seeds are hashed with SHA-512: the same on every run and machine.
        out = NOISES[name](text, random.Random(f"{seed}/{name}/{index}"), **params)
    else:
        out = NOISES[name](text)
    return out.encode("utf-8", errors="surrogateescape")


def take_bytes(docs, max_bytes: int) -> list[bytes]:
    """The first max_bytes document bytes: whole documents, the last one cut to fit."""
    out, left = [], max_bytes
    for doc in docs:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def bpb(model, docs: list[bytes], batch_size: int, seq_len: int, device) -> tuple[float, int]:
    """(bits per byte, target bytes) of documents packed and windowed exactly as blt.eval does."""
    tokens = encode_documents(docs)
    nats, targets, _, _ = eval_sums(model, iter_eval_batches(tokens, batch_size, seq_len), device).tolist()
    return nats / math.log(2) / targets, int(targets)


class Scorer:
    """docs -> (bits per byte, target bytes) under one model folder: a BLT or byte LM with bpb()
    (windows of seq_len bytes), a BPE token LM with blt.bpe.bpe_bits_per_byte (windows of the
    token count it was trained on, else seq_len tokens). Both count the bytes blt.eval counts."""

    def __init__(self, path: Path, device, batch_size: int, seq_len: int, doc_mask: bool | None = None):
        self.device, self.batch_size, self.seq_len, self.tokenizer = device, batch_size, seq_len, None
        if (path / TOKEN_LM_CONFIG).is_file():
            if doc_mask is not None:
                raise CheckpointError(f"{path} holds a BPE token LM: --doc-mask and --no-doc-mask apply to BLT folders")
            self.model, self.tokenizer = load_token_lm(path, device)
            if (path / HELDOUT).is_file():  # blt.train_bpe writes its --seq-len (tokens) there
                self.seq_len = int(json.loads((path / HELDOUT).read_text()).get("seq_len", seq_len))
        else:
            self.model = load_any(path, device, doc_mask)

    def __call__(self, docs: list[bytes]) -> tuple[float, int]:
        if self.tokenizer is None:
            return bpb(self.model, docs, self.batch_size, self.seq_len, self.device)
        r = bpe_bits_per_byte(self.model, self.tokenizer, docs, self.seq_len, self.batch_size, self.device)
        return r.bpb, r.bytes


def noise_rows(score, docs: list[bytes], noises: list[str], seed: int, params: dict | None = None) -> list[dict]:
    """One row per noise type: the clean and noised bits per byte (score: a Scorer) and the
    target bytes of each. params: {noise name: keyword arguments of its function}."""
    clean, clean_bytes = score(docs)
    rows = []
    for name in noises:
        noised = [noise_document(doc, name, seed, i, **(params or {}).get(name, {})) for i, doc in enumerate(docs)]
        noisy, noisy_bytes = score(noised)
        rows.append({"noise": name, "bpb_clean": clean, "bpb_noised": noisy, "bytes_clean": clean_bytes,
                     "bytes_noised": noisy_bytes})  # fmt: skip
    return rows


def noise_params(args, name: str) -> dict:
    return {
        "Drop": {"fraction": args.drop_fraction},
        "RandomCase": {"fraction": args.upper_fraction},
        "Repeat": {"fraction": args.repeat_fraction, "max_repeats": args.max_repeats},
    }.get(name, {})


def parse_noise(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    by_lower = {n.lower(): n for n in NOISES}
    bad = [n for n in names if n.lower() not in by_lower]
    if bad or not names:
        given = ", ".join(bad) or repr(value)
        raise argparse.ArgumentTypeError(f"unknown noise {given}; choose from {', '.join(NOISES)}")
    return [by_lower[n.lower()] for n in names]


def fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return f


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m blt.robustness", description=__doc__.split("\n\n")[0])
    add_eval_args(p)
    p.add_argument("--noise", type=parse_noise, default=list(NOISES),
                   help=f"comma-separated subset of {','.join(NOISES)} (any case)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--max-bytes", type=int, default=200_000, help="evaluate the first N document bytes")
    p.add_argument("--drop-fraction", type=fraction, default=DROP_FRACTION, help="Drop: share of characters removed")
    p.add_argument("--upper-fraction", type=fraction, default=UPPER_FRACTION, help="RandomCase: share upper-cased")
    p.add_argument("--repeat-fraction", type=fraction, default=REPEAT_FRACTION, help="Repeat: share of characters")
    p.add_argument("--max-repeats", type=int, default=MAX_REPEATS, help="Repeat: most extra copies of a character")
    args = p.parse_args(argv)
    device = eval_device(p, args)
    if args.max_bytes < 1 or args.max_repeats < 1:
        p.error("--max-bytes and --max-repeats must be >= 1")
    try:
        score = Scorer(Path(args.checkpoint), device, args.batch_size, args.seq_len, args.doc_mask)
        docs = take_bytes(load_documents(args.data), args.max_bytes)
        if not docs:
            raise DataError(f"no documents in {args.data}")
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    n_bytes = sum(map(len, docs))
    print(f"model {args.checkpoint}, data {args.data}: {len(docs)} documents, {n_bytes} bytes, seed {args.seed}")
    print("bits per byte (fp32); a noised BPB is over the noised text's own bytes:")
    print("it measures how well the model predicts the noised bytes, not the clean text")
    print("bytes: predicted bytes as blt.eval counts them (each document's EOS and the next BOS included)")
    print(f"{'noise':<12}{'bpb_clean':>10}{'bpb_noised':>12}{'difference':>12}{'bytes_clean':>13}{'bytes_noised':>14}")
    params = {name: noise_params(args, name) for name in args.noise}
    for r in noise_rows(score, docs, args.noise, args.seed, params):
        clean, noisy = r["bpb_clean"], r["bpb_noised"]
        print(f"{r['noise']:<12}{clean:>10.4f}{noisy:>12.4f}{noisy - clean:>+12.4f}{r['bytes_clean']:>13}"
              f"{r['bytes_noised']:>14}")  # fmt: skip


if __name__ == "__main__":
    main()
