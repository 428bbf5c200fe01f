"""The BPE-token baseline (blt.bpe): exact byte round-trips, bits per byte against a direct
computation, and the byte count against blt.eval's."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers")

from blt.bpe import (  # noqa: E402
    ALPHABET, OFFSET, BPETokenizer, TokenLM, bpe_bits_per_byte, eval_byte_count,
)
from blt.config import EntropyModelConfig  # noqa: E402
from blt.data import encode_documents, iter_eval_batches  # noqa: E402
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.eval import eval_sums  # noqa: E402
from blt.flops import token_lm_flops_per_byte, transformer_flops_per_byte  # noqa: E402
from blt.tokens import BOS_ID, EOS_ID, VOCAB_SIZE  # noqa: E402


def tiny_documents() -> list[bytes]:
    """Made-up stories with repeated words (so BPE has merges to learn) and a little UTF-8."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home", "happy", "café", "naïve", "日本"]
    docs = []
    for _ in range(40):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(3)]
        docs.append("\n".join(sentences).encode())
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(tiny_documents(), vocab_size=OFFSET + 256 + 64)


def test_alphabet_is_the_libraries_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    assert len(set(ALPHABET)) == 256
    assert set(ALPHABET) == set(pre_tokenizers.ByteLevel.alphabet())


def test_tokenizer_learns_merges(tokenizer):
    assert 256 + OFFSET < tokenizer.vocab_size <= 256 + OFFSET + 64
    doc = tiny_documents()[0]
    assert len(tokenizer.encode(doc)) < len(doc)  # it compresses the text it was trained on


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"The cat sat on the mat.",
        "café naïve 日本 🙂".encode(),
        b"\xff\xfe\x80 invalid \xc3 utf-8 \xe6\x97",  # not UTF-8: byte-level BPE keeps it anyway
        bytes(range(256)),
        b"  leading and trailing spaces \t\r\n\n",
        b"<|endoftext|> looks special but is text",
    ],
)
def test_round_trip_exact(tokenizer, data):
    ids = tokenizer.encode(data)
    assert all(OFFSET <= i < tokenizer.vocab_size for i in ids)  # text never encodes to a special
    assert tokenizer.decode(ids) == data


def test_round_trip_random_bytes(tokenizer):
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 1000):
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        assert tokenizer.decode(tokenizer.encode(data)) == data


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    doc = tiny_documents()[1]
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(doc) == tokenizer.encode(doc)


def test_stream_layout(tokenizer):
    docs = tiny_documents()[:3]
    stream = tokenizer.encode_documents(docs).tolist()
    bos = [i for i, t in enumerate(stream) if t == BOS_ID]
    eos = [i for i, t in enumerate(stream) if t == EOS_ID]
    assert bos[0] == 0 and eos[-1] == len(stream) - 1 and len(bos) == len(eos) == 3
    assert [tokenizer.decode(stream[b + 1 : e]) for b, e in zip(bos, eos)] == docs


def test_byte_count_matches_blt_eval():
    """eval_byte_count is the target-byte count blt.eval's eval_sums gives for the same documents."""
    docs = tiny_documents()[:5] + [b"\xff\x00 odd bytes", b"x"]
    model = EntropyModel(EntropyModelConfig(dim=16, n_layers=1, n_heads=2, window=None))
    sums = eval_sums(model, iter_eval_batches(encode_documents(docs), batch_size=3, seq_len=37), torch.device("cpu"))
    assert int(sums[1]) == eval_byte_count(docs)


@pytest.mark.parametrize("seq_len", [16, 1000])
def test_bits_per_byte_direct(tokenizer, seq_len):
    """bpe_bits_per_byte against the definition, computed here in another way: tokens per
    document from encode(), one forward per window, and the bytes counted from the text."""
    torch.manual_seed(0)
    docs = tiny_documents()[:6]
    model = TokenLM(EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=None), tokenizer.vocab_size)
    result = bpe_bits_per_byte(model, tokenizer, docs, seq_len=seq_len, batch_size=2)

    stream = [t for doc in docs for t in (BOS_ID, *tokenizer.encode(doc), EOS_ID)]
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            window = torch.tensor(stream[start : start + seq_len + 1])
            logp = F.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            nats -= logp.gather(1, window[1:, None]).sum().item()
    n_bytes = len(b"".join(docs)) + 2 * len(docs) - 1  # bytes, EOS, BOS: all but the first BOS
    assert result.bytes == n_bytes
    assert result.tokens == len(stream) - 1
    assert math.isclose(result.bpb, nats / math.log(2) / n_bytes, rel_tol=1e-5)
    # A random model's tokens cost about ln(vocab) each: a sanity check on the scale.
    assert math.isclose(result.nats / result.tokens, math.log(tokenizer.vocab_size), rel_tol=0.2)


def test_flops_per_byte():
    """With the byte vocabulary and one byte per token, a TokenLM is the byte baseline; its
    FLOPs per byte fall as tokens hold more bytes."""
    cfg = EntropyModelConfig(dim=64, n_layers=2, n_heads=4, window=None)
    assert math.isclose(token_lm_flops_per_byte(cfg, VOCAB_SIZE, 128, 1.0), transformer_flops_per_byte(cfg, 128))
    assert math.isclose(token_lm_flops_per_byte(cfg, 4096, 128, 4.0), token_lm_flops_per_byte(cfg, 4096, 128, 1.0) / 4)


def test_token_lm_parameters_follow_the_vocabulary():
    cfg = EntropyModelConfig(dim=16, n_layers=1, n_heads=2, window=None)
    model = TokenLM(cfg, 1000)
    assert model.tok_embeddings.weight.shape == (1000, 16) and model.output.weight.shape == (1000, 16)
    assert EntropyModel(cfg).output.weight.shape == (VOCAB_SIZE, 16)  # the byte model is unchanged


# ---- python -m blt.train_bpe ---------------------------------------------------------------

FIXTURE = str(Path(__file__).parent / "fixtures" / "stories.txt")
BPE_STEPS = 8
# Constant learning rate after warmup (min-lr = lr): a run cut short with --steps k and resumed
# with --steps N must then repeat the uninterrupted one.
BPE_ARGS = ["--data", FIXTURE, "--valid-data", FIXTURE, "--seq-len", "24", "--batch-size", "2", "--grad-accum", "2",
            "--lr", "3e-3", "--min-lr", "3e-3", "--warmup", "2", "--log-every", "1", "--eval-every", "0",
            "--eval-batches", "0", "--save-every", "0", "--dim", "32", "--layers", "1", "--heads", "2",
            "--vocab-size", "700", "--device", "cpu"]  # fmt: skip


def train_bpe_argv(work: Path, out: Path, steps: int, *extra) -> list[str]:
    return [*BPE_ARGS, "--cache-dir", str(work / "cache"), "--out", str(out), "--steps", str(steps), *extra]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> tuple[Path, Path]:
    from blt import train_bpe

    work = tmp_path_factory.mktemp("train_bpe")
    train_bpe.main(train_bpe_argv(work, work / "straight", BPE_STEPS))
    return work, work / "straight"


def test_train_bpe_reports_bits_per_byte_of_its_model(bpe_run):
    """The held-out number the run reports is bits per byte, recomputed here with
    bpe_bits_per_byte from the exported model and tokenizer on the held-out documents."""
    from blt.bpe import load_token_lm
    from blt.data import load_documents

    _, out = bpe_run
    model, tokenizer = load_token_lm(out / "model")
    assert tokenizer.vocab_size <= 700 and model.output.out_features == tokenizer.vocab_size
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (out / "model" / "tokenizer.json").read_text()
    docs = list(load_documents(FIXTURE))
    direct = bpe_bits_per_byte(model, tokenizer, docs, seq_len=24, batch_size=3)
    reported = json.loads((out / "model" / "heldout.json").read_text())
    assert reported["bytes"] == eval_byte_count(docs) == direct.bytes
    assert reported["tokens"] == direct.tokens
    assert math.isclose(reported["bpb"], direct.bpb, rel_tol=1e-6)
    # the loop's final eval_bpb (all held-out windows: --eval-batches 0) is bits per byte too
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_bpb" in r][-1]
    assert math.isclose(final["eval_bpb"], direct.bpb, rel_tol=1e-5)
    # a bits-per-token number would be ~bytes/token times larger
    assert direct.bpb < 0.6 * direct.nats / math.log(2) / direct.tokens
    # the training rows' "bytes per patch" is the bytes a token stands for
    assert all(r["bytes_per_patch"] > 1.5 for r in rows if "loss" in r)


def test_train_bpe_resume_repeats_the_uninterrupted_run(bpe_run):
    from safetensors.torch import load_file

    from blt import train_bpe

    work, straight = bpe_run
    out = work / "resumed"
    train_bpe.main(train_bpe_argv(work, out, 3))
    train_bpe.main(train_bpe_argv(work, out, BPE_STEPS, "--resume"))
    a, b = load_file(out / "model" / "token_lm.safetensors"), load_file(straight / "model" / "token_lm.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda o: [r["loss"] for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(out) == losses(straight)


def test_train_bpe_refuses_a_tokenizer_of_other_settings(bpe_run, capsys):
    from blt import train_bpe

    work, straight = bpe_run
    with pytest.raises(SystemExit) as e:
        train_bpe.main(train_bpe_argv(work, straight, BPE_STEPS + 2, "--resume", "--vocab-size", "800"))
    assert e.value.code == 2
    assert "holds a tokenizer trained with" in capsys.readouterr().err.strip().splitlines()[-1]
