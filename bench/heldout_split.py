"""Cut text sources into documents and hold a slice out by a keyed hash: the held-out English
slice of bench/patch_scaling.py.

    python bench/heldout_split.py --data data/english/brown_untagged.txt.xz data/english/kjv_bible.txt.xz ... \\
        --fraction 0.02 --out data/mix-split --add data/tinystories/train.txt.xz

Why cut first. A book-length file with no `<|endoftext|>` line is one document to blt.data, so
its document-level split (blt.data.is_heldout, blt.train's --valid-fraction) could only hold
out whole books. Here each document of each --data source is cut into chunks of about
--chunk-bytes, at a paragraph break (a blank line) once the chunk is that long, or at a line
end once it is twice that long (text without blank lines, such as one verse per line). A chunk is
held out when blt.data.is_heldout puts it below --fraction: a BLAKE2b hash of its bytes keyed by
--seed, so the split is deterministic, needs one pass, and puts identical chunks on the same
side. Chunks are the documents blt.data reads back: each is stripped of CR/LF at both ends as
blt.data strips a document, and written with `<|endoftext|>` lines between them.

Output, all in --out:

    train/<file>.txt    the kept chunks of each --data file, one output file per input file
    train/<added file>  each --add file, copied unchanged (e.g. TinyStories training text)
    heldout.txt         the held-out chunks of every --data file, in input order
    split.json          the settings, each input's size and modification time, and the counts

so `--data OUT/train` (blt.data reads a folder's .txt, .txt.gz and .txt.xz files) is the training
mix without the slice, and `--extra-valid OUT/heldout.txt` (or `--valid-data`) is the slice.
Run again with the same inputs and settings, it leaves every file as it is (their modification
times key blt.data's shard cache); with others, it stops with a one-line error instead of
changing a split that runs were trained on. split.json is written last: a split cut short
is redone.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blt.data import DOC_SEPARATOR, DataError, is_heldout, load_documents, resolve_source  # noqa: E402

RECORD = "split.json"
HELDOUT = "heldout.txt"


def chunks(doc: bytes, size: int):
    """Cut a document into pieces of about `size` bytes (module docstring), each stripped of CR/LF
    at both ends; empty pieces are dropped."""
    lines, length = [], 0
    for line in doc.split(b"\n"):
        if length >= size and (not line.strip() or length >= 2 * size):
            if piece := b"\n".join(lines).strip(b"\r\n"):
                yield piece
            lines, length = [], 0
        lines.append(line)
        length += len(line) + 1
    if piece := b"\n".join(lines).strip(b"\r\n"):
        yield piece


def write_documents(path: Path, docs: list[bytes]) -> None:
    """Write documents as blt.data reads them (a `<|endoftext|>` line after each), atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for doc in docs:
            f.write(doc + b"\n" + DOC_SEPARATOR + b"\n")
    os.replace(tmp, path)


def output_name(file: str) -> str:
    """brown.txt.xz -> brown.txt: the kept chunks are written uncompressed."""
    name = Path(file).name
    for suffix in (".gz", ".xz"):
        name = name.removesuffix(suffix)
    return name


def fingerprint(file: str) -> list:
    stat = os.stat(file)
    return [file, stat.st_size, stat.st_mtime_ns]


def split(sources: list[str], out: Path, fraction: float, chunk_bytes: int, seed: int, add: list[str]) -> dict:
    """Write the split into `out` (module docstring), or leave an identical one in place; -> the record."""
    files = [f for source in sources for f in resolve_source(source)]
    added = [f for source in add for f in resolve_source(source)]
    names = [output_name(f) for f in files] + [Path(f).name for f in added]
    if len(set(names)) < len(names) or HELDOUT in names:
        raise DataError(f"two inputs would share a file name in {out / 'train'}: {sorted(names)}")
    settings = {"fraction": fraction, "chunk_bytes": chunk_bytes, "seed": seed,
                "data": [fingerprint(f) for f in files], "add": [fingerprint(f) for f in added]}  # fmt: skip
    path = out / RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        if old["settings"] == settings:
            print(f"split in {out} is up to date", flush=True)
            return old
        raise DataError(f"{out} holds a split made with other inputs or settings ({path}); delete {out} or choose "
                        f"another --out")  # fmt: skip
    (out / "train").mkdir(parents=True, exist_ok=True)
    held, counts = [], {}
    for file in files:
        kept = []
        for doc in load_documents(file):
            for piece in chunks(doc, chunk_bytes):
                (held if is_heldout(piece, fraction, seed) else kept).append(piece)
        counts[file] = {"train_chunks": len(kept), "train_bytes": sum(map(len, kept))}
        if kept:
            write_documents(out / "train" / output_name(file), kept)
        print(f"{file}: {len(kept)} chunks kept", flush=True)
    if not held:
        raise DataError(f"no chunk was held out (fraction {fraction}): raise --fraction or lower --chunk-bytes")
    write_documents(out / HELDOUT, held)
    for file in added:
        shutil.copyfile(file, out / "train" / Path(file).name)
    record = {"settings": settings, "sources": counts, "heldout_chunks": len(held), "heldout_bytes": sum(map(len, held))}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"held out {len(held)} chunks, {record['heldout_bytes']} bytes, in {out / HELDOUT}; training mix in "
          f"{out / 'train'}", flush=True)  # fmt: skip
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench/heldout_split.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="sources to cut and split (files, folders, globs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fraction", type=float, default=0.02, help="share of the chunks held out")
    p.add_argument("--chunk-bytes", type=int, default=8192, help="about this many bytes per chunk")
    p.add_argument("--seed", type=int, default=0, help="key of the hash that decides the split")
    p.add_argument("--add", nargs="*", default=[], help="sources copied unchanged into OUT/train")
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error("--fraction must be in (0, 1)")
    if args.chunk_bytes < 1 or args.seed < 0:
        p.error("--chunk-bytes must be >= 1 and --seed >= 0")
    try:
        split(args.data, Path(args.out), args.fraction, args.chunk_bytes, args.seed, args.add)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
