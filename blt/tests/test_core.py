"""Property tests of the BLT building blocks against references written straight from the
documented definitions (docstrings of patcher.py, masks.py, ngram_hash.py, tokens.py)."""

import importlib.util
import json
import math
import random
import re
import time

import pytest
import torch

import blt.layers as layers
import blt.masks as M
from blt import patcher as PT
from blt.config import PATCH_MODES, PRESETS, BLTConfig, ConfigError, PatcherConfig, load_json, preset, tiny
from blt.entropy_model import EntropyModel
from blt.layers import Rotary, apply_rotary, attend
from blt.model import BLT, LN2
from blt.ngram_hash import PRIMES, HashNgramEmbedding, ngram_hash
from blt.tokens import BOE_ID, BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE, StreamDecoder, decode, encode, ids_to_bytes

# ---- helpers ---------------------------------------------------------------------------------


def text_tokens(batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """BOS + text-like bytes (letters, spaces, punctuation, digits, arbitrary bytes)."""
    u = torch.rand(batch, T, generator=gen)
    letters = torch.randint(97, 123, (batch, T), generator=gen)
    digits = torch.randint(48, 58, (batch, T), generator=gen)
    punct = torch.tensor(list(b".,;!?-'\n\t"))[torch.randint(0, 9, (batch, T), generator=gen)]
    anyb = torch.randint(0, 256, (batch, T), generator=gen)
    b = torch.where(u < 0.82, digits, torch.where(u < 0.92, punct, anyb))
    b = torch.where(u < 0.6, letters, torch.where(u < 0.75, torch.full_like(letters, 32), b))
    tokens = b + OFFSET
    if T:
        tokens[:, 0] = BOS_ID
    return tokens


class StubEntropyModel:
    """A causal, exactly row-independent stand-in: H[t] depends on tokens t-1 and t only (on t
    alone where t opens a document, with doc_mask)."""

    def entropies(self, tokens, doc_mask=False):
        prev = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        if doc_mask:
            prev = torch.where(prev == EOS_ID, 0, prev)
        return ((tokens * 7919 + prev * 104729) % 1009).float() / 1009 * 6.0


def tiny_model(mode="static", seed=0, calibrate_on=None, **patcher):
    torch.manual_seed(seed)
    cfg = tiny()
    cfg.patcher.mode = mode
    for k, v in patcher.items():
        setattr(cfg.patcher, k, v)
    em = EntropyModel(cfg.entropy_model)
    if cfg.patcher.needs_entropy and calibrate_on is not None:
        cfg.patcher.threshold, _ = PT.calibrate_threshold(em.entropies(calibrate_on), calibrate_on, cfg.patcher, 3.0)
    return BLT(cfg, em)


# ---- model output shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "static", "space", "byte"])
def test_output_shapes(mode):
    gen = torch.Generator().manual_seed(0)
    tokens = text_tokens(3, 41, gen)
    model = tiny_model(mode, calibrate_on=tokens)
    targets = torch.cat([tokens[:, 1:], torch.full((3, 1), EOS_ID)], dim=1)
    out = model(tokens, targets)
    assert out.logits.shape == (3, 41, VOCAB_SIZE) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert math.isclose(out.bpb, out.loss.item() / LN2)
    assert torch.equal(out.patching.patch_lengths.sum(1), torch.full((3,), 41))
    assert out.patching.next_starts_patch.shape == (3,)
    assert model(tokens).loss is None
    # BOE targets are ignored by the loss.
    t2 = targets.clone()
    t2[:, 20:] = BOE_ID
    ce = torch.nn.functional.cross_entropy(out.logits[:, :20].reshape(-1, VOCAB_SIZE), targets[:, :20].reshape(-1))
    assert torch.allclose(model(tokens, t2).loss, ce, atol=1e-5)


# ---- patcher ---------------------------------------------------------------------------------


def _is_space_like(token: int) -> bool:
    b = token - OFFSET
    word = (0 <= b < 128 and chr(b).isalnum()) or b >= 128
    return not word


def reference_starts(tokens: list[int], H: list[float] | None, cfg: PatcherConfig) -> list[bool]:
    """patcher.py's rules, one position at a time (p = T: the next byte)."""
    T = len(tokens)
    starts = []
    for p in range(T + 1):
        if p < 2 or cfg.mode == "byte":
            s = True
        elif cfg.mode == "static":
            s = (p - 1) % cfg.patch_size == 0
        elif cfg.mode == "space":
            s = _is_space_like(tokens[p - 1]) and not _is_space_like(tokens[p - 2])
        elif cfg.mode == "entropy":
            s = H[p - 1] > cfg.threshold
        elif cfg.mode == "monotonic":
            s = H[p - 1] - H[p - 2] > cfg.threshold
        else:
            s = H[p - 1] > cfg.threshold and H[p - 1] - H[p - 2] > cfg.threshold_add
        starts.append(s)
    if cfg.max_patch_length is not None:
        last = 0
        for p in range(T + 1):
            if starts[p]:
                last = p
            elif p - last == cfg.max_patch_length:
                starts[p], last = True, p
    return starts


def lengths_of(starts: list[bool], T: int) -> list[int]:
    pos = [p for p in range(T) if starts[p]] + [T]
    return [b - a for a, b in zip(pos, pos[1:])]


def random_patcher_config(rng: random.Random, H: torch.Tensor) -> PatcherConfig:
    mode = rng.choice(PATCH_MODES)
    q = torch.quantile(H.flatten(), rng.uniform(0.3, 0.9)).item() if H.numel() else 0.0
    dq = rng.uniform(-0.5, 2.0)
    return PatcherConfig(
        mode=mode,
        threshold=dq if mode == "monotonic" else q,
        threshold_add=rng.uniform(-1.0, 1.0),
        patch_size=rng.randint(1, 7),
        max_patch_length=rng.choice([None, None, 1, 2, 3, 5, 8]),
    )


@pytest.mark.parametrize("seed", range(6))
def test_patcher_properties(seed):
    rng = random.Random(seed)
    stub = StubEntropyModel()
    for case in range(40):
        Bn, T = rng.randint(1, 4), rng.choice([1, 2, 3, rng.randint(4, 90)])
        tokens = text_tokens(Bn, T, torch.Generator().manual_seed(seed * 1000 + case))
        H = stub.entropies(tokens)
        cfg = random_patcher_config(rng, H)
        where = f"seed {seed} case {case} T={T} cfg={cfg}"
        p = PT.patch(tokens, cfg, stub)
        pl = p.patch_lengths
        assert pl.dtype == torch.long and pl.shape[0] == Bn
        assert torch.equal(pl.sum(1), torch.full((Bn,), T)), where
        starts = PT.patch_starts(tokens, cfg, H)
        # the same patches read lazily from the starts (train --one-graph): the mean length from
        # the starts alone, before any length is computed
        lazy = PT.StartsPatching(starts, pl.shape[1])
        assert torch.equal(lazy.mean_patch_length(), p.mean_patch_length()) and lazy._lengths is None, where
        assert torch.equal(lazy.patch_lengths, pl) and torch.equal(lazy.next_starts_patch, p.next_starts_patch), where
        assert torch.equal(lazy.padded(8).patch_lengths, p.padded(8).patch_lengths), where
        for b in range(Bn):
            row = pl[b].tolist()
            n = sum(1 for x in row if x > 0)
            assert all(x > 0 for x in row[:n]) and all(x == 0 for x in row[n:]), f"{where}: bad padding {row}"
            assert row[0] == 1, f"{where}: BOS is not a patch of its own {row}"
            if cfg.max_patch_length is not None:
                assert max(row) <= cfg.max_patch_length, where
            ref = reference_starts(tokens[b].tolist(), H[b].tolist(), cfg)
            assert starts[b].tolist() == ref, where
            assert row[:n] == lengths_of(ref, T), where
            assert bool(p.next_starts_patch[b]) == ref[T], where
            # Batched patching == each row alone.
            alone = PT.patch(tokens[b : b + 1], cfg, stub)
            assert alone.patch_lengths[0].tolist()[: n] == row[:n] and alone.patch_lengths.shape[1] == n, where
            assert bool(alone.next_starts_patch[0]) == bool(p.next_starts_patch[b]), where
        if cfg.needs_entropy:
            assert torch.equal(p.entropies, H)
        # Causality: bytes >= q change -> starts at every p <= q unchanged.
        if T > 1:
            q = rng.randint(1, T - 1)
            t2 = tokens.clone()
            t2[:, q:] = text_tokens(Bn, T, torch.Generator().manual_seed(7 + case))[:, q:]
            t2[:, q] = OFFSET + (tokens[:, q] - OFFSET + 1) % 256
            s2 = PT.patch_starts(t2, cfg, stub.entropies(t2))
            assert torch.equal(s2[:, : q + 1], starts[:, : q + 1]), where


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "combined"])
def test_patch_starts_causal_with_entropy_model(mode, deterministic):
    """With the real (random) entropy model: changing bytes >= q leaves starts[:, :q+1] bitwise."""
    torch.manual_seed(3)
    cfg = tiny()
    em = EntropyModel(cfg.entropy_model)
    tokens = text_tokens(2, 200, torch.Generator().manual_seed(3))
    pc = PatcherConfig(mode=mode, max_patch_length=6)
    pc.threshold, _ = PT.calibrate_threshold(em.entropies(tokens), tokens, pc, 3.0)
    base = PT.patch_starts(tokens, pc, em.entropies(tokens))
    assert 10 < int(base.sum()) < 190  # mixed sizes
    for q in (1, 2, 17, 64, 65, 130, 199):
        t2 = tokens.clone()
        t2[:, q:] = text_tokens(2, 200, torch.Generator().manual_seed(q))[:, q:]
        t2[:, q] = OFFSET + (tokens[:, q] - OFFSET + 7) % 256
        s2 = PT.patch_starts(t2, pc, em.entropies(t2))
        assert torch.equal(s2[:, : q + 1], base[:, : q + 1]), f"q={q}"


def test_patch_without_entropy_model_errors():
    tokens = text_tokens(1, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="entropy model"):
        PT.patch(tokens, PatcherConfig(mode="entropy"))
    with pytest.raises(ValueError, match="entropies"):
        PT.patch_starts(tokens, PatcherConfig(mode="monotonic"))


@pytest.mark.parametrize(
    ("T", "patch_size", "max_len", "lengths", "next_starts"),
    [
        (10, 4, None, [1, 4, 4, 1], False),
        (9, 4, None, [1, 4, 4], True),
        (1, 4, None, [1], True),
        (2, 3, None, [1, 1], False),
        (13, 5, 2, [1, 2, 2, 1, 2, 2, 1, 2], True),  # 5-byte patches cut into 2+2+1
        (8, 1, None, [1] * 8, True),
    ],
)
def test_static_patching(T, patch_size, max_len, lengths, next_starts):
    tokens = text_tokens(2, T, torch.Generator().manual_seed(T))
    p = PT.patch(tokens, PatcherConfig(mode="static", patch_size=patch_size, max_patch_length=max_len))
    assert p.patch_lengths.tolist() == [lengths, lengths]
    assert p.next_starts_patch.tolist() == [next_starts, next_starts]


def test_lengths_from_starts_counts_each_run():
    """Patch lengths are the runs between starts, row by row, zero-padded to the largest count
    (or to num_patches when given)."""
    gen = torch.Generator().manual_seed(11)
    for B, T, p in [(1, 1, 0.5), (3, 17, 0.3), (4, 40, 0.9), (2, 33, 0.05)]:
        starts = torch.rand(B, T, generator=gen) < p
        starts[:, 0] = True
        rows = []
        for row in starts.tolist():
            at = [i for i, s in enumerate(row) if s] + [T]
            rows.append([b - a for a, b in zip(at, at[1:])])
        P = max(len(r) for r in rows)
        for extra in (0, 5):
            want = [r + [0] * (P + extra - len(r)) for r in rows]
            assert PT.lengths_from_starts(starts, P + extra).tolist() == want
        assert PT.lengths_from_starts(starts).tolist() == [r + [0] * (P - len(r)) for r in rows]


def _space_patches(text: str, max_len=None):
    tokens = torch.tensor([encode(text)])
    p = PT.patch(tokens, PatcherConfig(mode="space", max_patch_length=max_len))
    out, i = [], 0
    for n in p.patch_lengths[0].tolist():
        out.append(ids_to_bytes(tokens[0, i : i + n].tolist()) if i else "BOS")
        i += n
    return out, bool(p.next_starts_patch[0])


def test_space_patching_by_hand():
    # Rule: byte p opens a patch iff byte p-1 is space-like and byte p-2 is not, i.e. a word
    # patch ends with the first space-like byte after it; further space-like bytes lead the
    # next patch. Letters, digits and non-ASCII bytes are word bytes; BOS is its own patch.
    assert _space_patches("Hi, you  there!") == (["BOS", b"Hi,", b" you ", b" there!"], True)
    assert _space_patches("The caf\u00e9 costs 3\u20ac!\n") == (
        ["BOS", b"The ", "café ".encode(), b"costs ", "3€!".encode(), b"\n"],
        False,
    )
    assert _space_patches(" lead  (x)") == (["BOS", b" lead ", b" (x)"], True)  # ")" after "x" closes
    assert _space_patches("abcdefgh ij", max_len=3) == (["BOS", b"abc", b"def", b"gh ", b"ij"], False)


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "combined"])
@pytest.mark.parametrize("target", [2.5, 4.0, 6.0])
def test_calibrate_threshold(mode, target):
    torch.manual_seed(0)
    em = EntropyModel(tiny().entropy_model)
    tokens = text_tokens(4, 256, torch.Generator().manual_seed(1))
    H = em.entropies(tokens)
    cfg = PatcherConfig(mode=mode)
    theta, achieved = PT.calibrate_threshold(H, tokens, cfg, target)
    real = PT.mean_bytes_per_patch(H, tokens, PatcherConfig(mode=mode, threshold=theta))
    assert real == achieved
    assert abs(real - target) <= 0.1 * target, f"{mode}: wanted {target} bytes/patch, got {real}"
    with pytest.raises(ValueError):
        PT.calibrate_threshold(H, tokens, PatcherConfig(mode="static"), target)


# ---- masks -----------------------------------------------------------------------------------


def reference_decoder_ids(lengths: list[int], next_starts: bool, T: int) -> list[int]:
    """Latest patch whose bytes are all <= t and that is known to be complete at t."""
    ends, pos = [], 0
    for n in lengths:
        if n:
            pos += n
            ends.append(pos - 1)
    out = []
    for t in range(T):
        j = -1
        for i, e in enumerate(ends):
            complete = e < T - 1 or next_starts  # byte e+1 opens the next patch
            if e <= t and complete:
                j = i
        out.append(j)
    return out


def reference_masks(pl, nsp, T, k, enc_w, dec_w, patch_w, ecw, dcw):
    """Boolean masks from the definitions in masks.py, with Python loops."""
    Bn, P = pl.shape
    ecw, dcw = ecw or 1, dcw or 1

    def causal(n, w):
        return torch.tensor([[kv <= q and (w is None or q - kv < w) for kv in range(n)] for q in range(n)])

    enc = torch.zeros(Bn, P * k, T, dtype=torch.bool)
    dec = torch.zeros(Bn, T, P * k, dtype=torch.bool)
    for b in range(Bn):
        lengths = pl[b].tolist()
        pid = [i for i, n in enumerate(lengths) for _ in range(n)]
        did = reference_decoder_ids(lengths, bool(nsp[b]), T)
        for q in range(P * k):
            for t in range(T):
                enc[b, q, t] = q // k - ecw < pid[t] <= q // k
                dec[b, t, q] = did[t] - dcw < q // k <= did[t]
    return causal(T, enc_w), causal(T, dec_w), causal(P, patch_w), enc, dec


def random_lengths(rng: random.Random, Bn: int, T: int):
    rows = []
    for _ in range(Bn):
        first = rng.choice([1, 1, 2, 3])  # > 1: the first bytes see no complete patch
        row, left = [min(first, T)], T - min(first, T)
        while left:
            n = min(left, rng.choice([1, 1, 2, 3, 5, 9]))
            row.append(n)
            left -= n
        rows.append(row)
    P = max(len(r) for r in rows) + rng.randint(0, 2)  # zero-length padding patches
    return torch.tensor([r + [0] * (P - len(r)) for r in rows])


def _mask_case(seed):
    rng = random.Random(seed)
    Bn, T = rng.randint(1, 3), rng.randint(2, 40)
    pl = random_lengths(rng, Bn, T)
    nsp = torch.tensor([rng.random() < 0.5 for _ in range(Bn)])
    args = dict(
        k=rng.choice([1, 2, 3]),
        enc_window=rng.choice([None, 1, 3, 8]),
        dec_window=rng.choice([None, 2, 5]),
        patch_window=rng.choice([None, 1, 3]),
        enc_cross_window=rng.choice([None, 1, 2, 3]),
        dec_cross_window=rng.choice([None, 1, 2, 3]),
    )
    return pl, nsp, T, args


def _build(pl, nsp, T, args, backend, docs=None):
    pid = M.patch_ids_from_lengths(pl, T)
    did = M.decoder_patch_ids(pid, nsp)
    return M.build_masks(pid, did, pl.shape[1], args["k"], args["enc_window"], args["dec_window"], args["patch_window"],
                         args["enc_cross_window"], args["dec_cross_window"], backend, docs)  # fmt: skip


def test_rotary_tables_match_positions():
    """Rotary.table(T) serves the values forward(arange(T)) computes, bit for bit, past its
    first size too (the tables grow); and the rotation is the interleaved-pair one."""
    rot = Rotary(16, 10000.0, positions=64)
    for T in (1, 37, 64, 150):
        cos, sin = rot.table(T)
        want = rot(torch.arange(T))
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1]), T
    assert rot.cos_table.shape[0] >= 150
    x = torch.randn(1, 150, 2, 16)  # (B, T, H, Dh)
    got = apply_rotary(x, rot.table(150))
    t, m = 149, 3  # one pair by hand: (x0, x1) turned by the angle t / 10000^(2m/16)
    angle = t / 10000.0 ** (2 * m / 16)
    for h in range(2):
        x0, x1 = x[0, t, h, 2 * m].item(), x[0, t, h, 2 * m + 1].item()
        assert got[0, t, h, 2 * m].item() == pytest.approx(x0 * math.cos(angle) - x1 * math.sin(angle), abs=1e-4)
        assert got[0, t, h, 2 * m + 1].item() == pytest.approx(x0 * math.sin(angle) + x1 * math.cos(angle), abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_dense_masks_match_reference(seed):
    for case in range(8):
        pl, nsp, T, args = _mask_case(seed * 100 + case)
        Bn = pl.shape[0]
        pid = M.patch_ids_from_lengths(pl, T)
        assert pid.tolist() == [[i for i, n in enumerate(r) for _ in range(n)] for r in pl.tolist()]
        did = M.decoder_patch_ids(pid, nsp)
        assert did.tolist() == [reference_decoder_ids(pl[b].tolist(), bool(nsp[b]), T) for b in range(Bn)]
        m = _build(pl, nsp, T, args, "dense")
        ref = reference_masks(pl, nsp, T, args["k"], args["enc_window"], args["dec_window"], args["patch_window"],
                              args["enc_cross_window"], args["dec_cross_window"])  # fmt: skip
        for name, got, want in zip(("enc_self", "dec_self", "patch_self", "enc_cross", "dec_cross"),
                                   (m.enc_self, m.dec_self, m.patch_self, m.enc_cross, m.dec_cross), ref):  # fmt: skip
            got = got.expand(-1, 1, -1, -1)[:, 0]
            assert torch.equal(got, want.expand_as(got)), f"{name} differs, case {seed}/{case} {args}"


def reference_attention(q, k, v, mask):
    """float64 softmax attention; rows with no visible key give zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).float()


@pytest.mark.parametrize("seed", range(3))
@torch.no_grad()
def test_flex_and_dense_attention_agree_with_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n_empty = {}
    for case in range(3):
        pl, nsp, T, args = _mask_case(1000 + seed * 10 + case)
        Bn, P, k = pl.shape[0], pl.shape[1], args["k"]
        dense, flex = _build(pl, nsp, T, args, "dense"), _build(pl, nsp, T, args, "flex")
        ref = reference_masks(pl, nsp, T, k, args["enc_window"], args["dec_window"], args["patch_window"],
                              args["enc_cross_window"], args["dec_cross_window"])  # fmt: skip
        shapes = {"enc_self": (T, T), "dec_self": (T, T), "patch_self": (P, P),
                  "enc_cross": (P * k, T), "dec_cross": (T, P * k)}  # fmt: skip
        for i, name in enumerate(shapes):
            Q, K = shapes[name]
            H, Hkv = (4, 2) if case % 2 else (2, 2)  # grouped-query attention on odd cases
            q = torch.randn(Bn, H, Q, 16, generator=gen)
            kk = torch.randn(Bn, Hkv, K, 16, generator=gen)
            v = torch.randn(Bn, Hkv, K, 16, generator=gen)
            want = reference_attention(q, kk, v, ref[i].expand(Bn, Q, K)[:, None])
            assert_block_structure(getattr(flex, name), ref[i].expand(Bn, Q, K), name)
            a = attend(q, kk, v, getattr(dense, name))
            f = attend(q, kk, v, getattr(flex, name))
            assert (a - want).abs().max() < 1e-5, f"dense {name} {args}"
            assert (f - want).abs().max() < 1e-5, f"flex {name} {args}"
            assert (f - a).abs().max() < 1e-5, f"flex vs dense {name} {args}"
            empty = ~ref[i].expand(Bn, Q, K).any(-1)  # (B, Q) rows with no visible key
            n_empty[name] = n_empty.get(name, 0) + int(empty.sum())
            assert torch.all(a.transpose(1, 2)[empty] == 0) and torch.all(f.transpose(1, 2)[empty] == 0), name
    assert n_empty["enc_cross"] > 0 and n_empty["dec_cross"] > 0, "cases should include rows with no visible key"


def _listed_blocks(num, idx, n_kv_blocks):
    """(B,H,QB) counts + (B,H,QB,KB) indices -> (B,H,QB,KB) bool: which kv blocks are listed."""
    out = torch.zeros(*num.shape, n_kv_blocks + 1, dtype=torch.bool)
    used = torch.arange(idx.shape[-1]) < num[..., None].long()
    out.scatter_(-1, torch.where(used, idx.long(), n_kv_blocks), used)
    return out[..., :n_kv_blocks]


def assert_block_structure(bm, dense: torch.Tensor, name: str):
    """Eager FlexAttention (CPU) applies only mask_mod and ignores the block lists, which the
    compiled CUDA kernel relies on; check them here. dense: (B,Q,K) bool, the true mask.
    Every visible pair must lie in a listed block (partial or full), and a full block (where
    the kernel skips mask_mod) must be entirely visible."""
    Bn, Q, K = dense.shape
    bs_q, bs_kv = bm.BLOCK_SIZE
    QB, KB = -(-Q // bs_q), -(-K // bs_kv)
    padded = torch.zeros(Bn, QB * bs_q, KB * bs_kv, dtype=torch.bool)
    padded[:, :Q, :K] = dense
    blocks = padded.view(Bn, QB, bs_q, KB, bs_kv)
    any_visible = blocks.any(4).any(2)  # (B,QB,KB)
    real = torch.zeros_like(padded)
    real[:, :Q, :K] = True
    all_visible = (blocks | ~real.view_as(blocks)).all(4).all(2)
    partial = _listed_blocks(bm.kv_num_blocks, bm.kv_indices, KB)[:, 0, :QB]
    full = torch.zeros_like(partial)
    if bm.full_kv_num_blocks is not None:
        full = _listed_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, KB)[:, 0, :QB]
    listed = (partial | full).expand(Bn, -1, -1)
    assert not (any_visible & ~listed).any(), f"{name}: visible pairs in blocks the kernel would skip"
    assert not (full.expand(Bn, -1, -1) & ~all_visible).any(), f"{name}: a full block hides masked pairs"
    # The backward pass walks the same blocks listed by key block (masks.block_mask derives them)
    for kv, q in (("kv", "q"), ("full_kv", "full_q")):
        if getattr(bm, f"{kv}_num_blocks") is None:
            continue
        by_query = _listed_blocks(getattr(bm, f"{kv}_num_blocks"), getattr(bm, f"{kv}_indices"), KB)
        by_key = _listed_blocks(getattr(bm, f"{q}_num_blocks"), getattr(bm, f"{q}_indices"), by_query.shape[-2])
        assert torch.equal(by_query, by_key.transpose(-2, -1)), f"{name}: {q} lists are not the {kv} lists transposed"


def _pad_rows(rows):
    P = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (P - len(r)) for r in rows])


def _long_mask_case(case: str):
    rng = random.Random(case)
    if case == "enc-edge":  # patches 0..63 (query block 0 at k=2) end exactly at byte 128
        T, k = 300, 2
        pl = _pad_rows([[1] + [2] * 62 + [4] + [3] * 57, [1, 127] + [2] * 86])
    elif case == "dec-edge":  # byte block 0 (t <= 127) reads up to patch 42: key 3*43-1 = 128
        T, k = 260, 3
        pl = _pad_rows([[1] + [3] * 42 + [5] + [4] * 32, [1] + [2] * 129 + [1]])
    else:
        T, k = rng.choice([260, 300]), 2
        pl = random_lengths(rng, 2, T)
    args = dict(k=k, enc_window=64, dec_window=100, patch_window=None,
                enc_cross_window=rng.choice([None, 2]), dec_cross_window=rng.choice([None, 3]))  # fmt: skip
    return pl, torch.tensor([True, False]), T, args


@pytest.mark.parametrize("case", ["random-a", "random-b", "enc-edge", "dec-edge"])
@torch.no_grad()
def test_flex_masks_across_blocks(case):
    """Long windows (T, P·k > 128): the cross-attention BlockMasks are built from per-block key
    ranges (masks._cross_block_masks), so patches and windows straddling 128-blocks matter.
    Attention outputs test mask_mod; assert_block_structure tests the block lists."""
    gen = torch.Generator().manual_seed(len(case))
    pl, nsp, T, args = _long_mask_case(case)
    assert torch.equal(pl.sum(1), torch.full((2,), T))
    k = args["k"]
    dense, flex = _build(pl, nsp, T, args, "dense"), _build(pl, nsp, T, args, "flex")
    ref = reference_masks(pl, nsp, T, k, args["enc_window"], args["dec_window"], args["patch_window"],
                          args["enc_cross_window"], args["dec_cross_window"])  # fmt: skip
    P = pl.shape[1]
    assert P * k > 128 and T > 128
    for i, (name, Q, K) in enumerate([("enc_self", T, T), ("dec_self", T, T), ("patch_self", P, P),
                                      ("enc_cross", P * k, T), ("dec_cross", T, P * k)]):  # fmt: skip
        got = getattr(dense, name).expand(-1, 1, -1, -1)[:, 0]
        assert torch.equal(got, ref[i].expand_as(got)), name
        assert_block_structure(getattr(flex, name), ref[i].expand(2, Q, K), name)
        q = torch.randn(2, 2, Q, 16, generator=gen)
        kk, v = torch.randn(2, 2, K, 16, generator=gen), torch.randn(2, 2, K, 16, generator=gen)
        want = reference_attention(q, kk, v, ref[i].expand(2, Q, K)[:, None])
        assert (attend(q, kk, v, getattr(dense, name)) - want).abs().max() < 1e-5, f"dense {name}"
        assert (attend(q, kk, v, getattr(flex, name)) - want).abs().max() < 1e-5, f"flex {name}"


@pytest.mark.parametrize("window", [None, 100, 300])
def test_causal_block_mask_matches_flex_attention(window):
    """The causal BlockMask built from the block geometry lists the blocks FlexAttention's
    create_block_mask lists, on both sides, for lengths on and off the 128 blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    for T in (1, 100, 128, 129, 700):
        ours = M.causal_mask(T, window, "flex", "cpu")
        want = create_block_mask(M._causal_mod(window), None, None, T, T, device="cpu")
        dense = M.causal_mask(T, window, "dense", "cpu")[0]
        assert_block_structure(ours, dense, f"causal T={T}")
        nb = -(-T // M.BLOCK)

        def blocks(m, side):
            return (_listed_blocks(getattr(m, f"{side}_num_blocks"), getattr(m, f"{side}_indices"), nb),
                    _listed_blocks(getattr(m, f"full_{side}_num_blocks"), getattr(m, f"full_{side}_indices"), nb))  # fmt: skip

        for side in ("kv", "q"):
            (partial, full), (want_partial, want_full) = blocks(ours, side), blocks(want, side)
            assert not (partial & full).any()  # a block is listed once
            assert torch.equal(partial | full, want_partial | want_full)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_mask_graphs_hold_no_sort(monkeypatch):
    """Compiled (train --one-graph), no mask construction puts a sort in the graph: inductor
    cannot compile one inside its combined kernels once a row has more than 64 blocks (the
    recipe's packed patches, 65 blocks, failed so). The backward's block lists come from a
    cumulative sum and a scatter instead (masks.block_mask)."""
    from blt.packing import packed_patch_count, packing_plan

    seen = []

    def record(gm, inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    lengths = torch.tensor([[1] + [3] * 300 + [0] * 100, [1] + [2] * 400])
    plan = packing_plan(lengths, packed_patch_count(lengths, M.BLOCK) + M.BLOCK, M.BLOCK)
    pl, nsp, T, args = _long_mask_case("random-a")
    monkeypatch.setattr(M, "_causal_cache", {})

    tokens = torch.full((2, T), OFFSET + 97)
    tokens[:, 40::70] = EOS_ID  # document masks too (computed in the graph, as --one-graph does)

    def masks(doc, first, pl, nsp, tokens):
        packed = M.packed_patch_mask(doc, first, None, "flex", aligned=True)
        return packed, _build(pl, nsp, T, args, "flex"), _build(pl, nsp, T, args, "flex", M.document_ids(tokens))

    torch._dynamo.reset()
    torch.compile(masks, backend=record, fullgraph=True)(plan.doc, plan.first, pl, nsp, tokens)
    torch._dynamo.reset()
    assert any("scatter" in op for op in seen)
    assert not [op for op in seen if "sort" in op]


def test_mask_cases_include_empty_rows():
    """The random mask cases cover queries with no visible key (first patch longer than one
    byte -> decoder id -1; zero-length padding patches -> encoder queries with no bytes)."""
    empty_dec = empty_enc = 0
    for seed in range(40):
        pl, nsp, T, args = _mask_case(seed)
        m = _build(pl, nsp, T, args, "dense")
        empty_dec += int((~m.dec_cross.any(-1)).sum())
        empty_enc += int((~m.enc_cross.any(-1)).sum())
    assert empty_dec > 0 and empty_enc > 0


@pytest.mark.parametrize("doc_mask", [False, True])
@pytest.mark.parametrize("variant", ["entropy", "static-windows", "given-lengths"])
@torch.no_grad()
def test_full_model_dense_vs_flex(variant, doc_mask):
    gen = torch.Generator().manual_seed(5)
    tokens = text_tokens(2, 150, gen)
    tokens[0, 60], tokens[0, 61] = EOS_ID, BOS_ID  # two documents in row 0
    model = tiny_model("entropy" if variant == "entropy" else "static", seed=2, calibrate_on=tokens).eval()
    model.cfg.doc_mask = doc_mask
    kwargs = {}
    if variant == "static-windows":
        model.cfg.encoder.cross_attn_window = 2
        model.cfg.decoder.cross_attn_window = 3
    if variant == "given-lengths":  # first patch of 3 bytes: bytes 0 and 1 see no patch at all
        row = [3] + [4] * 36 + [3]
        lengths = torch.tensor([row, [1] + [7] * 21 + [2] + [0] * 15])
        kwargs = dict(patch_lengths=lengths, next_starts_patch=torch.tensor([False, True]))
    dense = model(tokens, backend="dense", **kwargs).logits
    flex = model(tokens, backend="flex", **kwargs).logits
    assert torch.isfinite(dense).all() and torch.isfinite(flex).all()
    assert (dense - flex).abs().max() < 1e-4


def test_attention_backend_choice(monkeypatch):
    """--attention flash sends only the self-attentions of a graph being compiled, in 16-bit, to
    FlashAttention-4; cross-attentions, float32 calls and eager calls keep Triton's kernels."""
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        layers.set_flex_backend("cudnn")
    try:
        installed = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        installed = False
    if not installed:
        with pytest.raises(ValueError, match="pip install flash-attn-4"):
            layers.set_flex_backend("flash")
    assert layers.flex_kernel_options(torch.bfloat16, cross=False, compiling=True) is None  # triton: no options
    monkeypatch.setattr(layers, "_flex_options", {"BACKEND": "FLASH"})
    assert layers.flex_kernel_options(torch.bfloat16, cross=False, compiling=True) == {"BACKEND": "FLASH"}
    assert layers.flex_kernel_options(torch.float16, cross=False, compiling=True) == {"BACKEND": "FLASH"}
    assert layers.flex_kernel_options(torch.bfloat16, cross=True, compiling=True) is None
    assert layers.flex_kernel_options(torch.float32, cross=False, compiling=True) is None
    assert layers.flex_kernel_options(torch.bfloat16, cross=False, compiling=False) is None


@torch.no_grad()
def test_model_marks_its_cross_attentions(monkeypatch):
    """Every FlexAttention call of a forward says whether it is a cross-attention: the
    encoder's and decoder's cross-attentions do, the byte and patch self-attentions do not."""
    calls = []
    flex = layers._flex

    def record(q, k, v, block_mask, cross=False):
        calls.append((cross, q.shape[2], k.shape[2]))
        return flex(q, k, v, block_mask, cross)

    monkeypatch.setattr(layers, "_flex", record)
    tokens = text_tokens(2, 100, torch.Generator().manual_seed(3))
    model = tiny_model("entropy", seed=1, calibrate_on=tokens).eval()
    model(tokens, backend="flex")
    cfg, T = model.cfg, tokens.shape[1]
    cross = [(q, k) for is_cross, q, k in calls if is_cross]
    own = [(q, k) for is_cross, q, k in calls if not is_cross]
    e, d = cfg.encoder, cfg.decoder
    assert len(cross) == (e.n_layers if e.cross_attn_all_layers else 1) + (d.n_layers if d.cross_attn_all_layers else 1)
    assert all(q != k for q, k in cross) and all(q == k for q, k in own)
    byte_layers = e.n_layers + d.n_layers  # (the patcher's entropy model keeps CPU's dense masks here)
    assert len(own) == byte_layers + cfg.global_model.n_layers
    assert sum(q == T for q, _ in own) == byte_layers


def _packing_rows(seed: int):
    """Patch lengths of a few rows: trailing empty patches, one empty patch inside a row."""
    rng = random.Random(seed)
    rows = [[1] + [rng.randint(1, 6) for _ in range(rng.randint(0, 700))] for _ in range(rng.randint(1, 4))]
    rows[0][len(rows[0]) // 2] = 0 if len(rows[0]) > 2 else rows[0][len(rows[0]) // 2]
    return rows, _pad_rows(rows)


@pytest.mark.parametrize(("seed", "align"), [(s, 1) for s in range(6)] + [(0, 8), (1, 128), (4, 128)])
def test_packing_puts_each_row_after_the_last(seed, align):
    """Each row's patches, up to its last non-empty one, go end to end, each row's segment
    padded to a multiple of align; the rest is padding; unpack(pack(x)) gives x back where a
    patch has a slot and zeros elsewhere."""
    from blt.packing import pack, packed_patch_count, packing_plan, unpack

    rows, lengths = _packing_rows(seed)
    kept = [max(j + 1 for j, n in enumerate(r) if n > 0) for r in rows]
    segments = [-(-n // align) * align for n in kept]
    assert packed_patch_count(lengths, align) == sum(segments)
    slots = sum(segments) + seed * 7
    plan = packing_plan(lengths, slots, align)
    end = [len(rows)] * (slots - sum(segments))
    want_doc = [b for b, n in enumerate(segments) for _ in range(n)] + end
    want_pos = [j if j < n else 0 for n, m in zip(kept, segments) for j in range(m)] + [0] * len(end)
    want_valid = [j < n for n, m in zip(kept, segments) for j in range(m)] + [False] * len(end)
    assert plan.doc.tolist() == want_doc and plan.pos.tolist() == want_pos and plan.valid.tolist() == want_valid
    starts = [sum(segments[:b]) for b in range(len(rows))] + [sum(segments)]
    assert plan.first.tolist() == [starts[d] for d in want_doc]
    assert plan.bounds.tolist() == [*starts, slots] and plan.bounds.dtype == torch.int32
    x = torch.randn(*lengths.shape, 5)
    packed = pack(x, plan)
    assert packed.shape == (1, slots, 5) and torch.equal(packed[0].any(-1), plan.valid & packed[0].any(-1))
    assert all(torch.equal(packed[0, starts[b] : starts[b] + n], x[b, :n]) for b, n in enumerate(kept))
    back = unpack(packed, plan)
    for b, n in enumerate(kept):
        assert torch.equal(back[b, :n], x[b, :n]) and not back[b, n:].any()


@pytest.mark.parametrize(
    ("seed", "window", "aligned"),
    [(0, None, False), (1, None, False), (2, None, False), (5, None, False), (3, 50, False), (4, 300, False),
     (0, None, True), (2, None, True), (4, 300, True)],
)  # fmt: skip
def test_packed_patch_mask(seed, window, aligned, monkeypatch):
    """Causal within a row only (and within the window); the flex block lists cover every
    visible pair, their full blocks are wholly visible, and there are full blocks to skip.
    Rows aligned to the blocks: the same mask, from plain causality inside the listed blocks."""
    from blt.packing import packed_patch_count, packing_plan

    rows, lengths = _packing_rows(seed)
    align = M.BLOCK if aligned else 1
    plan = packing_plan(lengths, packed_patch_count(lengths, align) + 40, align)
    doc, N = plan.doc, plan.doc.shape[0]
    q, kv = torch.arange(N)[:, None], torch.arange(N)[None, :]
    want = (doc[:, None] == doc[None, :]) & (kv <= q) & ((q - kv < window) if window else True)
    dense = M.packed_patch_mask(plan.doc, plan.first, window, "dense")
    assert torch.equal(dense[0, 0], want)
    flex = M.packed_patch_mask(plan.doc, plan.first, window, "flex", aligned=aligned)
    if aligned:  # compiled, the mask_mod is plain causality: right inside every listed partial block
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            compiled = M.packed_patch_mask(plan.doc, plan.first, window, "flex", aligned=True)
        assert compiled.mask_mod.__name__ == "causal" and flex.mask_mod.__name__ == "mod"
        QB = -(-N // M.BLOCK)
        partial = _listed_blocks(compiled.kv_num_blocks, compiled.kv_indices, QB)[0, 0]
        in_partial = partial.repeat_interleave(M.BLOCK, 0).repeat_interleave(M.BLOCK, 1)[:N, :N]
        causal = compiled.mask_mod(None, None, q, kv)
        assert in_partial.any() and torch.equal(causal & in_partial, want & in_partial)
        assert_block_structure(compiled, want[None], "packed, aligned")
    assert_block_structure(flex, want[None], "packed")
    if window is None and max(len(r) for r in rows) >= 3 * M.BLOCK:  # a row spans a whole block below another
        assert int(flex.full_kv_num_blocks.sum()) > 0
    q, k, v = (torch.randn(1, 2, N, 8) for _ in range(3))
    assert (attend(q, k, v, flex) - attend(q, k, v, dense)).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_aligned_packed_mask_compiled_matches_dense():
    """Compiled, FlexAttention reads the block lists and the aligned packed mask's mask_mod is
    plain causality: the attention is still each row's own. Rows not aligned to the blocks
    would see each other, and this check fails on them (a one-off mutation: max diff 2.7)."""
    from torch.nn.attention.flex_attention import flex_attention

    from blt.packing import packed_patch_count, packing_plan

    torch.manual_seed(0)
    lengths = torch.tensor([[1] + [3] * 300 + [0] * 100, [1] + [2] * 400, [1] + [5] * 150 + [0] * 250])
    N = packed_patch_count(lengths, M.BLOCK) + M.BLOCK
    plan = packing_plan(lengths, N, M.BLOCK)
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))

    def attention(q, k, v, doc, first):
        return flex_attention(q, k, v, block_mask=M.packed_patch_mask(doc, first, None, "flex", aligned=True))

    out = torch.compile(attention, fullgraph=True)(q, k, v, plan.doc, plan.first)
    dense = M.packed_patch_mask(plan.doc, plan.first, None, "dense")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert (out - want).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["entropy", "given-lengths", "global-window"])
def test_packed_global_transformer_matches_padded(variant):
    """The global transformer on packed rows gives the padded layout's logits and gradients
    (gradients with the dense masks: FlexAttention has no CPU backward)."""
    gen = torch.Generator().manual_seed(7)
    tokens = text_tokens(3, 160, gen)
    model = tiny_model("entropy", seed=3, calibrate_on=tokens)
    if variant == "global-window":
        model.cfg.global_model.window = 5
    patching = model.patch(tokens)
    lengths, nsp = patching.patch_lengths, patching.next_starts_patch
    if variant == "given-lengths":  # an empty patch inside row 0, trailing ones in row 1
        lengths = torch.tensor([[1, 3, 0, 4] + [8] * 19, [1] + [9] * 10 + [69] + [0] * 11, [1] + [7] * 21 + [12]])
        assert lengths.sum(1).tolist() == [160] * 3
        nsp = torch.tensor([True, False, True])
    from blt.model import packing_align
    from blt.packing import packed_patch_count

    for backend in ("dense", "flex"):  # flex: each row aligned to the mask's blocks
        need = packed_patch_count(lengths, packing_align(backend))
        outs = []
        for slots in (None, need, need + 37):
            model.zero_grad()
            with torch.set_grad_enabled(backend == "dense"):
                out = model(tokens, tokens.roll(-1, 1), lengths, nsp, backend=backend, packed_slots=slots)
            if backend == "dense":
                out.loss.backward()
            outs.append((out.logits.detach(), [p.grad for p in model.global_model.parameters()]))
        for logits, grads in outs[1:]:
            assert (logits - outs[0][0]).abs().max() < 1e-5, backend
            if backend == "dense":
                assert all((g - g0).abs().max() < 1e-5 for g, g0 in zip(grads, outs[0][1]))


@torch.no_grad()
def test_autocast_residual_stream_dtype():
    """encoder.autocast_residual: under autocast the byte-level blocks (encoder, decoder) get
    their residual stream in the autocast dtype, as the global transformer's already is (its
    input comes out of a matrix product); the loss moves by bf16 rounding only; without
    autocast nothing changes."""
    from blt.layers import TransformerBlock

    tokens = text_tokens(2, 120, torch.Generator().manual_seed(4))
    model = tiny_model("entropy", seed=5, calibrate_on=tokens).eval()
    seen = []
    for name, part in (("local", model.encoder), ("global", model.global_model), ("local", model.decoder)):
        for block in (m for m in part.modules() if isinstance(m, TransformerBlock)):
            block.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0].dtype)))
    patching = model.patch(tokens)
    run = lambda: model(tokens, tokens.roll(-1, 1), patching.patch_lengths, patching.next_starts_patch).loss  # noqa: E731

    def dtypes(loss):
        out = {name: {dtype for n, dtype in seen if n == name} for name in ("local", "global")}
        seen.clear()
        return out

    plain = run()
    assert dtypes(plain) == {"local": {torch.float32}, "global": {torch.float32}}
    with torch.autocast("cpu", torch.bfloat16):
        wide = run()
        assert dtypes(wide) == {"local": {torch.float32}, "global": {torch.bfloat16}}
        model.encoder.autocast_residual = True
        narrow = run()
        assert dtypes(narrow) == {"local": {torch.bfloat16}, "global": {torch.bfloat16}}
    assert torch.equal(run(), plain)
    assert abs(narrow.item() - wide.item()) < 0.02 * wide.item() and narrow.item() != wide.item()


def test_fused_products_same_function_fewer_products():
    """layers.set_fused_products: q,k,v / w1,w3 / a cross-attention's k,v as one product each,
    norm gains folded into the weights. Same loss and gradients (norm gains included, set away
    from 1 so that folding matters); fewer matrix products, in the forward and the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
            return func(*args, **(kwargs or {}))

    tokens = text_tokens(2, 120, torch.Generator().manual_seed(8))
    model = tiny_model("entropy", seed=6, calibrate_on=tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    patching = model.patch(tokens)
    runs = []
    try:
        for fused in (False, True):
            layers.set_fused_products(fused)
            model.zero_grad()
            with CountProducts() as forward:
                out = model(tokens, tokens.roll(-1, 1), patching.patch_lengths, patching.next_starts_patch, backend="dense")
            with CountProducts() as backward:
                out.loss.backward()
            runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, forward.n, backward.n))
    finally:
        layers.set_fused_products(False)
    (loss0, grads0, fwd0, bwd0), (loss1, grads1, fwd1, bwd1) = runs
    assert abs(loss1.item() - loss0.item()) < 1e-5
    assert grads0.keys() == grads1.keys() and any("norm" in n for n in grads0)
    for name in grads0:
        assert torch.allclose(grads1[name], grads0[name], atol=1e-5, rtol=1e-4), name
    # per block 7 products -> 4 (q|k|v, wo, w1|w3, w2); per cross-attention 4 -> 3
    blocks = sum(len(part.layers) for part in (model.encoder, model.global_model, model.decoder))
    crosses = len(model.encoder.cross_attn) + len(model.decoder.cross_attn)
    assert fwd0 - fwd1 == 3 * blocks + crosses
    assert bwd1 < bwd0


@torch.no_grad()
def test_padding_patches_do_not_change_logits():
    """Extra zero-length patches only add fully masked keys/queries: same logits up to rounding
    (CPU SDPA is not bitwise invariant to the key count, so not torch.equal)."""
    tokens = text_tokens(2, 120, torch.Generator().manual_seed(9))
    model = tiny_model("entropy", seed=4, calibrate_on=tokens).eval()
    p = model.patch(tokens)
    base = model(tokens).logits
    for extra in (1, 7, 40):
        pl = torch.cat([p.patch_lengths, torch.zeros(2, extra, dtype=torch.long)], 1)
        out = model(tokens, patch_lengths=pl, next_starts_patch=p.next_starts_patch).logits
        assert (out - base).abs().max() < 1e-5
    for multiple in (16, 64):  # Patching.padded: the shape a compiled model is given
        q = p.padded(multiple)
        assert q.patch_lengths.shape[1] % multiple == 0 and torch.equal(q.patch_lengths[:, : p.patch_lengths.shape[1]], p.patch_lengths)
        out = model(tokens, patch_lengths=q.patch_lengths, next_starts_patch=q.next_starts_patch).logits
        assert (out - base).abs().max() < 1e-5
    # next_starts_patch=None means "the last patch is complete" (official behaviour).
    a = model(tokens, patch_lengths=p.patch_lengths).logits
    b = model(tokens, patch_lengths=p.patch_lengths, next_starts_patch=torch.ones(2, dtype=torch.bool)).logits
    assert torch.equal(a, b)


# ---- hash n-grams ----------------------------------------------------------------------------


def reference_hash(ids: list[int], n: int, prime: int, rows: int) -> list[int]:
    padded = [0] * (n - 1) + ids
    out = []
    for t in range(len(ids)):
        h = sum(g * prime**j for j, g in enumerate(padded[t : t + n])) % 2**64
        if h >= 2**63:
            h -= 2**64  # int64 wrap-around
        out.append(h % rows)  # Python % is non-negative for positive rows
    return out


def _wrap_inputs(prime: int) -> list[int]:
    """Pairs (a, b) with a + b * prime = 2**63 + d or 2**64 + d: the sum crosses the wrap."""
    ids = []
    for edge in (2**63, 2**64):
        hi = edge // prime
        for d in (-2, -1, 0, 1, 2):
            lo = edge - hi * prime + d
            if 0 <= lo < 2**63:
                ids += [lo, hi]
    return ids


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_ngram_hash_matches_python_ints(n):
    rng = random.Random(n)
    for prime in PRIMES:
        for rows in (1, 7, 257, 50002, 500002):
            ids = [rng.randrange(0, VOCAB_SIZE) for _ in range(20)]
            ids += [rng.randrange(0, 2**62) for _ in range(8)] + [2**63 - 1, 0, 2**63 - 2]
            ids += _wrap_inputs(prime)
            got = ngram_hash(torch.tensor([ids, ids[::-1]]), n, prime, rows)
            assert got.tolist() == [reference_hash(ids, n, prime, rows), reference_hash(ids[::-1], n, prime, rows)]
            assert int(got.min()) >= 0 and int(got.max()) < rows


def test_ngram_hash_wrap_is_exercised():
    """The wrap inputs really produce negative int64 sums (so the signed % path is tested)."""
    prime = PRIMES[0]
    ids = _wrap_inputs(prime)
    wrapped = [(a + b * prime) % 2**64 >= 2**63 for a, b in zip(ids[::2], ids[1::2])]
    assert any(wrapped) and not all(wrapped)


def test_hash_embedding_tables():
    torch.manual_seed(0)
    sizes, rows, functions = [1, 3, 4], 11, 2
    emb = HashNgramEmbedding(8, sizes, rows, functions)
    torch.nn.init.normal_(emb.weight)
    assert emb.weight.shape == (functions * len(sizes) * rows, 8)
    ids = text_tokens(2, 30, torch.Generator().manual_seed(0))
    idx = emb.indices(ids)
    assert idx.shape == (2, 30, functions * len(sizes))
    i = 0
    for f in range(functions):
        for n in sizes:
            want = torch.tensor([reference_hash(r, n, PRIMES[f], rows) for r in ids.tolist()]) + i * rows
            assert torch.equal(idx[..., i], want), (f, n)
            assert int(idx[..., i].min()) >= i * rows and int(idx[..., i].max()) < (i + 1) * rows
            i += 1
    assert torch.allclose(emb(ids), emb.weight[idx].sum(-2))


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / f"{name}.json"
    cfg.to_json(path)
    back = BLTConfig.from_json(path)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert json.loads(path.read_text()) == cfg.to_dict()
    cfg.patcher.max_patch_length, cfg.encoder.cross_attn_window = 7, 2  # non-defaults survive too
    cfg.to_json(path)
    assert BLTConfig.from_json(path) == cfg


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": 1}, "unknown key bogus"),
        ({"encoder": {"dimension": 32}}, "unknown key encoder.dimension"),
        ({"patcher": 3}, "patcher must be a JSON object, got a number"),
        ({"patcher": {"mode": "words"}}, "patcher.mode must be one of"),
        ({"patcher": {"patch_size": 0}}, "patcher.patch_size must be >= 1"),
        ({"patcher": {"max_patch_length": 0}}, "patcher.max_patch_length"),
        ({"encoder": {"dim": 30, "n_heads": 4}}, "encoder: dim 30 is not divisible by n_heads 4"),
        ({"global_model": {"dim": 36, "n_heads": 4}}, "global_model: head_dim 9 must be even"),
        ({"decoder": {"n_heads": 4, "n_kv_heads": 3}}, "decoder: n_heads 4 not divisible by n_kv_heads 3"),
        ({"decoder": {"window": 0}}, "decoder: window must be >= 1"),
        ({"entropy_model": {"dropout": 1.0}}, "entropy_model: dropout"),
        ({"global_model": {"n_layers": -1}}, "global_model: dim, n_layers and n_heads must be positive"),
        ({"cross_attn_k": 0}, "cross_attn_k must be >= 1"),
        ({"vocab_size": 256}, "vocab_size must be 260"),
        ({"encoder": {"ngram_sizes": []}}, "encoder.ngram_sizes"),
        ({"encoder": {"hash_rows": 0}}, "encoder.hash_rows"),
        ({"decoder": {"n_layers": 0}}, "encoder and decoder need at least one layer"),
    ],
)
def test_config_errors(patch, message, tmp_path):
    d = tiny().to_dict()
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key].update(value)
        else:
            d[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        BLTConfig.from_dict(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=re.escape(message)):
        BLTConfig.from_json(path)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        BLTConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BLTConfig.from_json(bad)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    partial = tmp_path / "partial.json"
    partial.write_text('{"cross_attn_k": 3}')
    assert load_json(partial, "config") == {"cross_attn_k": 3}
    with pytest.raises(ConfigError, match="missing keys entropy_model, patcher"):  # no silent defaults
        BLTConfig.from_json(partial)


@pytest.mark.parametrize(
    "bad",
    [{"encoder": {"dim": "32"}}, {"cross_attn_k": "2"}, {"patcher": {"threshold": "high"}}, [1, 2]],
    ids=["str-dim", "str-k", "str-threshold", "top-level-list"],
)
def test_config_bad_types_give_config_error(bad):
    with pytest.raises(ConfigError):
        BLTConfig.from_dict(bad)


# ---- tokens ----------------------------------------------------------------------------------


def test_encode_decode():
    text = "héllo, wörld €𝄞"
    ids = encode(text)
    assert ids[0] == BOS_ID and ids[1:] == [b + OFFSET for b in text.encode()]
    assert encode(text, bos=False, eos=True)[-1] == EOS_ID
    assert encode(b"\x00\xff", bos=False) == [OFFSET, 255 + OFFSET]
    assert decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    # Specials (and out-of-range ids) are dropped wherever they appear.
    noisy = [BOE_ID, BOS_ID] + ids[1:4] + [EOS_ID, 3, VOCAB_SIZE, -1] + ids[4:] + [EOS_ID]
    assert decode(noisy) == text
    # Split or invalid UTF-8 becomes U+FFFD instead of raising.
    e_acute = encode("é", bos=False)
    assert decode(e_acute[:1]) == "\ufffd"
    assert decode(encode(b"a\xffb", bos=False)) == "a\ufffdb"


def test_stream_decoder_holds_back_partial_characters():
    text = "a€𝄞é!"
    d = StreamDecoder()
    pieces = [d.push([i]) for i in encode(text)]  # one id per step, BOS first
    assert "".join(pieces) + d.flush() == text
    # '€' is 3 bytes: nothing is printed until its last byte arrives.
    euro = encode("€", bos=False)
    d = StreamDecoder()
    assert d.push(euro[:1]) == "" and d.push(euro[1:2]) == "" and d.push([EOS_ID]) == ""
    assert d.push(euro[2:]) == "€"
    # A truncated character at the end of the stream becomes U+FFFD on flush.
    d = StreamDecoder()
    assert d.push(euro[:2]) == "" and d.flush() == "\ufffd"
    d = StreamDecoder()
    assert d.push(encode(b"\xffx", bos=False)) == "\ufffdx"


# ---- training sanity -------------------------------------------------------------------------

STORY = (
    "Once upon a time, a small gray fox named Pell lived at the edge of a pine wood. "
    "Every morning she walked to the river to count the stones on the bank. "
    "One day she found a blue stone that hummed when the wind blew. "
    "Pell carried it home, set it on her windowsill, and slept to its song until spring."
)


def test_overfit_short_story():
    torch.manual_seed(0)
    cfg = tiny()
    cfg.patcher.mode = "static"
    model = BLT(cfg)
    ids = torch.tensor([encode(STORY, bos=True, eos=True)])
    x, y = ids[:, :-1], ids[:, 1:]
    assert 250 <= x.shape[1] <= 400
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    t0, bpb, step = time.perf_counter(), float("inf"), 0
    for step in range(400):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bpb = loss.item() / LN2
        if bpb < 0.05 or time.perf_counter() - t0 > 60:
            break
    model.eval()
    with torch.no_grad():
        bpb = model(x, y).bpb
    print(f"overfit: {bpb:.4f} BPB after {step + 1} steps, {time.perf_counter() - t0:.1f}s")
    assert bpb < 0.1


# ---- config flags are live -------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["cross_attn_double_residual", "hash_embed_mean"])
@torch.no_grad()
def test_flags_change_outputs(flag):
    tokens = text_tokens(2, 64, torch.Generator().manual_seed(0))

    def config(flip):
        cfg = tiny()
        cfg.patcher.mode = "static"
        if flip:
            setattr(cfg, flag, not getattr(cfg, flag))
        return cfg

    torch.manual_seed(0)
    a = BLT(config(False)).eval()
    b = BLT(config(True)).eval()
    b.load_state_dict(a.state_dict())
    la, lb = a(tokens).logits, b(tokens).logits
    assert not torch.allclose(la, lb, atol=1e-4), f"{flag} has no effect"
    c = BLT(config(False)).eval()
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(tokens).logits, la)  # same flags, same weights: same outputs


def test_stream_entropies_match_one_forward():
    """A stream's entropies computed in pieces, each run with the model's receptive field of
    context before it, are those of one forward over the whole stream (float16 storage aside).
    With less context, the first positions of each piece come out different."""
    import numpy as np

    from blt.config import EntropyModelConfig
    from blt.entropy_model import stream_entropies

    torch.manual_seed(0)
    model = EntropyModel(EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=16)).eval()
    assert model.receptive_field == 30
    tokens = np.random.default_rng(0).integers(4, 260, 500).astype(np.uint16)
    want = model.entropies(torch.from_numpy(tokens.astype(np.int64))[None])[0].numpy()
    done = []
    out = np.full(500, np.nan, np.float16)
    # 500 = 13 pieces of 37 + 19: batched full pieces, and the pieces at both ends alone
    stream_entropies(model, tokens, out, context=30, chunk=37, batch=3, progress=done.append)
    assert sum(done) == 500 and np.abs(out - want).max() < 1e-2
    short = np.full(500, np.nan, np.float16)
    stream_entropies(model, tokens, short, context=5, chunk=37, batch=3)
    assert np.abs(short - want).max() > 0.05
    assert np.abs(short[:37] - want[:37]).max() < 1e-2  # piece 0 starts the stream: nothing is cut off


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under dynamo
def test_compiled_flex_is_never_made_inside_a_trace(monkeypatch):
    """Attention traced into a compiled graph (train --one-graph) calls plain FlexAttention,
    which the graph compiles, and leaves the eager path's compiled FlexAttention unmade: made
    inside the trace, it later ran uncompiled in the eager held-out evaluation and materialised
    every score."""
    monkeypatch.setattr(layers, "_compiled_flex", None)
    picked = []

    def traced(x):
        picked.append(layers.compiled_flex())
        return x + 1

    torch._dynamo.reset()
    torch.compile(traced, backend="eager", fullgraph=True)(torch.zeros(2))
    torch._dynamo.reset()
    assert picked and layers._compiled_flex is None
    assert layers.compiled_flex() is layers.compiled_flex() is not None  # made once, eagerly
