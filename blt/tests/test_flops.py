"""The FLOP counter (blt.flops) against torch's own count of the products a forward runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import blt.masks as M
from blt.config import tiny
from blt.entropy_model import EntropyModel
from blt.flops import blt_flops_per_byte, mean_context, transformer_flops_per_byte
from blt.model import BLT
from blt.tokens import BOS_ID, OFFSET

MATMULS = {"mm", "addmm", "bmm"}


def matmul_flops(fn) -> int:
    """FLOPs of the matrix products (not attention kernels) that torch counts while fn() runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if op.__name__.split(".")[0] in MATMULS)


@pytest.mark.parametrize("T", [1, 10, 100])
@pytest.mark.parametrize("window", [None, 1, 7, 64, 200])
def test_mean_context_is_the_masks_mean_row(T, window):
    """mean_context (keys a causal query sees, on average) is the mean row count of the mask."""
    mask = M.causal_mask(T, window, "dense", "cpu")
    assert mean_context(T, window) == pytest.approx(mask.sum(-1).double().mean().item())


@pytest.mark.parametrize("variant", ["tiny", "projected", "windows"])
@torch.no_grad()
def test_blt_flops_match_torch_count(variant):
    """Without attention (attention=False), blt_flops_per_byte's forward is exactly the weight
    products torch counts in a forward on patches of a fixed size: every projection, feed-forward,
    pooling, patch-to-key and output product, in the encoder, global model and decoder."""
    cfg = tiny()
    cfg.patcher.mode = "static"
    if variant == "projected":  # k·d_encoder != d_global: a projection into the global model
        cfg.global_model.dim, cfg.global_model.n_heads = 48, 4
    if variant == "windows":  # cross-attention windows, cross-attention in every layer
        cfg.encoder.cross_attn_window, cfg.decoder.cross_attn_window = 2, 3
        cfg.encoder.cross_attn_all_layers = cfg.decoder.cross_attn_all_layers = True
    cfg.validate()
    torch.manual_seed(0)
    model = BLT(cfg, EntropyModel(cfg.entropy_model)).eval()
    B, T, size = 2, 48, 4
    tokens = torch.randint(OFFSET, OFFSET + 256, (B, T))
    tokens[:, 0] = BOS_ID
    lengths = torch.full((B, T // size), size)
    counted = matmul_flops(lambda: model(tokens, patch_lengths=lengths))
    assert counted > 0
    expected = blt_flops_per_byte(cfg, size, T, attention=False).forward * B * T
    assert counted == pytest.approx(expected, rel=1e-9)
    # with attention, more: the scores and weighted values on top
    assert blt_flops_per_byte(cfg, size, T).forward > blt_flops_per_byte(cfg, size, T, attention=False).forward


@torch.no_grad()
def test_entropy_model_flops_match_torch_count():
    """The entropy model's forward FLOPs per byte, without attention, are its weight products
    as torch counts them; transformer_flops_per_byte (the byte-level baseline) counts the same
    model the same way."""
    cfg = tiny()
    torch.manual_seed(0)
    em = EntropyModel(cfg.entropy_model).eval()
    B, T = 2, 40
    tokens = torch.randint(OFFSET, OFFSET + 256, (B, T))
    counted = matmul_flops(lambda: em(tokens))
    no_attn = blt_flops_per_byte(cfg, 4.0, T, attention=False).entropy_model
    assert counted == pytest.approx(no_attn * B * T, rel=1e-9)
    with_attn = blt_flops_per_byte(cfg, 4.0, T).entropy_model
    assert transformer_flops_per_byte(cfg.entropy_model, T) == pytest.approx(with_attn)
    e = cfg.entropy_model
    attn = e.n_layers * 2 * 2 * mean_context(T, e.window) * e.n_heads * e.head_dim
    assert with_attn - no_attn == pytest.approx(attn)
