"""blt.robustness: each noise type against its definition (paper §6.1), and the CLI on tiny models."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blt import eval as blt_eval
from blt import robustness as R
from blt.checkpoint import save_entropy_model, save_model
from blt.config import EntropyModelConfig
from blt.entropy_model import EntropyModel
from blt.tests.test_generate import make_model

REPO = Path(__file__).resolve().parents[2]
UNIQUE = "".join(chr(0x4E00 + i) for i in range(500))  # 500 distinct characters: every position is traceable
LETTERS = "".join(random.Random(1).choice("abcdefghijKLMNOPQRST") for _ in range(1000))


def runs(text: str) -> list[tuple[str, int]]:
    """Maximal runs of one character: 'aab' -> [('a', 2), ('b', 1)]."""
    return [(m.group()[0], len(m.group())) for m in re.finditer(r"(.)\1*", text, re.S)]


# ---- noise functions -----------------------------------------------------------------------------


def test_upper_case():
    assert R.upper_case("Once upon a time, 3 cats.") == "ONCE UPON A TIME, 3 CATS."
    assert R.upper_case("déjà vu, straße") == "DÉJÀ VU, STRASSE"  # Unicode upper case, which can lengthen


def test_ant_speak_format():
    assert R.ant_speak("Hi yo!") == "H I   Y O !"  # an original space is a character: three spaces
    assert R.ant_speak("a\nb") == "A \n B"
    assert R.ant_speak("x") == "X" and R.ant_speak("") == ""
    out = R.ant_speak(LETTERS)
    assert len(out) == 2 * len(LETTERS) - 1 and out[1::2] == " " * (len(LETTERS) - 1) and out[::2] == LETTERS.upper()


def test_drop_removes_exactly_the_fraction():
    out = R.drop(UNIQUE, random.Random(0))
    assert len(out) == 450  # round(0.1 * 500) removed
    assert set(out) < set(UNIQUE) and sorted(out, key=UNIQUE.index) == list(out)  # the rest, in order
    assert R.drop(UNIQUE, random.Random(0)) == out != R.drop(UNIQUE, random.Random(1))
    assert len(R.drop("abcdefghijklmnopqrst", random.Random(0), fraction=0.25)) == 15
    assert R.drop("abc", random.Random(0), fraction=0.0) == "abc"
    # positions are uniform: over many seeds every position is dropped about 10% of the time
    counts = [0] * 20
    for seed in range(2000):
        kept = set(R.drop(UNIQUE[:20], random.Random(seed)))
        for i, c in enumerate(UNIQUE[:20]):
            counts[i] += c not in kept
    assert all(120 < c < 290 for c in counts), counts  # 2000 · 2/20 = 200 expected


def test_random_case_half_upper():
    out = R.random_case(LETTERS, random.Random(0))
    assert out.lower() == LETTERS.lower()
    assert sum(c.isupper() for c in out) == 500 and sum(c.islower() for c in out) == 500
    assert R.random_case(LETTERS, random.Random(0)) == out != R.random_case(LETTERS, random.Random(1))
    assert R.random_case("a1 b2, c3!", random.Random(0), fraction=1.0) == "A1 B2, C3!"  # non-letters unchanged
    assert R.random_case("ABC", random.Random(0), fraction=0.0) == "abc"


def test_repeat_twenty_percent_up_to_four_times():
    out = R.repeat(UNIQUE, random.Random(0))
    r = runs(out)
    assert [c for c, _ in r] == list(UNIQUE)  # every character kept, in order
    extra = [n - 1 for _, n in r if n > 1]
    assert len(extra) == 100  # round(0.2 * 500) characters repeated
    assert set(extra) == {1, 2, 3, 4}  # 1 to 4 extra copies each, all of them used
    assert R.repeat(UNIQUE, random.Random(0)) == out != R.repeat(UNIQUE, random.Random(1))
    assert max(n for _, n in runs(R.repeat(UNIQUE, random.Random(2), max_repeats=2))) == 3
    assert R.repeat("abc", random.Random(0), fraction=1.0, max_repeats=1) == "aabbcc"


def test_noise_document_bytes():
    doc = "Tom had a red ball. ".encode() + b"\xff\xfe" + "café".encode()  # invalid UTF-8 kept as is
    assert R.noise_document(doc, "UpperCase", 0, 0) == b"TOM HAD A RED BALL. \xff\xfeCAF\xc3\x89"
    assert R.noise_document(doc, "AntSpeak", 0, 0).startswith(b"T O M   H A D")
    assert R.noise_document(doc, "Drop", 0, 0, fraction=0.0) == doc
    for name in ("Drop", "RandomCase", "Repeat"):
        a = R.noise_document(doc * 10, name, 3, 7)
        assert a == R.noise_document(doc * 10, name, 3, 7)  # deterministic in (seed, index)
        assert a != R.noise_document(doc * 10, name, 3, 8) and a != R.noise_document(doc * 10, name, 4, 7)
        assert b"\xff\xfe" in a or name == "Drop"


def test_take_bytes():
    assert R.take_bytes(iter([b"abc", b"defg", b"hi"]), 5) == [b"abc", b"de"]
    assert R.take_bytes(iter([b"abc", b"defg"]), 100) == [b"abc", b"defg"]
    assert R.take_bytes(iter([b"abc", b"defg"]), 3) == [b"abc"]


# ---- CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = "the a cat dog sun ran saw big little happy tree park ball and then".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))).capitalize() + "." for _ in range(8)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def blt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blt") / "model"
    save_model(make_model("tiny", "entropy"), path)
    return path


ROW = re.compile(r"^(\w+)\s+(\d+\.\d{4})\s+(\d+\.\d{4})\s+([+-]\d+\.\d{4})\s+(\d+)\s+(\d+)$")


def table(out: str) -> dict[str, tuple]:
    rows = [ROW.match(line) for line in out.splitlines()]
    return {m[1]: (float(m[2]), float(m[3]), float(m[4]), int(m[5]), int(m[6])) for m in rows if m}


def eval_bpb(capsys, checkpoint, data) -> float:
    blt_eval.main(["--checkpoint", str(checkpoint), "--data", str(data), "--seq-len", "64", "--batch-size", "3",
                   "--device", "cpu"])  # fmt: skip
    return float(re.search(r"bpb=(\S+)", capsys.readouterr().out)[1])


def test_cli_table_and_clean_matches_eval(capsys, blt_dir, text_file):
    docs = list(R.load_documents(str(text_file)))
    R.main(["--checkpoint", str(blt_dir), "--data", str(text_file), "--seq-len", "64", "--batch-size", "3",
            "--device", "cpu", "--max-bytes", "100000"])  # fmt: skip
    out = capsys.readouterr().out
    assert "noised bytes" in out  # the header says what a noised BPB measures
    rows = table(out)
    assert list(rows) == list(R.NOISES)
    reference = eval_bpb(capsys, blt_dir, text_file)
    assert len(docs) == 8
    clean_bytes = sum(map(len, docs)) + 2 * 8 - 1  # every byte, EOS and BOS is a target but the first BOS
    for name, (clean, noised, diff, b_clean, b_noised) in rows.items():
        assert clean == round(reference, 4)
        assert diff == pytest.approx(noised - clean, abs=2e-4)
        assert b_clean == clean_bytes
    assert rows["UpperCase"][4] == rows["RandomCase"][4] == clean_bytes  # case changes keep ASCII lengths
    assert rows["Drop"][4] < clean_bytes < rows["Repeat"][4] < rows["AntSpeak"][4]
    # the helper the table uses is blt.eval's number exactly
    assert R.take_bytes(iter(docs), 100_000) == docs
    assert R.bpb(blt_eval.load_any(blt_dir, "cpu"), docs, 3, 64, torch.device("cpu"))[0] == reference


def test_cli_byte_lm_subset_and_cap(capsys, tmp_path, text_file):
    torch.manual_seed(0)
    save_entropy_model(EntropyModel(EntropyModelConfig(dim=32, n_layers=1, n_heads=2, window=32)), tmp_path / "lm")
    R.main(["--checkpoint", str(tmp_path / "lm"), "--data", str(text_file), "--noise", "uppercase,Drop",
            "--max-bytes", "150", "--device", "cpu", "--seq-len", "64"])  # fmt: skip
    out = capsys.readouterr().out
    rows = table(out)
    assert list(rows) == ["UpperCase", "Drop"]
    assert "150 bytes" in out.splitlines()[0]
    docs = R.take_bytes(R.load_documents(str(text_file)), 150)
    assert sum(map(len, docs)) == 150 and rows["UpperCase"][3] == 150 + 2 * len(docs) - 1


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "blt.robustness", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_errors(tmp_path, text_file):
    r = run_cli("--checkpoint", tmp_path / "missing", "--data", text_file)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and r.stdout == "" and len(lines) == 1 and lines[0].startswith("error: ")
    assert "missing" in lines[0]
    r = run_cli("--checkpoint", tmp_path, "--data", text_file, "--noise", "UpperCase,Shout")
    assert r.returncode == 2 and "unknown noise Shout" in r.stderr and "AntSpeak" in r.stderr
    r = run_cli("--checkpoint", tmp_path, "--data", text_file, "--drop-fraction", "1.5")
    assert r.returncode == 2 and "not in [0, 1]" in r.stderr


def test_cli_bpe_token_lm_folder(capsys, tmp_path, text_file):
    """A BPE baseline's folder (blt.train_bpe's layout): scored by blt.bpe.bpe_bits_per_byte over the
    bytes blt.eval counts, in windows of the token count its heldout.json records."""
    pytest.importorskip("tokenizers")
    from blt.bpe import BPETokenizer, TokenLM, bpe_bits_per_byte, save_token_lm

    docs = list(R.load_documents(str(text_file)))
    tokenizer = BPETokenizer.train(docs, 300)
    torch.manual_seed(0)
    model = TokenLM(EntropyModelConfig(dim=32, n_layers=1, n_heads=2, window=16), tokenizer.vocab_size)
    save_token_lm(model, tokenizer, tmp_path / "bpe", extra_json={"heldout.json": {"seq_len": 16}})
    R.main(["--checkpoint", str(tmp_path / "bpe"), "--data", str(text_file), "--device", "cpu", "--batch-size", "3"])
    rows = table(capsys.readouterr().out)
    assert list(rows) == list(R.NOISES)
    clean = bpe_bits_per_byte(model.eval(), tokenizer, docs, seq_len=16, batch_size=3)
    clean_bytes = sum(map(len, docs)) + 2 * len(docs) - 1
    for _, (bpb_clean, _, _, b_clean, _) in rows.items():
        assert bpb_clean == round(clean.bpb, 4) and b_clean == clean_bytes == clean.bytes
    assert rows["Drop"][4] < clean_bytes < rows["AntSpeak"][4]
    # windows of the 16 tokens it records, not of --seq-len (bytes)
    assert R.Scorer(tmp_path / "bpe", torch.device("cpu"), 3, 2048).seq_len == 16
