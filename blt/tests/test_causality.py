"""The causality gate: a BLT must never let the prediction of byte t+1 depend on bytes > t.

The contract (masks.py, patcher.py): the decoder at byte t may only read global outputs of
patches whose bytes are all <= t, and whether byte p opens a patch depends only on bytes < p.

Two independent checks, each returning a `CheckResult` (so the planted-leak tests can assert
that they *fail*):

* gradient     -- patching fixed (computed from the tokens by the entropy model), the encoder's
                  embedding output replaced by a leaf tensor; for every t, the gradient of
                  <logits[:, t], random w> w.r.t. the embedding at every s > t must be exactly
                  zero, and row b's outputs must have exactly zero gradient w.r.t. other rows.
* perturbation -- change byte s (row 0: that byte; row 1: the whole suffix s..T-1), re-run the
                  entropy model, the patcher and the model; logits at every t < s and patch
                  starts at every p <= s must be bitwise unchanged (float32, deterministic
                  algorithms). Also: changing one row leaves the other row bitwise unchanged.

The perturbation check pads `patch_lengths` to a fixed number of patches (T): CPU SDPA is not
bitwise invariant to the number of (fully masked) keys/queries, so a perturbation that changes
the batch's patch count moves unrelated logits by ~1e-6 without any information flow. With
the shapes fixed, any bit that changes is a real dependency.

Document masking (config doc_mask) adds a third contract: nothing of an earlier document in
the window reaches a later one. Seed 1's rows pack three documents each (BOS ... EOS BOS ...)
under document masking, and both checks also look across documents: the gradient of a later
document's logits w.r.t. an earlier document's embeddings must be exactly zero, and changing
an earlier document's bytes (not its EOS) must leave a later document's patch starts bitwise
unchanged, and its logits too (bitwise where the earlier document keeps its patch count; else
every later patch moves to another index, and the global model's rotary positions shift
without changing a relative position: then to float rounding, 1e-5). Seed 0 runs without
document masking (the shipped model's setting) on one document per row.

Runs over every patch mode x 2 seeds (seed 1 also: max_patch_length, cross-attention windows,
double residual, plain-sum hash embeddings, T not a power of two, documents), B=2, T in
{256, 288}.
`python -m blt.tests.test_causality` runs everything and prints a summary table (exit status
1 if any check fails). BLT_TEST_THREADS sets torch's thread count (default 1, as conftest.py).
"""

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import blt.masks as M
from blt.config import PATCH_MODES, tiny
from blt.entropy_model import EntropyModel
from blt.model import BLT
from blt.patcher import calibrate_threshold
from blt.tokens import BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE

MODES = PATCH_MODES  # entropy, monotonic, combined, static, space, byte
SEEDS = (0, 1)
B = 2
TARGET_BYTES_PER_PATCH = 3.0
MAX_EXAMPLES = 8  # violations kept per check (the count is always exact)
SHIFT_TOLERANCE = 1e-5  # a later document's logits when an earlier one's patch count changed (see above)


# ---- building a test case --------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    T: int
    max_patch_length: int | None
    patch_size: int  # static mode
    cross_window: int | None  # encoder and decoder cross_attn_window
    double_residual: bool
    hash_embed_mean: bool
    doc_mask: bool  # and three documents per row


VARIANTS = {
    0: Variant(T=256, max_patch_length=None, patch_size=4, cross_window=None,
               double_residual=False, hash_embed_mean=True, doc_mask=False),
    1: Variant(T=288, max_patch_length=5, patch_size=6, cross_window=2,
               double_residual=True, hash_embed_mean=False, doc_mask=True),
}


def variant(seed: int) -> Variant:
    return VARIANTS[seed % 2]


def text_like_tokens(batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, T) token ids: BOS, then mostly lowercase letters with spaces, punctuation and
    arbitrary bytes mixed in, so that every patching rule (space included) gives mixed sizes."""
    u = torch.rand(batch, T, generator=gen)
    letters = torch.randint(97, 123, (batch, T), generator=gen)
    punct = torch.tensor(list(b".,;!?-'\n"))[torch.randint(0, 8, (batch, T), generator=gen)]
    anyb = torch.randint(0, 256, (batch, T), generator=gen)
    space = torch.full_like(letters, 32)
    b = torch.where(u < 0.72, letters, torch.where(u < 0.88, space, torch.where(u < 0.95, punct, anyb)))
    tokens = b + OFFSET
    tokens[:, 0] = BOS_ID
    return tokens


def packed_documents(tokens: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The rows cut into three documents each: an EOS, then the next one's BOS, at two places
    that differ between rows."""
    T = tokens.shape[1]
    tokens = tokens.clone()
    for b in range(tokens.shape[0]):
        for e in (torch.tensor([T // 3, 2 * T // 3]) + torch.randint(-20, 20, (2,), generator=gen)).tolist():
            tokens[b, e], tokens[b, e + 1] = EOS_ID, BOS_ID
    return tokens


def documents_of(tokens: torch.Tensor) -> torch.Tensor:
    """(B,T) document of each byte (masks.document_ids), read from the tokens independently."""
    docs = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        d = 0
        for t in range(tokens.shape[1]):
            docs[b, t] = d
            d += int(tokens[b, t] == EOS_ID)
    return docs


def build_case(mode: str, seed: int) -> tuple[BLT, torch.Tensor]:
    """A tiny BLT with a randomly initialised entropy model attached, patching `mode`, and a
    (B, T) batch. Entropy thresholds are calibrated to ~3 bytes/patch on this batch (random
    init gives near-uniform entropies, so the default threshold would cut every byte)."""
    v = variant(seed)
    torch.manual_seed(seed)
    cfg = tiny()
    cfg.patcher.mode = mode
    cfg.patcher.max_patch_length = v.max_patch_length
    cfg.patcher.patch_size = v.patch_size
    cfg.encoder.cross_attn_window = v.cross_window
    cfg.decoder.cross_attn_window = v.cross_window
    cfg.cross_attn_double_residual = v.double_residual
    cfg.hash_embed_mean = v.hash_embed_mean
    cfg.doc_mask = v.doc_mask
    em = EntropyModel(cfg.entropy_model)
    gen = torch.Generator().manual_seed(1000 + seed)
    tokens = text_like_tokens(B, v.T, gen)
    if v.doc_mask:
        tokens = packed_documents(tokens, gen)
    if cfg.patcher.needs_entropy:
        H = em.entropies(tokens, cfg.doc_mask)
        cfg.patcher.threshold, _ = calibrate_threshold(H, tokens, cfg.patcher, TARGET_BYTES_PER_PATCH)
    model = BLT(cfg, em).eval()
    return model, tokens


# ---- results ---------------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    checked: int = 0  # (t, s) pairs or perturbations examined
    n_violations: int = 0
    violations: list = field(default_factory=list)  # the first MAX_EXAMPLES, as tuples
    kinds: dict = field(default_factory=dict)  # violation kind -> count
    problems: list = field(default_factory=list)  # the check itself could not be trusted
    info: str = ""

    def add(self, violation: tuple) -> None:
        self.n_violations += 1
        self.kinds[violation[0]] = self.kinds.get(violation[0], 0) + 1
        if len(self.violations) < MAX_EXAMPLES:
            self.violations.append(violation)

    @property
    def ok(self) -> bool:
        return self.n_violations == 0 and not self.problems

    def summary(self) -> str:
        s = f"{self.name}: checked {self.checked}, violations {self.n_violations} {self.kinds or ''}"
        if self.violations:
            s += f", e.g. {self.violations[:3]}"
        if self.problems:
            s += f"; PROBLEMS: {self.problems}"
        return s + (f" ({self.info})" if self.info else "")


@contextlib.contextmanager
def deterministic_algorithms():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def leaky_decoder_patch_ids(patch_ids, next_starts_patch=None):
    """The planted leak: the decoder at byte i reads the patch that CONTAINS i, even when that
    patch continues past i (its pooled state then includes bytes > i)."""
    return patch_ids.clone()


@contextlib.contextmanager
def planted_leak():
    """Replace masks.decoder_patch_ids (looked up by blt.model at call time) by the leak."""
    original = M.decoder_patch_ids
    M.decoder_patch_ids = leaky_decoder_patch_ids
    try:
        yield
    finally:
        M.decoder_patch_ids = original


def peeking_entropies(entropy_model):
    """A second planted leak, in the patcher: H'[q] = H[q+1], so whether byte p opens a patch
    depends on byte p itself (an off-by-one in the entropy rule)."""
    real = entropy_model.entropies

    def entropies(tokens, doc_mask=False):
        H = real(tokens, doc_mask)
        return torch.cat([H[:, 1:], H[:, -1:]], dim=1)

    return entropies


@contextlib.contextmanager
def planted_patcher_leak(model: BLT):
    model.entropy_model.entropies = peeking_entropies(model.entropy_model)
    try:
        yield
    finally:
        del model.entropy_model.entropies


# ---- check 1: gradients ----------------------------------------------------------------------


def gradient_check(model: BLT, tokens: torch.Tensor, chunk: int = 32, seed: int = 0) -> CheckResult:
    """d <logits[:, t], w_t> / d emb[:, s] == 0 exactly for all s > t, all t (and, with document
    masking, for all s in an earlier document than t); no cross-row flow.

    The patching is computed once from the tokens and held fixed. The encoder's embedding
    output (byte + hash n-gram embeddings) is replaced by a leaf tensor with the same values.
    All T backward passes are done, `chunk` at a time via is_grads_batched.
    """
    res = CheckResult("gradient")
    Bn, T = tokens.shape
    patching = model.patch(tokens)
    pl, nsp = patching.patch_lengths, patching.next_starts_patch
    patch_ids = M.patch_ids_from_lengths(pl, T)
    docs = documents_of(tokens) if model.cfg.doc_mask else torch.zeros_like(tokens)
    leaf = model.encoder.embed(tokens, docs if model.cfg.doc_mask else None).detach().requires_grad_(True)
    model.encoder.embed = lambda toks, docs=None: leaf  # instance attribute shadows the method
    try:
        logits = model(tokens, patch_lengths=pl, next_starts_patch=nsp).logits
    finally:
        del model.encoder.embed
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(Bn, T, VOCAB_SIZE, generator=gen)
    t_idx = torch.arange(T)
    future = (t_idx[None, :] > t_idx[:, None])[:, None, :]  # (t, 1, s): s > t
    earlier = docs[None, :, :] < docs.T[:, :, None]  # (t, b, s): s in an earlier document of row b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap fallbacks warn about performance
        for c0 in range(0, T, chunk):
            ts = t_idx[c0 : c0 + chunk]
            go = torch.zeros(len(ts), Bn, T, VOCAB_SIZE)
            go[torch.arange(len(ts)), :, ts] = w[:, ts].transpose(0, 1)
            (g,) = torch.autograd.grad(logits, leaf, go, retain_graph=True, is_grads_batched=True)
            nz = (g != 0).any(-1)  # (n, B, T): NaN counts as nonzero
            forbidden = future[ts] | earlier[ts]
            res.checked += int(forbidden.expand(-1, Bn, -1).sum())
            for i, b, s in (nz & forbidden).nonzero().tolist():
                t = int(ts[i])
                if s < t:
                    res.add(("earlier document", b, t, s))
                    continue
                same = bool(patch_ids[b, s] == patch_ids[b, t])
                res.add(("future", b, t, s, "same patch" if same else "later patch"))
            # Not vacuous: the output at t depends on the byte at t itself.
            if not bool(nz[torch.arange(len(ts)), :, ts].all()):
                res.problems.append(f"zero gradient w.r.t. the current byte for some t in [{c0}, {c0 + len(ts)})")
        for b in range(Bn):
            (g,) = torch.autograd.grad((logits[b] * w[b]).sum(), leaf, retain_graph=True)
            nz = (g != 0).any(-1)
            for other in range(Bn):
                if other == b:
                    if not bool(nz[b].any()):
                        res.problems.append(f"row {b}: zero gradient w.r.t. its own inputs")
                    continue
                res.checked += T
                for s in nz[other].nonzero().flatten().tolist():
                    res.add(("cross-row", b, other, s))
    lengths = pl[pl > 0]
    res.info = f"{len(lengths)} patches, lengths {int(lengths.min())}..{int(lengths.max())}"
    return res


# ---- check 2: perturbations ------------------------------------------------------------------


def _starts(patching, T: int) -> torch.Tensor:
    """(B, T+1) bool: byte p opens a patch (p = T: the next byte), recovered from a Patching."""
    ids = M.patch_ids_from_lengths(patching.patch_lengths, T)
    starts = torch.ones(ids.shape[0], T + 1, dtype=torch.bool)
    starts[:, 1:T] = ids[:, 1:] != ids[:, :-1]
    starts[:, T] = patching.next_starts_patch
    return starts


def _run_fixed_shape(model: BLT, tokens: torch.Tensor, backend: str | None):
    """Entropy model -> patcher -> model, with patch_lengths zero-padded to T columns."""
    T = tokens.shape[1]
    patching = model.patch(tokens)
    pl = patching.patch_lengths
    pl = torch.cat([pl, pl.new_zeros(pl.shape[0], T - pl.shape[1])], dim=1)
    logits = model(tokens, patch_lengths=pl, next_starts_patch=patching.next_starts_patch, backend=backend).logits
    return logits, _starts(patching, T), patching


def perturbation_positions(tokens: torch.Tensor, patching, n_random: int, gen: torch.Generator) -> list[int]:
    """Byte 1, T-1, the first patch starts and non-starts of row 0, and random positions."""
    T = tokens.shape[1]
    starts = _starts(patching, T)[0, :T]
    pos = {1, 2, T - 1}
    pos.update(starts.nonzero().flatten()[1:5].tolist())
    pos.update((~starts).nonzero().flatten()[:4].tolist())
    pos.update((torch.randperm(T - 1, generator=gen)[:n_random] + 1).tolist())
    return sorted(p for p in pos if 1 <= p < T)


def perturbation_check(
    model: BLT, tokens: torch.Tensor, positions=None, n_random: int = 16, backend: str | None = None, seed: int = 0
) -> CheckResult:
    """Change bytes >= s, recompute entropies, patches and logits; nothing before s may move."""
    res = CheckResult("perturbation" + (f"[{backend}]" if backend else ""))
    Bn, T = tokens.shape
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), deterministic_algorithms():
        base, base_starts, patching = _run_fixed_shape(model, tokens, backend)
        again, _, _ = _run_fixed_shape(model, tokens, backend)
        if not torch.equal(base, again):
            res.problems.append("two identical forwards differ: not deterministic, bitwise checks meaningless")
        # The padding to T patches must not change what the model computes (up to rounding).
        plain = model(tokens, backend=backend).logits
        if not torch.allclose(plain, base, atol=1e-4, rtol=0):
            res.problems.append(f"padding patch_lengths changed logits by {(plain - base).abs().max():.2e}")
        if positions is None:
            positions = perturbation_positions(tokens, patching, n_random, gen)
        for s in positions:
            toks = tokens.clone()
            toks[0, s] = OFFSET + (toks[0, s] - OFFSET + 1 + torch.randint(0, 255, (), generator=gen)) % 256
            toks[1:, s:] = OFFSET + torch.randint(0, 256, (Bn - 1, T - s), generator=gen)
            toks[1:, s] = OFFSET + (tokens[1:, s] - OFFSET + 1 + torch.randint(0, 255, (Bn - 1,), generator=gen)) % 256
            logits, starts, _ = _run_fixed_shape(model, toks, backend)
            for b in range(Bn):
                res.checked += 1
                moved = (logits[b, :s] != base[b, :s]).any(-1).nonzero().flatten()
                if len(moved):
                    t = int(moved[0])
                    res.add(("logits", b, s, t, float((logits[b, :s] - base[b, :s]).abs().max())))
                moved = (starts[b, : s + 1] != base_starts[b, : s + 1]).nonzero().flatten()
                if len(moved):
                    res.add(("patch_starts", b, s, int(moved[0])))
        # Rows are independent: rewrite all of one row, the other must not move at all.
        for b in range(Bn):
            toks = tokens.clone()
            toks[b, 1:] = OFFSET + torch.randint(0, 256, (T - 1,), generator=gen)
            logits, starts, _ = _run_fixed_shape(model, toks, backend)
            for other in range(Bn):
                if other != b:
                    res.checked += 1
                    same = torch.equal(logits[other], base[other]) and torch.equal(starts[other], base_starts[other])
                    if not same:
                        res.add(("cross-row", b, other))
    res.info = f"{len(positions)} positions"
    return res


# ---- check 3: documents ----------------------------------------------------------------------


def document_check(model: BLT, tokens: torch.Tensor, trials: int = 8, backend: str | None = None,
                   seed: int = 0) -> CheckResult:  # fmt: skip
    """With document masking: change bytes of an earlier document (row 0: one byte; row 1: every
    byte from there to its EOS, which stays), recompute entropies, patches and logits; every
    later document's patch starts must not move, nor its logits (bitwise where the earlier
    documents keep their patch count, else to SHIFT_TOLERANCE: see the module docstring)."""
    res = CheckResult("documents" + (f"[{backend}]" if backend else ""))
    Bn, T = tokens.shape
    docs = documents_of(tokens)
    gen = torch.Generator().manual_seed(seed)
    shifted = 0
    with torch.no_grad(), deterministic_algorithms():
        base, base_starts, _ = _run_fixed_shape(model, tokens, backend)
        for _ in range(trials):
            toks, where = tokens.clone(), []
            for b in range(Bn):
                d = int(torch.randint(0, int(docs[b, -1]), (), generator=gen))  # not the last document
                inside = ((docs[b] == d) & (tokens[b] != EOS_ID)).nonzero().flatten()
                s = int(inside[torch.randint(0, len(inside), (), generator=gen)])
                end = int(inside[-1]) + 1 if b > 0 else s + 1
                shift = 1 + torch.randint(0, 255, (end - s,), generator=gen)  # another byte, never a special id
                toks[b, s:end] = OFFSET + (tokens[b, s:end] - OFFSET + shift) % 256
                where.append((s, int((docs[b] > d).nonzero()[0])))  # the byte changed, the next document's start
            logits, starts, _ = _run_fixed_shape(model, toks, backend)
            for b, (s, later) in enumerate(where):
                res.checked += 1
                if torch.equal(logits[b, s], base[b, s]):
                    res.problems.append(f"row {b}: changing byte {s} left its own logits unchanged")
                moved = (starts[b, later:] != base_starts[b, later:]).nonzero().flatten()
                if len(moved):
                    res.add(("patch_starts", b, s, later + int(moved[0])))
                diff = float((logits[b, later:] - base[b, later:]).abs().max())
                same_count = bool(starts[b, :later].sum() == base_starts[b, :later].sum())
                shifted += not same_count
                if diff > (0.0 if same_count else SHIFT_TOLERANCE):
                    res.add(("logits", b, s, later, diff))
    res.info = f"{trials} trials x {Bn} rows, {shifted} with an earlier patch count changed"
    return res


@contextlib.contextmanager
def planted_document_leak():
    """The BLT's stacks without document masks (every byte in document 0): its attentions and
    hash n-grams cross documents; the patcher (entropy model included) still splits them."""
    original = M.document_ids
    M.document_ids = torch.zeros_like
    try:
        yield
    finally:
        M.document_ids = original


# ---- pytest ----------------------------------------------------------------------------------

CASES = [(m, s) for m in MODES for s in SEEDS]
CASE_IDS = [f"{m}-seed{s}" for m, s in CASES]


def _assert_mixed(model, tokens, mode):
    pl = model.patch(tokens).patch_lengths
    if mode != "byte":
        assert int(pl.max()) >= 2, f"{mode}: every patch is one byte; the gate would not exercise patches"


@pytest.mark.parametrize(("mode", "seed"), CASES, ids=CASE_IDS)
def test_gradient_causality(mode, seed):
    model, tokens = build_case(mode, seed)
    _assert_mixed(model, tokens, mode)
    res = gradient_check(model, tokens, seed=seed)
    assert res.ok, res.summary()


@pytest.mark.parametrize(("mode", "seed"), CASES, ids=CASE_IDS)
def test_perturbation_causality(mode, seed):
    model, tokens = build_case(mode, seed)
    _assert_mixed(model, tokens, mode)
    res = perturbation_check(model, tokens, seed=seed)
    assert res.ok, res.summary()


@pytest.mark.parametrize("mode", ["entropy", "space"])
def test_perturbation_causality_flex(mode):
    """The FlexAttention masks (eager on CPU, no grad) obey the same contract."""
    model, tokens = build_case(mode, 1)
    res = perturbation_check(model, tokens, n_random=6, backend="flex", seed=1)
    assert res.ok, res.summary()


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "static", "space"])
def test_document_causality(mode):
    """Document masking: an earlier document of the window reaches no later one."""
    model, tokens = build_case(mode, 1)
    assert model.cfg.doc_mask and int(documents_of(tokens)[:, -1].min()) == 2  # three documents a row
    res = document_check(model, tokens, seed=1)
    assert res.ok, res.summary()


def test_document_causality_flex():
    model, tokens = build_case("entropy", 1)
    res = document_check(model, tokens, trials=3, backend="flex", seed=1)
    assert res.ok, res.summary()


def test_gate_detects_planted_document_leak():
    model, tokens = build_case("space", 1)
    with planted_document_leak():
        res = document_check(model, tokens, trials=4, seed=1)
    assert not res.problems, res.summary()
    assert res.kinds.get("logits", 0) > 0, res.summary()
    assert document_check(model, tokens, trials=4, seed=1).ok  # removed again


@pytest.mark.parametrize("mode", ["entropy", "static"])
def test_gate_detects_planted_leak(mode, monkeypatch):
    model, tokens = build_case(mode, 0)
    monkeypatch.setattr(M, "decoder_patch_ids", leaky_decoder_patch_ids)
    grad = gradient_check(model, tokens)
    assert not grad.problems, grad.summary()
    assert grad.n_violations > 0, "gradient check missed the planted leak"
    # It finds exactly the leak: every pair t < s inside one patch, nothing else.
    pl = model.patch(tokens).patch_lengths
    assert grad.n_violations == int((pl * (pl - 1) // 2).sum()), grad.summary()
    assert all(v[0] == "future" and v[4] == "same patch" for v in grad.violations), grad.summary()
    pert = perturbation_check(model, tokens, n_random=8)
    assert not pert.problems, pert.summary()
    assert pert.n_violations > 0, "perturbation check missed the planted leak"
    assert all(v[0] == "logits" for v in pert.violations), pert.summary()


def test_gate_detects_planted_patcher_leak():
    model, tokens = build_case("entropy", 0)
    with planted_patcher_leak(model):
        pert = perturbation_check(model, tokens, n_random=8)
    assert not pert.problems, pert.summary()
    assert pert.kinds.get("patch_starts", 0) > 0 and pert.kinds.get("logits", 0) > 0, pert.summary()
    assert perturbation_check(model, tokens, n_random=8).ok  # removed again


def test_planted_leak_is_removed():
    """The context manager restores the real decoder ids (so main() cannot poison later runs)."""
    original = M.decoder_patch_ids
    with planted_leak():
        assert M.decoder_patch_ids is leaky_decoder_patch_ids
    assert M.decoder_patch_ids is original


# ---- python -m blt.tests.test_causality ------------------------------------------------------


def main() -> int:
    torch.set_num_threads(int(os.environ.get("BLT_TEST_THREADS", "1")))
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    rows = []

    def record(mode, seed, test, fn, expect_fail=False):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        if expect_fail:
            passed = res.n_violations > 0 and not res.problems
            verdict = "PASS (leak detected)" if passed else "FAIL (leak missed)"
        else:
            passed = res.ok
            verdict = "PASS" if passed else "FAIL"
        rows.append((mode, str(seed), test, verdict, f"{res.n_violations}/{res.checked}", f"{dt:.1f}s", passed, res))

    for mode, seed in CASES:
        model, tokens = build_case(mode, seed)
        record(mode, seed, "gradient", lambda: gradient_check(model, tokens, seed=seed))
        record(mode, seed, "perturbation", lambda: perturbation_check(model, tokens, seed=seed))
    for mode in ("entropy", "space"):
        model, tokens = build_case(mode, 1)
        record(mode, 1, "perturbation[flex]",
               lambda: perturbation_check(model, tokens, n_random=6, backend="flex", seed=1))
    for mode in ("entropy", "monotonic", "static", "space"):
        model, tokens = build_case(mode, 1)
        record(mode, 1, "documents", lambda: document_check(model, tokens, seed=1))
    model, tokens = build_case("entropy", 1)
    record("entropy", 1, "documents[flex]", lambda: document_check(model, tokens, trials=3, backend="flex", seed=1))
    model, tokens = build_case("space", 1)
    with planted_document_leak():
        record("space", 1, "planted-document-leak", lambda: document_check(model, tokens, trials=4, seed=1),
               expect_fail=True)  # fmt: skip
    for mode in ("entropy", "static"):
        model, tokens = build_case(mode, 0)
        with planted_leak():
            record(mode, 0, "planted-leak gradient", lambda: gradient_check(model, tokens), expect_fail=True)
            record(mode, 0, "planted-leak perturbation",
                   lambda: perturbation_check(model, tokens, n_random=8), expect_fail=True)
    model, tokens = build_case("entropy", 0)
    with planted_patcher_leak(model):
        record("entropy", 0, "planted-patcher-leak perturbation",
               lambda: perturbation_check(model, tokens, n_random=8), expect_fail=True)

    header = ("mode", "seed", "test", "result", "violations/checked", "time")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r[:6]))
    failed = [r for r in rows if not r[6]]
    print()
    for r in failed:
        print(f"FAILED {r[0]} seed {r[1]} {r[2]}: {r[7].summary()}")
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
