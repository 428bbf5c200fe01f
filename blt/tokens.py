"""Bytes as token ids (paper §2: BLT has no tokenizer, only bytes).

Token id = byte value + 4. The four ids below 4 are special, as in the official code:
BOE=0 (beginning of example; also the padding id, ignored by the loss), BOS=1, EOS=2,
and 3, which the official code reserves for BPE delimiters and BLT never emits.
"""

import codecs

BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET  # 260


def encode(data: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
    """Text (UTF-8) or raw bytes -> token ids, optionally framed by BOS/EOS."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    ids = [b + OFFSET for b in raw]
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def ids_to_bytes(ids) -> bytes:
    """Token ids -> raw bytes; special ids are dropped."""
    return bytes(int(i) - OFFSET for i in ids if OFFSET <= int(i) < VOCAB_SIZE)


def decode(ids) -> str:
    """Token ids -> text. Specials are dropped; invalid or split UTF-8 becomes U+FFFD."""
    return ids_to_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental UTF-8 decoding for streamed generation.

    A multi-byte character split across steps is held back until it is complete, so a
    stream never prints half a character; truly invalid bytes become U+FFFD.
    """

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids) -> str:
        return self._dec.decode(ids_to_bytes(ids), final=False)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
