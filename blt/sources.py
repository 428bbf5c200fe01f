"""Where documents come from: a source name -> its files -> documents as raw bytes.

Sources (`resolve_source`). `tinystories` / `train` and `valid` name the TinyStories
V2-GPT4 train and valid files on the Hugging Face hub; other names are URLs
(`hf://`, `https://`, `file://`), local files, directories or globs of `.txt`, `.txt.gz`
and `.txt.xz` files. In every file, a line that is exactly `<|endoftext|>` ends a
document.

One reader for all of them. Each file is opened as a binary stream, and everything
after that is the same code for the hub and for local files: split into lines, group
lines into documents, encode, shard. Only the opening differs. A URL is downloaded into
the Hugging Face cache with `datasets.DownloadManager`, or with `streaming=True` read as
it arrives through `fsspec`. A local path is opened with `gzip` / `lzma` / `open`. The
tests read `file://` URLs, which go through the hub code, and check that they match the
local path. So local files never need `datasets` (a GPU box without it can still train
on local data), and URLs ask for it only when read.

Why not `datasets.load_dataset("text", sample_by="document")`? It makes one Arrow
string per file, and Arrow strings stop at 2 GiB. TinyStoriesV2-GPT4-train.txt is
bigger than that. The text loader also decodes to `str`: invalid UTF-8 then raises,
and its `encoding=` option is ignored when streaming compressed or remote files.

Byte policy: bytes are bytes. Documents are raw `bytes` from start to finish. Invalid
UTF-8, CR characters and anything else are kept exactly. The only changes are the
CR/LF trimmed from each end of a document. The separator line may end in CRLF. Empty
documents are dropped.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import lzma
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

HUB_FILES = {
    "train": "hf://datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt",
    "valid": "hf://datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt",
}
ALIASES = {
    "tinystories": "train",
    "tinystories-train": "train",
    "train": "train",
    "tinystories-valid": "valid",
    "valid": "valid",
}
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
DOC_SEPARATOR = b"<|endoftext|>"

_READ_CHUNK = 1 << 20  # bytes read per call when splitting a file into lines
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CORRUPT_ERRORS = (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)  # the bytes arrived, but are wrong


class DataError(ValueError):
    """Bad data source: missing file, no documents, corrupt file, impossible split."""



def resolve_source(name: str) -> list[str]:
    """Turn a source name into the list of data files it stands for.

    Checked in this order:
    * an alias: `tinystories`, `tinystories-train` or `train` means the TinyStories
      V2-GPT4 train file on the hub; `tinystories-valid` or `valid` means its valid file.
      Aliases come before local paths, so write `./train` for a local file called `train`;
    * a URL (`hf://`, `https://`, `file://`, ...): returned as is;
    * a directory: its `.txt`, `.txt.gz` and `.txt.xz` files (not recursive), sorted;
    * a path with glob characters (`*?[`, `**` recursive): the files it matches, sorted;
    * a file: that file.
    Local paths are returned absolute. Raises DataError when nothing matches.
    """
    if name in ALIASES:
        return [HUB_FILES[ALIASES[name]]]
    if URL.match(name):
        return [name]
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"directory {name} has no {'/'.join(TEXT_SUFFIXES)} files")
    elif any(c in name for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"glob {name} matches no files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"no such file or directory: {name}")
    return [str(p.resolve()) for p in files]


def load_documents(source: str, streaming: bool = False) -> Iterator[bytes]:
    """Yield the documents of a source (see `resolve_source`) as raw bytes, in file order.

    The name is resolved right away, so a missing file fails at the call. The file
    contents are read lazily. `streaming` only matters for URLs: True reads them while
    they download and caches nothing; False first downloads them into the Hugging Face
    cache.
    """
    return read_documents(source, resolve_source(source), streaming)


def read_documents(label: str, files: list[str], streaming: bool) -> Iterator[bytes]:
    count = 0
    for file in files:
        for doc in _file_documents(file, streaming):
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"no documents in {label}: its files are empty or hold only separators")


def _file_documents(file: str, streaming: bool) -> Iterator[bytes]:
    """One file's documents. Each file is split on its own: a document never spans two.

    A URL that cannot be fetched is a one-line DataError whatever the transport raised
    (httpx, requests and the hub client have exception types of their own, not all OSError).
    """
    try:
        with _open_binary(file, streaming) as f:
            yield from documents_from_lines(_iter_lines(f))
    except DataError:
        raise
    except Exception as e:
        corrupt = isinstance(e, _CORRUPT_ERRORS)
        if URL.match(file) and not corrupt:
            raise DataError(f"could not download {_source_name(file)}: {_one_line(e)}; "
                            "check the network, or pass local files with --data PATH") from e
        if corrupt or isinstance(e, OSError):
            raise DataError(f"cannot read {file}: corrupt or unreadable ({_one_line(e)})") from e
        raise


def _source_name(file: str) -> str:
    hub = {url: name for name, url in HUB_FILES.items()}
    return f"TinyStories {hub[file]} ({file})" if file in hub else file


def _one_line(e: BaseException) -> str:
    """An exception as `Type: message` on one line, at most 300 characters."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= 300 else text[:297] + "..."


def _open_binary(file: str, streaming: bool):
    """Open a data file for reading bytes, decompressing by suffix; usable with `with`."""
    if not URL.match(file):
        return _open_local(file, file)
    if streaming:
        fsspec = _require("fsspec", file)
        return fsspec.open(file, "rb", compression="infer")
    datasets = _require("datasets", file)
    return _open_local(datasets.DownloadManager().download(file), file)


def _open_local(path: str, name: str):
    """Open a local file; `name` (the original path or URL) decides the decompression."""
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _require(module: str, file: str):
    """Import an optional dependency, needed only to read URLs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {file} needs the `{module}` package (local files do not)") from None


def _iter_lines(f) -> Iterator[bytes]:
    """Yield the lines of a binary stream, without their LF, reading in large chunks.

    A line that spans chunks is collected as pieces and joined once, so a very long
    line takes linear time, not quadratic.
    """
    partial: list[bytes] = []
    while chunk := f.read(_READ_CHUNK):
        *lines, last = chunk.split(b"\n")
        if lines:
            lines[0] = b"".join(partial) + lines[0]
            partial = []
            yield from lines
        partial.append(last)
    tail = b"".join(partial)
    if tail:
        yield tail


def documents_from_lines(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Group lines (without their LF) into documents.

    A line that is exactly `<|endoftext|>` ends a document (`<|endoftext|>` plus CR is
    accepted too, for CRLF files). Each document is trimmed of CR/LF at both ends, and
    empty ones are dropped. All other bytes are kept as they are.
    """
    current: list[bytes] = []
    for line in lines:
        if line == DOC_SEPARATOR or line == DOC_SEPARATOR + b"\r":
            yield from _finish(current)
            current = []
        else:
            current.append(line)
    yield from _finish(current)


def _finish(lines: list[bytes]) -> Iterator[bytes]:
    doc = b"\n".join(lines).strip(b"\r\n")
    if doc:
        yield doc
