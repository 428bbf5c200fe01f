"""Document masking (BLT_LLM.md §8.1): a window packs documents end to end, and with the config's
doc_mask nothing of one document reaches the next, in every stack and backend.

* document ids, patch documents, the patcher and the hash n-grams against per-document
  references (each document cut and hashed as it would be alone);
* every mask against a brute-force reference (dense), and the FlexAttention BlockMasks' mask_mod
  on every index pair and block lists against the same (flex);
* the strongest property: a document packed after another gets exactly the logits and patches
  it gets alone (to float rounding: its positions shift), in every patch mode, with wider
  cross-attention windows, on packed global rows, in both backends; without doc_mask it does not;
* configs (saved before the field: off), flags of blt.train and blt.eval, and generation.

The causality gate (test_causality.py) checks the same contract by gradients and perturbations.
"""

import json
import random

import pytest
import torch

import blt.masks as M
from blt import eval as ev
from blt import generate as G
from blt import train_flags
from blt.checkpoint import CheckpointError, save_entropy_model, save_model
from blt.config import ADDED_LATER, BLTConfig, PatcherConfig, tiny
from blt.entropy_model import EntropyModel
from blt.layers import attend
from blt.model import BLT
from blt.ngram_hash import HashNgramEmbedding
from blt.patcher import patch_starts
from blt.tests.test_core import assert_block_structure, reference_attention, text_tokens
from blt.tests.test_generate import make_model
from blt.tokens import BOS_ID, EOS_ID, OFFSET, encode

A = b"The cat sat on the mat. It was a sunny day, and the cat was happy."
B_DOC = b"Once upon a time, a little fox found a red ball in the garden."


def packed(*docs: bytes) -> list[int]:
    return [i for d in docs for i in encode(d, eos=True)]


def reference_documents(row: list[int]) -> list[int]:
    """Document of each byte: a document ends with its EOS."""
    out, d = [], 0
    for t in row:
        out.append(d)
        d += t == EOS_ID
    return out


def document_slices(row: list[int]) -> list[tuple[int, int]]:
    docs = reference_documents(row)
    return [(docs.index(d), len(docs) - docs[::-1].index(d)) for d in sorted(set(docs))]


# ---- ids, patcher, hash n-grams -------------------------------------------------------------


def test_document_ids_by_hand():
    tokens = torch.tensor([[BOS_ID, 70, 71, EOS_ID, BOS_ID, 72, EOS_ID, 73]])
    docs = M.document_ids(tokens)
    assert docs.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2]]
    assert M.document_starts(docs).tolist() == [[0, 0, 0, 0, 4, 4, 4, 7]]
    lengths = torch.tensor([[1, 2, 1, 1, 2, 1, 0]])  # bytes 0 | 1 2 | 3 (EOS) | 4 | 5 6 | 7 | (empty)
    pids = M.patch_ids_from_lengths(lengths, 8)
    assert M.patch_documents(docs, pids, 7).tolist() == [[0, 0, 0, 1, 1, 2, 2]]


@pytest.mark.parametrize("seed", range(6))
def test_each_document_is_patched_as_alone(seed):
    """patch_starts with doc_mask on a packed row = each document patched alone (given its own
    entropies), for every mode and max_patch_length; the next byte's column is the last one's."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        row = []
        for _ in range(rng.randint(1, 4)):
            doc = text_tokens(1, rng.randint(1, 40), gen)[0].tolist()
            row += doc + ([EOS_ID] if rng.random() < 0.8 else [])
        rows.append(row[:60] + [OFFSET + 32] * (60 - len(row[:60])))
    tokens = torch.tensor(rows)
    H = torch.rand(2, 60, generator=gen) * 4
    for mode in ("entropy", "monotonic", "combined", "static", "space", "byte"):
        cfg = PatcherConfig(mode=mode, threshold=rng.uniform(-1, 3), threshold_add=0.5, patch_size=rng.randint(1, 5),
                            max_patch_length=rng.choice([None, 3, 7]))  # fmt: skip
        got = patch_starts(tokens, cfg, H, doc_mask=True)
        for b, row in enumerate(rows):
            want = []
            for lo, hi in document_slices(row):
                alone = patch_starts(tokens[b : b + 1, lo:hi], cfg, H[b : b + 1, lo:hi])[0]
                want += alone[: hi - lo].tolist()
            want.append(bool(alone[-1]))
            assert got[b].tolist() == want, (mode, b)


def test_hash_ngrams_start_at_each_document():
    emb = HashNgramEmbedding(8, [1, 2, 3, 5, 8], rows=97, functions=2)
    row = packed(b"ab", b"hello", b"", b"xyz world")
    tokens = torch.tensor([row])
    docs = M.document_ids(tokens)
    doc_pos = torch.arange(len(row)) - M.document_starts(docs)
    got = emb.indices(tokens, doc_pos)[0]
    want = torch.cat([emb.indices(tokens[:, lo:hi])[0] for lo, hi in document_slices(row)])
    assert torch.equal(got, want)
    assert not torch.equal(emb.indices(tokens)[0], want)  # across documents they differ


# ---- masks ------------------------------------------------------------------------------------


def documents_and_lengths(rng: random.Random, T: int) -> tuple[list[int], list[int]]:
    """A row of T tokens holding several documents, and patch lengths that never span two."""
    row, lengths = [], []
    while len(row) < T:
        n = min(rng.randint(2, 90), T - len(row))
        row += [BOS_ID] + [OFFSET + 97] * (n - 2) + [EOS_ID] if n >= 2 else [BOS_ID]
        left, first = n, True
        while left:
            size = 1 if first else min(left, rng.randint(1, 6))
            lengths.append(size)
            left, first = left - size, False
    return row[:T], lengths


def reference_doc_masks(row_docs, pids, dec, P, k, windows):
    """(T,T), (P·k,T), (P,P), (T,P·k) masks of one row, pair by pair."""
    enc_w, dec_w, patch_w, ew, dw = windows
    T = len(row_docs)
    pdocs = [row_docs[pids.index(j)] if j in pids else row_docs[-1] for j in range(P)]
    cross_docs = (ew or 1) > 1 or (dw or 1) > 1

    def causal(q, kv, w, docs):
        return kv <= q and (w is None or q - kv < w) and docs[q] == docs[kv]

    enc_self = [[causal(q, kv, enc_w, row_docs) for kv in range(T)] for q in range(T)]
    dec_self = [[causal(q, kv, dec_w, row_docs) for kv in range(T)] for q in range(T)]
    patch = [[causal(q, kv, patch_w, pdocs) for kv in range(P)] for q in range(P)]
    enc = [[0 <= q // k - pids[kv] < (ew or 1) and (not cross_docs or pdocs[q // k] == row_docs[kv])
            for kv in range(T)] for q in range(P * k)]  # fmt: skip
    dec_m = [[0 <= dec[q] - kv // k < (dw or 1) and (not cross_docs or row_docs[q] == pdocs[kv // k])
              for kv in range(P * k)] for q in range(T)]  # fmt: skip
    return [torch.tensor(m) for m in (enc_self, dec_self, patch, enc, dec_m)]


def evaluated(mask_mod, Bn: int, Q: int, K: int) -> torch.Tensor:
    """A mask_mod on every (row, query, key): (B, Q, K) bool."""
    b = torch.arange(Bn)[:, None, None]
    return mask_mod(b, torch.zeros_like(b), torch.arange(Q)[None, :, None], torch.arange(K)[None, None, :])


@pytest.mark.parametrize("windows", [(64, 100, None, None, None), (64, 64, 7, 2, 3)])
@torch.no_grad()
def test_masks_match_reference_with_documents(windows):
    """Dense masks = the pair-by-pair reference; FlexAttention's BlockMasks: mask_mod = the
    reference on every pair, block lists cover it (assert_block_structure), attention agrees.
    T = 300 bytes, P·k > 128: blocks and documents straddle each other."""
    rng, gen = random.Random(str(windows)), torch.Generator().manual_seed(0)
    T, k = 300, 2
    rows, lengths = zip(*(documents_and_lengths(rng, T) for _ in range(2)))
    P = max(map(len, lengths))
    tokens = torch.tensor(rows)
    pl = torch.tensor([ls + [0] * (P - len(ls)) for ls in lengths])
    pids = M.patch_ids_from_lengths(pl, T)
    dec = M.decoder_patch_ids(pids, torch.tensor([True, False]))
    docs = M.document_ids(tokens)
    assert int(docs[:, -1].min()) >= 3 and P * k > 128
    names = ("enc_self", "dec_self", "patch_self", "enc_cross", "dec_cross")
    refs = [reference_doc_masks(docs[b].tolist(), pids[b].tolist(), dec[b].tolist(), P, k, windows) for b in range(2)]
    built = {bk: M.build_masks(pids, dec, P, k, *windows, backend=bk, docs=docs) for bk in ("dense", "flex")}
    for i, name in enumerate(names):
        want = torch.stack([r[i] for r in refs])  # (B, Q, K)
        Q, K = want.shape[1:]
        assert torch.equal(getattr(built["dense"], name)[:, 0].expand_as(want), want), name
        flex = getattr(built["flex"], name)
        if isinstance(flex, M.PatchRuns):  # one-patch cross-attentions, where the kernels run
            continue
        assert torch.equal(evaluated(flex.mask_mod, 2, Q, K), want), name
        assert_block_structure(flex, want, name)
        q = torch.randn(2, 2, Q, 8, generator=gen)
        kk, v = torch.randn(2, 2, K, 8, generator=gen), torch.randn(2, 2, K, 8, generator=gen)
        expected = reference_attention(q, kk, v, want[:, None])
        for backend in ("dense", "flex"):
            got = attend(q, kk, v, getattr(built[backend], name))
            assert (got - expected).abs().max() < 1e-5, (backend, name)


def test_document_masks_never_go_to_fa4(monkeypatch):
    """FlashAttention-4's kernels take causal rows, not documents: with it chosen, a document
    mask is still a BlockMask (FlexAttention's kernels), and packed rows are not aligned."""
    from blt.model import packing_align

    monkeypatch.setattr(M, "_fa4", True)
    docs = M.document_ids(torch.tensor([[BOS_ID, 70, EOS_ID, BOS_ID, 71]]))
    assert isinstance(M.causal_mask(5, None, "flex", "cpu"), M.CausalRows)
    assert not isinstance(M.causal_mask(5, None, "flex", "cpu", docs), M.CausalRows)
    monkeypatch.setattr(M, "_fa4", False)
    assert packing_align("flex") == M.BLOCK and packing_align("flex", doc_mask=True) == 1


# ---- the model: a document after another = the document alone ----------------------------------


def doc_model(mode: str, cross_window: int | None = None) -> BLT:
    """A tiny BLT with document masking, its entropy threshold away from every entropy of the
    test's windows (so that float rounding cannot flip a patch)."""
    torch.manual_seed(0)
    cfg = tiny()
    cfg.patcher.mode, cfg.patcher.patch_size = mode, 3
    cfg.encoder.cross_attn_window = cfg.decoder.cross_attn_window = cross_window
    em = EntropyModel(cfg.entropy_model)
    if cfg.patcher.needs_entropy:
        H = em.entropies(torch.tensor([packed(A, B_DOC)]), doc_mask=True).flatten()
        if mode == "monotonic":
            H = H[1:] - H[:-1]
        H = H.sort().values
        gaps = H[1:] - H[:-1]
        i = int(gaps[len(H) // 3 : 2 * len(H) // 3].argmax()) + len(H) // 3  # a wide gap mid-range
        cfg.patcher.threshold = float(H[i] + H[i + 1]) / 2
    return BLT(cfg, em).eval()


@pytest.mark.parametrize(
    ("mode", "cross_window", "backend"),
    [("entropy", None, "dense"), ("monotonic", None, "dense"), ("static", None, "dense"), ("space", None, "dense"),
     ("byte", None, "dense"), ("static", 2, "dense"), ("entropy", None, "flex"), ("space", 2, "flex")],
)  # fmt: skip
@torch.no_grad()
def test_second_document_equals_it_alone(mode, cross_window, backend):
    """Logits and patches of document B packed after document A = those of B alone; and the
    global transformer on packed rows gives the same. Without doc_mask, B reads A."""
    model = doc_model(mode, cross_window)
    both, alone = torch.tensor([packed(A, B_DOC)]), torch.tensor([packed(B_DOC)])
    start = both.shape[1] - alone.shape[1]
    out_both, out_alone = model(both, backend=backend), model(alone, backend=backend)
    lengths = out_both.patching.patch_lengths[0]
    cut = int((lengths.cumsum(0) == start).nonzero()[0]) + 1  # A's patches end exactly where B starts
    assert torch.equal(lengths[cut:][lengths[cut:] > 0], out_alone.patching.patch_lengths[0])
    assert (out_both.logits[0, start:] - out_alone.logits[0]).abs().max() < 1e-4
    packed_rows = model(both, backend=backend, packed_slots=int((lengths > 0).sum()) + 37).logits
    assert (packed_rows - out_both.logits).abs().max() < 1e-5
    model.cfg.doc_mask = False
    assert (model(both, backend=backend).logits[0, start:] - out_alone.logits[0]).abs().max() > 1e-3


# ---- configs and flags ------------------------------------------------------------------------


def static_tiny() -> BLTConfig:
    cfg = tiny()
    cfg.patcher.mode = "static"  # no entropy model needed
    return cfg


@pytest.mark.parametrize("doc_mask", [True, False])
def test_doc_mask_round_trips(doc_mask, tmp_path):
    cfg = tiny()
    cfg.doc_mask = doc_mask
    cfg.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["doc_mask"] is doc_mask
    assert BLTConfig.from_json(tmp_path / "c.json") == cfg
    assert tiny().doc_mask  # new configs mask documents


def test_config_saved_before_doc_mask_loads_without_it(tmp_path):
    """A config.json written before the field (the shipped checkpoint's) is the model it was:
    no document masking."""
    assert ADDED_LATER == {"doc_mask": False}
    model = BLT(static_tiny())
    save_model(model, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw.pop("doc_mask") is True
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    assert ev.load_any(tmp_path / "m", "cpu").cfg.doc_mask is False
    assert ev.load_any(tmp_path / "m", "cpu", doc_mask=True).cfg.doc_mask is True  # blt.eval --doc-mask


def test_train_flags_set_doc_mask(tmp_path):
    """blt.train: the preset's (on) unless --no-doc-mask; a JSON config saved without the key:
    off unless --doc-mask; --resume without a flag: the run's own."""
    p = train_flags.blt_parser()

    def cfg_for(*flags):
        args = p.parse_args(["--patch-mode", "static", "--out", str(tmp_path / "run"), *flags])
        return train_flags.blt_config(p, args)[0]

    old = tiny().to_dict()
    del old["doc_mask"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert cfg_for().doc_mask and not cfg_for("--no-doc-mask").doc_mask
    assert not cfg_for("--config", str(tmp_path / "old.json")).doc_mask
    assert cfg_for("--config", str(tmp_path / "old.json"), "--doc-mask").doc_mask
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "config.json").write_text(json.dumps(old))
    assert not cfg_for("--resume").doc_mask and cfg_for("--resume", "--doc-mask").doc_mask


def test_eval_flag(tmp_path, capsys):
    """blt.eval: the checkpoint's document masking unless a flag says otherwise; a byte-LM
    folder takes no flag."""
    model = BLT(static_tiny())
    save_model(model, tmp_path / "m")
    (tmp_path / "text.txt").write_text("One story.\n<|endoftext|>\nAnother one.\n")
    ev.main(["--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
             "--device", "cpu", "--no-doc-mask"])  # fmt: skip
    assert "document masking off" in capsys.readouterr().out
    assert ev.load_any(tmp_path / "m", "cpu").cfg.doc_mask
    save_entropy_model(EntropyModel(tiny().entropy_model), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="byte LM"):
        ev.load_any(tmp_path / "lm", "cpu", doc_mask=False)


# ---- generation -------------------------------------------------------------------------------


def test_generation_reads_the_last_document():
    """A prompt holding several documents: the cached engine continues its last document, as
    the uncached oracle does over the whole prompt, and as from that document alone."""
    model = make_model("tiny", "entropy")
    assert model.cfg.doc_mask
    last = encode(b"The fox ran")
    prompt = packed(A) + last
    res = G.generate_ids(model, [prompt, last], 40, temperature=0.0, stop=None, return_logits=True)
    assert res.ids[0] == res.ids[1]
    oracle, logits = G.generate_uncached(model, prompt, 40, return_logits=True)
    assert oracle == res.ids[0] and (logits - res.logits[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="may not end with EOS"):
        G.generate_ids(model, [packed(A)], 4)
