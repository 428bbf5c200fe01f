"""Tests for blt.data: sources, byte policy, errors, split, shard cache, batches, eval walk."""

import gzip
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blt import data, sources
from blt.data import (
    Batcher,
    DataConfig,
    DataError,
    build_shard,
    encode_documents,
    check_record,
    entropy_shard,
    is_heldout,
    iter_eval_batches,
    open_shard,
    prepare_data,
)
from blt.sources import DOC_SEPARATOR, HUB_FILES, documents_from_lines, load_documents, resolve_source
from blt.tokens import BOE_ID, BOS_ID, EOS_ID, OFFSET, encode

STORIES = Path(__file__).parent / "fixtures" / "stories.txt"
# Invalid UTF-8, a lone CR, CRLF line ends and a CRLF separator line.
RAW = b"\xff\xfe bad \xc3( ok\r\nline\rtwo\r\n<|endoftext|>\r\n\xe9t\xe9 caf\xc3\xa9\n"
RAW_DOCS = [b"\xff\xfe bad \xc3( ok\r\nline\rtwo", b"\xe9t\xe9 caf\xc3\xa9"]


def stories() -> list[bytes]:
    return list(load_documents(str(STORIES)))


def stream_docs(tokens) -> list[bytes]:
    """Decode a packed stream back into documents, checking the BOS ... EOS framing."""
    t = np.asarray(tokens)
    bos, eos = np.flatnonzero(t == BOS_ID), np.flatnonzero(t == EOS_ID)
    assert len(bos) == len(eos) and bos[0] == 0 and eos[-1] == len(t) - 1
    assert (bos[1:] == eos[:-1] + 1).all()
    return [bytes((t[b + 1 : e] - OFFSET).astype(np.uint8)) for b, e in zip(bos, eos)]


def write_copies(directory: Path, raw: bytes, stem: str = "stories") -> list[Path]:
    """Plain, .gz and .xz copies of `raw`, compressed at test time."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.txt", directory / f"{stem}.txt.gz", directory / f"{stem}.txt.xz"]
    paths[0].write_bytes(raw)
    paths[1].write_bytes(gzip.compress(raw))
    paths[2].write_bytes(lzma.compress(raw))
    return paths


# ----------------------------------------------------------------------------- sources


def test_fixture_documents():
    docs = stories()
    assert len(docs) == 12
    assert docs[0].startswith(b"Once upon a time")
    assert all(DOC_SEPARATOR not in d and d == d.strip(b"\r\n") for d in docs)
    assert b"\n" in docs[1]  # a two-paragraph story stays one document
    assert "café".encode() in docs[2] and "“".encode() in docs[6]


def test_documents_from_lines():
    lines = [b"", b"a", DOC_SEPARATOR, DOC_SEPARATOR, b"  " + DOC_SEPARATOR, b"b\r", DOC_SEPARATOR + b"\r",
             b"", b"c " + DOC_SEPARATOR, DOC_SEPARATOR + b" "]  # fmt: skip
    assert list(documents_from_lines(lines)) == [
        b"a",
        b"  <|endoftext|>\nb",  # only a line that is exactly the separator splits
        b"c <|endoftext|>\n<|endoftext|> ",
    ]


def test_line_splitting_across_read_chunks(monkeypatch):
    expected = stories()
    monkeypatch.setattr(sources, "_READ_CHUNK", 3)
    assert stories() == expected


def test_compressed_dir_and_glob_give_same_docs(tmp_path):
    expected = stories()
    paths = write_copies(tmp_path / "d", STORIES.read_bytes())
    (tmp_path / "d" / "notes.md").write_text("not data")
    for p in paths:
        assert list(load_documents(str(p))) == expected
    assert list(load_documents(str(tmp_path / "d"))) == expected * 3  # sorted: .txt, .txt.gz, .txt.xz
    assert list(load_documents(str(tmp_path / "d" / "*.xz"))) == expected
    assert list(load_documents(str(tmp_path / "**" / "*.gz"))) == expected


def test_bytes_are_kept_verbatim(tmp_path):
    for p in write_copies(tmp_path, RAW, stem="raw"):
        assert list(load_documents(str(p))) == RAW_DOCS
        build_shard(load_documents(str(p)), tmp_path / "raw.bin")
        assert stream_docs(open_shard(tmp_path / "raw.bin")) == RAW_DOCS


@pytest.mark.parametrize("streaming", [False, True])
def test_url_reader_matches_local_reader(tmp_path, streaming):
    """The hub code path (file:// URLs via datasets / fsspec) gives the same docs as local paths."""
    pytest.importorskip("datasets")
    paths = write_copies(tmp_path, STORIES.read_bytes()) + write_copies(tmp_path, RAW, stem="raw")
    for p in paths:
        assert list(load_documents(p.as_uri(), streaming=streaming)) == list(load_documents(str(p)))


def test_local_files_do_not_need_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert len(stories()) == 12
    with pytest.raises(DataError, match=r"TinyStoriesV2-GPT4-train.txt needs the `datasets` package"):
        next(load_documents("tinystories"))


def test_aliases():
    assert resolve_source("tinystories") == resolve_source("train") == [HUB_FILES["train"]]
    assert resolve_source("valid") == resolve_source("tinystories-valid") == [HUB_FILES["valid"]]
    assert HUB_FILES["valid"] == "hf://datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt"


# ------------------------------------------------------------------------------ errors


def test_missing_sources_fail_at_the_call(tmp_path):
    with pytest.raises(DataError, match=r"^no such file or directory: .*nope\.txt$"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"^glob .*\*\.txt matches no files$"):
        load_documents(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"^directory .* has no \.txt/\.txt\.gz/\.txt\.xz files$"):
        load_documents(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"<|endoftext|>\n\n<|endoftext|>\n"])
def test_no_documents(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"^no documents in .*empty\.txt: its files are empty"):
        list(load_documents(str(path)))


@pytest.mark.parametrize(
    "name, content",
    [
        ("bad.txt.xz", lzma.compress(b"x" * 5000)[:-30]),  # truncated
        ("bad.txt.xz", b"\xfd7zXZ\x00" + b"\x00" * 64),  # garbage after the magic bytes
        ("bad.txt.gz", b"not gzip at all"),
    ],
)
def test_corrupt_compressed_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^cannot read .*{name.replace('.', '[.]')}: corrupt or unreadable \("):
        list(load_documents(str(path)))


# ------------------------------------------------------------------------------- split


def test_encode_documents_frames_with_bos_eos():
    docs = [b"hi", b"\xff", "é!".encode()]
    out = encode_documents(docs)
    assert out.dtype == np.uint16
    assert out.tolist() == [i for d in docs for i in encode(d, bos=True, eos=True)]
    assert len(encode_documents([])) == 0


def test_heldout_split_is_deterministic_and_sized():
    docs = [f"story number {i}".encode() for i in range(4000)]
    a = [is_heldout(d, 0.1, seed=0) for d in docs]
    assert a == [is_heldout(d, 0.1, seed=0) for d in docs]
    assert a != [is_heldout(d, 0.1, seed=1) for d in docs]
    assert 0.08 < np.mean(a) < 0.12


def test_split_shards_are_disjoint_and_cover_the_source(tmp_path):
    source = tmp_path / "twice.txt"
    source.write_bytes(STORIES.read_bytes() * 2)  # every story twice: duplicates must not straddle
    ds = prepare_data(DataConfig(str(source), valid_fraction=0.3, split_seed=2, cache_dir=str(tmp_path / "cache")))
    train, valid = stream_docs(ds.train), stream_docs(ds.valid)
    assert train and valid and not set(train) & set(valid)
    assert sorted(train + valid) == sorted(stories() * 2)
    again = prepare_data(DataConfig(str(source), valid_fraction=0.3, split_seed=2, cache_dir=str(tmp_path / "cache2")))
    assert stream_docs(again.valid) == valid


def test_explicit_valid_source(tmp_path):
    other = tmp_path / "valid.txt"
    other.write_bytes(RAW)
    ds = prepare_data(DataConfig(str(STORIES), valid_source=str(other), cache_dir=str(tmp_path)))
    assert stream_docs(ds.train) == stories()
    assert stream_docs(ds.valid) == RAW_DOCS


def test_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"^the held-out split is empty \(12 documents, valid_fraction=1e-09\)"):
        prepare_data(DataConfig(str(STORIES), valid_fraction=1e-9, cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"^valid_fraction must be in \(0, 1\)"):
        prepare_data(DataConfig(str(STORIES), valid_fraction=0.0, cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"^split_seed must be >= 0, got -1$"):
        prepare_data(DataConfig(str(STORIES), split_seed=-1, cache_dir=str(tmp_path)))
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------ shards


def test_shard_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    source = tmp_path / "s.txt"
    shutil.copy(STORIES, source)
    config = DataConfig(str(source), valid_fraction=0.3, split_seed=2, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(config)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    assert set(stamps) == {"train.bin", "valid.bin", "train.bin.json", "valid.bin.json", "meta.json"}

    def no_rebuild(*args):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(data, "_build_shards", no_rebuild)
    second = prepare_data(DataConfig(str(source), valid_fraction=0.3, split_seed=2, cache_dir=config.cache_dir, streaming=True))
    assert second.directory == first.directory
    assert {p.name: p.stat().st_mtime_ns for p in second.directory.iterdir()} == stamps
    assert np.array_equal(second.train, first.train)

    monkeypatch.undo()
    assert prepare_data(DataConfig(str(source), valid_fraction=0.3, split_seed=1, cache_dir=config.cache_dir)).directory != first.directory
    source.write_bytes(STORIES.read_bytes() + b"A new story.\n")
    assert prepare_data(config).directory != first.directory


def test_shard_writes_are_atomic(tmp_path):
    path = tmp_path / "s.bin"
    info = build_shard([b"old"], path)
    assert (info.docs, info.tokens) == (1, 5)

    def failing_docs():
        yield b"new document"
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        build_shard(failing_docs(), path)
    with pytest.raises(DataError, match=r"^no documents to write to .*s\.bin$"):
        build_shard([], path)
    assert stream_docs(open_shard(path)) == [b"old"]  # the old shard is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.bin.json"]  # no temporary files left
    assert check_record(path) is None


def test_large_shard_is_written_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_WRITE_CHUNK", 100)
    build_shard(stories(), tmp_path / "s.bin")
    assert np.array_equal(open_shard(tmp_path / "s.bin"), encode_documents(stories()))


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def counting_tokens():
    """A stream whose values give their own positions, so windows are easy to check."""
    return np.arange(10_000, dtype=np.uint16)


def test_batches_are_contiguous_windows(counting_tokens):
    batch = next(Batcher(counting_tokens, batch_size=5, seq_len=16, seed=0))
    assert batch.shape == (5, 17) and batch.dtype == torch.int64
    assert (batch[:, 1:] - batch[:, :-1] == 1).all()


def test_batches_are_deterministic_and_resumable(counting_tokens):
    a = Batcher(counting_tokens, batch_size=4, seq_len=8, seed=7)
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    rest = [next(a) for _ in range(3)]

    b = Batcher(counting_tokens, batch_size=4, seq_len=8, seed=7)
    assert all(torch.equal(x, next(b)) for x in first)
    resumed = Batcher(counting_tokens, batch_size=4, seq_len=8, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed)) for x in rest)
    assert not torch.equal(first[0], next(Batcher(counting_tokens, batch_size=4, seq_len=8, seed=8)))


def test_ranks_split_the_global_batch(counting_tokens):
    single = Batcher(counting_tokens, batch_size=6, seq_len=8, seed=3)
    ranks = [Batcher(counting_tokens, batch_size=3, seq_len=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(torch.cat([next(r) for r in ranks]), next(single))

    moved = Batcher(counting_tokens, batch_size=2, seq_len=8, seed=0, rank=2, world_size=3)
    moved.load_state_dict(single.state_dict())  # resume a 1-process run on 3 ranks
    assert torch.equal(next(moved), next(single)[4:6])


def test_batcher_errors(counting_tokens):
    with pytest.raises(ValueError, match="cannot resume: saved global_batch_size=4"):
        Batcher(counting_tokens, 2, 8).load_state_dict(Batcher(counting_tokens, 4, 8).state_dict())
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        Batcher(counting_tokens, 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than seq_len"):
        Batcher(counting_tokens[:8], 2, 8)


# -------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("n", [2, 8, 57, 64, 65])
def test_eval_batches_cover_each_target_once(n):
    tokens = np.arange(1, n + 1, dtype=np.uint16)  # nonzero and unique
    batches = list(iter_eval_batches(tokens, batch_size=3, seq_len=8))
    assert all(b.shape[1] == 9 and b.shape[0] <= 3 and b.dtype == torch.int64 for b in batches)
    targets = torch.cat([b[:, 1:] for b in batches]).flatten()
    real = targets[targets != BOE_ID]
    assert real.tolist() == tokens[1:].tolist()
    assert (targets[len(real) :] == BOE_ID).all()  # padding only at the very end

    together = torch.cat([b[:, 1:].flatten() for r in range(2) for b in iter_eval_batches(tokens, 2, 8, rank=r, world_size=2)])
    assert sorted(together[together != BOE_ID].tolist()) == tokens[1:].tolist()


def test_eval_batches_on_a_real_shard(tmp_path):
    build_shard(stories(), tmp_path / "v.bin")
    held_out = open_shard(tmp_path / "v.bin")
    targets = torch.cat([b[:, 1:].flatten() for b in iter_eval_batches(held_out, 4, 32)])
    assert targets[targets != BOE_ID].tolist() == held_out[1:].tolist()
    assert int((targets >= OFFSET).sum()) == sum(map(len, stories()))  # every byte once


def test_entropy_shard_is_built_once_and_atomically(tmp_path, counting_tokens):
    """entropy_shard computes a stream's entropies once into a float16 map, then reuses the file;
    a computation that fails leaves no file behind; a file of another length is recomputed."""
    calls = []

    def compute(tokens, out):
        calls.append(len(tokens))
        out[:] = tokens % 7 / 2

    path = tmp_path / "train.entropies-k.f16"
    first = entropy_shard(counting_tokens, path, compute)
    assert first.dtype == np.float16 and len(first) == len(counting_tokens)
    assert np.array_equal(first, (counting_tokens % 7 / 2).astype(np.float16))
    again = entropy_shard(counting_tokens, path, compute)
    assert calls == [len(counting_tokens)] and np.array_equal(again, first)

    def broken(tokens, out):
        out[:10] = 1.0
        raise KeyboardInterrupt  # an interrupted build

    other = tmp_path / "train.entropies-other.f16"
    with pytest.raises(KeyboardInterrupt):
        entropy_shard(counting_tokens, other, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]
    shorter = entropy_shard(counting_tokens[:-5], path, compute)  # a file for another stream: recomputed
    assert calls[-1] == len(counting_tokens) - 5 and len(shorter) == len(counting_tokens) - 5


def test_batcher_entropies_are_those_of_the_inputs(counting_tokens):
    """With entropies, a batch is (tokens, entropies) and entropies[r, i] belongs to the input
    token tokens[r, i]; the token rows are those of a batcher without entropies."""
    entropies = (counting_tokens % 1024).astype(np.float16)  # exact in float16
    plain = Batcher(counting_tokens, batch_size=3, seq_len=12, seed=5)
    both = Batcher(counting_tokens, batch_size=3, seq_len=12, seed=5, entropies=entropies)
    tokens, H = both.batch_at(4)
    assert torch.equal(tokens, plain.batch_at(4)) and H.shape == (3, 12) and H.dtype == torch.float16
    assert torch.equal(H.long(), tokens[:, :-1] % 1024)
    with pytest.raises(DataError, match="entropies"):
        Batcher(counting_tokens, batch_size=3, seq_len=12, entropies=entropies[:-1])


# ------------------------------------------------------------------- cache verification


def damage(path: Path, how: str) -> None:
    """Truncate a cached file, flip one of its bytes, or delete / garble its checksum record."""
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    elif how == "flipped":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(raw)
    elif how == "no record":
        Path(f"{path}.json").unlink()
    elif how == "bad record":
        Path(f"{path}.json").write_text('{"bytes": "many"')


@pytest.fixture
def split_config(tmp_path) -> DataConfig:
    source = tmp_path / "s.txt"
    shutil.copy(STORIES, source)
    return DataConfig(str(source), valid_fraction=0.3, split_seed=2, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("how", ["truncated", "flipped", "no record", "bad record"])
@pytest.mark.parametrize("shard", ["train.bin", "valid.bin"])
def test_damaged_cached_shard_is_rebuilt(split_config, shard, how, capsys):
    """A cached shard that does not match its record is never used: the shards are rebuilt, with a
    one-line note, and equal a fresh build."""
    first = prepare_data(split_config)
    fresh_train, fresh_valid, directory = np.array(first.train), np.array(first.valid), first.directory
    del first  # reading a map past the end of a truncated file is a bus error
    damage(directory / shard, how)
    capsys.readouterr()
    again = prepare_data(split_config)
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith(f"note: cached shard {again.directory / shard}: ") and note.endswith("rebuilding the shards")
    assert np.array_equal(again.train, fresh_train) and np.array_equal(again.valid, fresh_valid)
    assert check_record(again.directory / "train.bin") is None and check_record(again.directory / "valid.bin") is None
    prepare_data(split_config)
    assert capsys.readouterr().err == ""  # rebuilt once, then trusted


def test_truncated_shard_is_caught_by_its_length(split_config):
    """A truncated shard is still a valid uint16 array, so only its record can tell."""
    ds = prepare_data(split_config)
    directory, full = ds.directory, len(ds.train)
    del ds  # reading a map past the end of a truncated file is a bus error
    damage(directory / "train.bin", "truncated")
    assert check_record(directory / "train.bin").endswith("(truncated?)")
    assert len(prepare_data(split_config).train) == full


def test_interrupted_rebuild_is_never_trusted(split_config, monkeypatch, capsys):
    """A build that dies after a shard is renamed into place but before its record is written, or
    half-way through the source, leaves a cache that the next run rebuilds."""
    fresh = np.array(prepare_data(split_config).train)
    directory = prepare_data(split_config).directory
    damage(directory / "valid.bin", "flipped")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_record", crash)  # dies between a shard's rename and its record
    with pytest.raises(KeyboardInterrupt):
        prepare_data(split_config)
    assert not (directory / "meta.json").exists()
    monkeypatch.undo()

    some = stories()[:3]

    def dying_documents(label, files, streaming):
        yield from some
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "read_documents", dying_documents)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(split_config)
    assert not (directory / "meta.json").exists() and not list(directory.glob("*.tmp"))
    monkeypatch.undo()
    capsys.readouterr()
    assert np.array_equal(prepare_data(split_config).train, fresh)


@pytest.mark.parametrize("how", ["truncated", "flipped", "no record", "bad record"])
def test_damaged_entropy_shard_is_recomputed(tmp_path, counting_tokens, how, capsys):
    def compute(tokens, out):
        out[:] = tokens % 7 / 2

    path = tmp_path / "train.entropies-k.f16"
    fresh = np.array(entropy_shard(counting_tokens, path, compute))
    damage(path, how)
    capsys.readouterr()
    again = entropy_shard(counting_tokens, path, compute)
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith(f"note: cached entropies {path}: ") and note.endswith("recomputing them")
    assert np.array_equal(again, fresh) and check_record(path, 2 * len(counting_tokens)) is None


# ------------------------------------------------------------------- unreachable sources


class ConnectError(Exception):
    """Like httpx's: a transport error that is not an OSError."""


@pytest.mark.parametrize("error", [ConnectError("[Errno -2] Name or service not known"),
                                   ConnectionError("Connection refused\nretrying")])  # fmt: skip
@pytest.mark.parametrize("streaming", [False, True])
def test_unreachable_hub_is_a_one_line_data_error(monkeypatch, error, streaming):
    datasets = pytest.importorskip("datasets")
    fsspec = pytest.importorskip("fsspec")

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets.DownloadManager, "download", unreachable)
    monkeypatch.setattr(fsspec, "open", unreachable)
    with pytest.raises(DataError) as info:
        next(load_documents("valid", streaming=streaming))
    message = str(info.value)
    assert message.startswith(f"could not download TinyStories valid ({HUB_FILES['valid']}): {type(error).__name__}: ")
    assert message.endswith("check the network, or pass local files with --data PATH") and "\n" not in message


def test_train_without_network_is_one_line(tmp_path, monkeypatch, capsys):
    """`blt.train --data valid` offline: `error: could not download ...` and exit code 1, no traceback."""
    datasets = pytest.importorskip("datasets")
    from blt import train

    def unreachable(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets.DownloadManager, "download", unreachable)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", "tiny", "--patch-mode", "byte", "--data", "valid", "--steps", "1", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: could not download TinyStories valid") and line.endswith("--data PATH")
