"""Numerical parity with transformers' BltForCausalLM (the HF port) through blt.convert_hf.

Random small HF configs (float32, seeded); the same ids and patch lengths go to both models.
Run with `pytest -s` to see the max |logit diff| of every comparison.

Needs transformers >= 5.23, the first release whose port has sliding windows
(`local_attention_window_len`, `patcher_config.sliding_window`); before it the port attends over
the whole causal context and nine of these tests fail by up to 6.8 in the logits. The module is
skipped, saying so, with an older transformers.
"""

import dataclasses

import pytest
import torch

MIN_TRANSFORMERS = "5.23"
transformers = pytest.importorskip("transformers")
from transformers import BltConfig, BltForCausalLM  # noqa: E402

if not hasattr(BltConfig(), "local_attention_window_len"):
    pytest.skip(
        f"transformers {transformers.__version__} is older than {MIN_TRANSFORMERS}: its BLT port has no sliding "
        f"windows (local_attention_window_len); pip install 'transformers>={MIN_TRANSFORMERS},<6'",
        allow_module_level=True,
    )

from blt.checkpoint import load_hf_checkpoint  # noqa: E402
from blt.config import BLTConfig  # noqa: E402
from blt.convert_hf import (  # noqa: E402
    from_hf_model,
    hf_config_from_ours,
    our_config_from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf_model,
)
from blt.entropy_model import EntropyModel  # noqa: E402
from blt.model import BLT  # noqa: E402
from blt.tokens import BOS_ID  # noqa: E402

TOL = 1e-4

# name -> (HF BltConfig kwargs, attention implementation, T, number of patches)
CONFIGS = {
    # k=2, k·d_enc == d_global (no projection), GQA everywhere, decoder cross-attn at every layer
    "A": (
        dict(
            cross_attn_k=2,
            local_attention_window_len=16,
            encoder_hash_byte_group_size=[3, 4, 5],
            encoder_hash_byte_group_vocab=37,
            encoder_hash_byte_group_nb_functions=1,
            encoder_config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                intermediate_size=72, cross_attn_k=2, hidden_size_global=64),
            decoder_config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                                intermediate_size=80, cross_attn_all_layers=True, cross_attn_k=2,
                                hidden_size_global=64),
            global_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                               intermediate_size=96),
            patcher_config=dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                                sliding_window=24),
        ),
        "eager", 160, 40,
    ),
    # k=3, projection 144 -> 80, MQA encoder, decoder cross-attn only before layer 0, two hash
    # functions, legacy rope_theta key, other eps / theta values
    "B": (
        dict(
            cross_attn_k=3,
            local_attention_window_len=33,
            encoder_hash_byte_group_size=[2, 3, 4, 6],
            encoder_hash_byte_group_vocab=53,
            encoder_hash_byte_group_nb_functions=2,
            encoder_config=dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=1,
                                intermediate_size=None, cross_attn_k=3, hidden_size_global=80, rope_theta=10000.0,
                                rms_norm_eps=1e-6),
            decoder_config=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3,
                                intermediate_size=64, cross_attn_all_layers=False, cross_attn_k=3,
                                hidden_size_global=80, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
            global_config=dict(hidden_size=80, num_attention_heads=5, num_hidden_layers=1, intermediate_size=128),
            patcher_config=dict(hidden_size=24, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                                intermediate_size=48, sliding_window=None),
        ),
        "sdpa", 128, 30,
    ),
    # k=1, projection 40 -> 56, full causal byte attention (window None), n-gram sizes 1/3/8
    "C": (
        dict(
            cross_attn_k=1,
            local_attention_window_len=None,
            encoder_hash_byte_group_size=[1, 3, 8],
            encoder_hash_byte_group_vocab=101,
            encoder_hash_byte_group_nb_functions=2,
            encoder_config=dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=2, intermediate_size=88,
                                cross_attn_k=1, hidden_size_global=56),
            decoder_config=dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                                intermediate_size=72, cross_attn_all_layers=True, cross_attn_k=1,
                                hidden_size_global=56),
            global_config=dict(hidden_size=56, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                               intermediate_size=112),
            patcher_config=dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=40,
                                sliding_window=12),
        ),
        "eager", 192, 45,
    ),
    # k=2 with a projection (64 -> 96), window 1 (a byte sees only itself), one hash function
    "D": (
        dict(
            cross_attn_k=2,
            local_attention_window_len=1,
            encoder_hash_byte_group_size=[3, 5],
            encoder_hash_byte_group_vocab=17,
            encoder_hash_byte_group_nb_functions=1,
            encoder_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=48,
                                cross_attn_k=2, hidden_size_global=96),
            decoder_config=dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
                                cross_attn_all_layers=False, cross_attn_k=2, hidden_size_global=96),
            global_config=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=1,
                               intermediate_size=160),
            patcher_config=dict(hidden_size=16, num_attention_heads=1, num_hidden_layers=1, intermediate_size=32,
                                sliding_window=8),
        ),
        "sdpa", 100, 25,
    ),
}  # fmt: skip


def _perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm weights start at 1, which would hide a swapped q_norm/k_norm: randomise them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def _hf_model(name: str) -> BltForCausalLM:
    kwargs, attn, _, _ = CONFIGS[name]
    torch.manual_seed(1000 + ord(name))
    hf = BltForCausalLM._from_config(BltConfig(**kwargs), attn_implementation=attn).eval()
    _perturb_norms(hf, torch.Generator().manual_seed(ord(name)))
    return hf


def _inputs(name: str, B: int = 2):
    """Random ids (BOS first) and patch lengths (BOS patch of 1, same patch count per row)."""
    _, _, T, P = CONFIGS[name]
    gen = torch.Generator().manual_seed(7 + ord(name))
    ids = torch.randint(4, 260, (B, T), generator=gen)
    ids[:, 0] = BOS_ID
    rows = []
    for _ in range(B):
        cuts = (torch.randperm(T - 2, generator=gen)[: P - 2] + 2).sort().values.tolist()
        starts = [0, 1] + cuts + [T]
        rows.append([b - a for a, b in zip(starts[:-1], starts[1:])])
    lengths = torch.tensor(rows)
    assert (lengths > 0).all() and (lengths.sum(1) == T).all() and (lengths[:, 0] == 1).all()
    return ids, lengths


def _hf_logits(hf, ids, lengths):
    return hf(input_ids=ids, patch_lengths=lengths, use_cache=False).logits


def _compare(hf, ours, ids, lengths, label):
    """Logits of both models for the same patches; returns the max |diff| over all checks."""
    B = ids.shape[0]
    with torch.no_grad():
        # HF's decoder derives its patch ids from patch_lengths[:, 1:]: with lengths summing to T
        # the last patch is never visible (ours: next_starts_patch=False) ...
        hf_out = _hf_logits(hf, ids, lengths)
        ours_out = ours(ids, patch_lengths=lengths, next_starts_patch=torch.zeros(B, dtype=torch.bool)).logits
        d_incomplete = (hf_out - ours_out).abs().max().item()
        # ... and a trailing zero-length patch (what HF's own patcher emits when byte T opens a
        # patch) makes it visible at the last byte: ours with next_starts_patch None (or True).
        hf_out = _hf_logits(hf, ids, torch.cat([lengths, torch.zeros(B, 1, dtype=lengths.dtype)], 1))
        ours_out = ours(ids, patch_lengths=lengths).logits
        d_complete = (hf_out - ours_out).abs().max().item()
        # entropy model vs HF patcher (sliding window patcher_config.sliding_window)
        _, _, hf_patcher_logits = hf.model.patcher(ids, patch_size=None)
        d_entropy = (hf_patcher_logits - ours.entropy_model(ids)).abs().max().item()
    print(
        f"\n[{label}] max|logits diff|: last patch incomplete {d_incomplete:.3g}, "
        f"last patch complete {d_complete:.3g}, entropy model {d_entropy:.3g}"
    )
    assert d_incomplete <= TOL and d_complete <= TOL and d_entropy <= TOL
    return max(d_incomplete, d_complete, d_entropy)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_to_ours(name):
    hf = _hf_model(name)
    ours = from_hf_model(hf)
    c, h = ours.cfg, hf.config
    assert c.cross_attn_double_residual and not c.hash_embed_mean
    assert c.encoder.window == c.decoder.window == h.local_attention_window_len
    assert c.entropy_model.window == h.patcher_config.sliding_window
    assert c.entropy_model.rope_theta == h.patcher_config.rope_parameters["rope_theta"]
    for ours_part, hf_part in ((c.encoder, h.encoder_config), (c.decoder, h.decoder_config),
                               (c.global_model, h.global_config), (c.entropy_model, h.patcher_config)):  # fmt: skip
        assert (ours_part.dim, ours_part.n_layers, ours_part.n_heads, ours_part.kv_heads, ours_part.hidden) == (
            hf_part.hidden_size, hf_part.num_hidden_layers, hf_part.num_attention_heads,
            hf_part.num_key_value_heads, hf_part.intermediate_size,
        )  # fmt: skip
        assert ours_part.rope_theta == hf_part.rope_parameters["rope_theta"]
        assert ours_part.norm_eps == hf_part.rms_norm_eps
    assert (ours.global_model.in_proj is None) == (ours.cfg.global_input_dim == ours.cfg.global_model.dim)
    ids, lengths = _inputs(name)
    _compare(hf, ours, ids, lengths, f"{name} hf->ours")
    # the converted weights are copies: the HF model keeps its own
    assert ours.encoder.tok_embeddings.weight.data_ptr() != hf.model.local_encoder.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_to_hf_and_round_trip(name):
    cfg = our_config_from_hf(CONFIGS[name][0])
    torch.manual_seed(2000 + ord(name))
    ours = BLT(cfg, EntropyModel(cfg.entropy_model)).eval()
    _perturb_norms(ours, torch.Generator().manual_seed(3 + ord(name)))
    hf = to_hf_model(ours, attn_implementation=CONFIGS[name][1])
    ids, lengths = _inputs(name)
    _compare(hf, ours, ids, lengths, f"{name} ours->hf")

    # state dicts: ours -> hf -> ours and hf -> ours -> hf are bitwise identical, keys included
    sd = ours.state_dict()
    hf_sd = state_dict_to_hf(sd, cfg)
    assert set(hf_sd) == set(hf.state_dict())
    back = state_dict_from_hf(hf_sd, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    hf_sd2 = hf.state_dict()
    again = state_dict_to_hf(state_dict_from_hf(hf_sd2, cfg), cfg)
    assert all(torch.equal(again[k], hf_sd2[k]) for k in hf_sd2)
    back2 = from_hf_model(hf).state_dict()
    assert all(torch.equal(back2[k], sd[k]) for k in sd)

    # configs: ours -> hf -> ours is the identity; a config.json dict (HF defaults for missing
    # keys, legacy rope_theta) gives the same as the instantiated BltConfig
    assert our_config_from_hf(BltConfig(**hf_config_from_ours(cfg))) == cfg
    assert our_config_from_hf(hf.config) == cfg
    assert our_config_from_hf(BltConfig(**CONFIGS[name][0])) == cfg


def test_hf_defaults_table():
    """Our copy of HF's class defaults (used for config.json dicts) matches transformers."""
    assert our_config_from_hf({"model_type": "blt"}) == our_config_from_hf(BltConfig())
    assert our_config_from_hf(BltConfig().to_dict()) == our_config_from_hf(BltConfig())


def test_end_to_end_entropy_patching():
    """Without patch_lengths both models patch with their entropy model; same patches, same logits."""
    hf = _hf_model("A")
    ours = from_hf_model(hf)
    ids, _ = _inputs("A", B=1)
    with torch.no_grad():
        H = ours.entropy_model.entropies(ids)[0, 1:].sort().values
    threshold = float((H[len(H) // 2] + H[len(H) // 2 + 1]) / 2)  # halfway between two entropies: no ties
    hf.config.patching_threshold = threshold
    ours.cfg.patcher.threshold = threshold
    with torch.no_grad():
        _, hf_lengths, _ = hf.model.patcher(ids, patch_size=hf.config.patch_size, threshold=threshold)
        patching = ours.patch(ids)
        hf_out = hf(input_ids=ids, use_cache=False).logits
        ours_out = ours(ids).logits
    hf_lengths = hf_lengths[0].tolist()
    trailing_zero = hf_lengths[-1] == 0
    assert hf_lengths[: len(hf_lengths) - trailing_zero] == patching.patch_lengths[0].tolist()
    assert trailing_zero == bool(patching.next_starts_patch[0])
    assert len(hf_lengths) > 10  # the threshold really cuts patches
    diff = (hf_out - ours_out).abs().max().item()
    print(f"\n[A end-to-end entropy patching, {len(hf_lengths)} patches] max|logits diff| {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("shard", [False, True])
def test_load_hf_checkpoint(tmp_path, shard):
    hf = _hf_model("B")
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "50GB")
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()
    ours = load_hf_checkpoint(tmp_path)
    ref = from_hf_model(hf)
    assert ours.cfg == ref.cfg
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(sd) == set(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    ids, lengths = _inputs("B")
    with torch.no_grad():
        diff = (ours(ids, patch_lengths=lengths).logits - ref(ids, patch_lengths=lengths).logits).abs().max().item()
    assert diff == 0.0


def test_unrepresentable_configs():
    base = CONFIGS["A"][0]
    enc_all = {**base, "encoder_config": {**base["encoder_config"], "cross_attn_all_layers": True}}
    with pytest.raises(ValueError, match="re-pools"):
        our_config_from_hf(enc_all)
    widths = {**base, "decoder_config": {**base["decoder_config"], "hidden_size": 48, "num_attention_heads": 4}}
    with pytest.raises(ValueError, match="hidden_size"):
        our_config_from_hf(widths)
    k_mismatch = {**base, "decoder_config": {**base["decoder_config"], "cross_attn_k": 3}}
    with pytest.raises(ValueError, match="cross_attn_k"):
        our_config_from_hf(k_mismatch)
    cfg = our_config_from_hf(base)
    for change in (
        dict(hash_embed_mean=True),
        dict(cross_attn_double_residual=False),
        dict(decoder=dataclasses.replace(cfg.decoder, window=8)),
        dict(global_model=dataclasses.replace(cfg.global_model, window=4)),
        dict(patcher=dataclasses.replace(cfg.patcher, mode="space")),
    ):
        with pytest.raises(ValueError):
            hf_config_from_ours(dataclasses.replace(cfg, **change))
    assert isinstance(cfg, BLTConfig)
