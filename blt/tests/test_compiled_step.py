"""The compiled training step (blt.train --one-graph) against the eager reference: the loss and
every parameter's gradient.

On CUDA the compiled step runs everything the speed benchmarks measure: FlexAttention block
masks (FlashAttention-4's kernels with --attention flash or fa4, where installed), the byte <-> patch
Triton kernels, fused products and their kernels, packed global rows, bf16 autocast. The
reference is the same model run eagerly in float32 on dense masks. A kernel that skipped
part of its work (a key block of a sliding window, a patch's bytes) would show as a gradient
far outside bf16 rounding. On CPU the same comparison runs the one-graph path's padding and
packing eagerly, on dense masks. Each also runs with document masking on rows that pack
several documents (FlexAttention's Triton kernels: FlashAttention-4's take no document masks).
"""

import pytest
import torch

from blt import fa4
from blt.config import BLTConfig, EntropyModelConfig, GlobalConfig, LocalDecoderConfig, LocalEncoderConfig, PatcherConfig
from blt.entropy_model import EntropyModel
from blt.layers import set_flex_backend, set_fused_products
from blt.model import BLT
from blt.one_graph import OneGraph


def config(window: int, doc_mask: bool) -> BLTConfig:
    """Head width 64 as the bench preset's; windows shorter than the rows, so that the
    sliding-window masks have partial and skipped blocks."""
    return BLTConfig(
        doc_mask=doc_mask,
        entropy_model=EntropyModelConfig(dim=32, n_layers=1, n_heads=2, window=window),
        patcher=PatcherConfig(mode="entropy", threshold=1.0, max_patch_length=12),
        encoder=LocalEncoderConfig(dim=128, n_layers=1, n_heads=2, window=window, hash_rows=1009),
        global_model=GlobalConfig(dim=256, n_layers=2, n_heads=4),
        decoder=LocalDecoderConfig(dim=128, n_layers=2, n_heads=2, window=window),
        cross_attn_k=2,
    ).validate()


def relative_errors(device: str, T: int, window: int, amp: bool, doc_mask: bool = False):
    """|x - reference| / |reference| of the loss and of each parameter's gradient, for x the
    compiled step and for x the eager model on dense masks in the same precision (the rounding
    any correct kernel shows); the reference is the eager model in float32 on dense masks.
    doc_mask: document masking, on rows of several documents."""
    torch.manual_seed(0)
    cfg = config(window, doc_mask)
    model = BLT(cfg, EntropyModel(cfg.entropy_model)).to(device)
    model.pack_patches = True
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 260, (2, T + 1), generator=g)
    tokens[:, 0] = 1
    if doc_mask:  # an EOS and the next document's BOS, at places that differ between rows
        ends = torch.randint(T // 8, T // 4, (2, 3), generator=g).cumsum(1)
        for b in range(2):
            tokens[b, ends[b]], tokens[b, ends[b] + 1] = 2, 1
    entropies = torch.rand(2, T, generator=g) * 2  # precomputed entropies: varied patch lengths
    tokens, entropies = tokens.to(device), entropies.to(device)

    def grads(loss):
        loss.backward()
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.item(), out

    one_graph = OneGraph(model, torch.device(device), accumulate=False)
    with torch.autocast(device, torch.bfloat16, enabled=amp):
        loss, patching = one_graph((tokens, entropies))
    compiled = grads(loss)

    def eager():
        args = (tokens[:, :-1], tokens[:, 1:], patching.patch_lengths, patching.next_starts_patch)
        return model(*args, backend="dense").loss

    reference = grads(eager())
    with torch.autocast(device, torch.bfloat16, enabled=amp):
        rounded = grads(eager())

    def errors(result):
        loss, got = result
        out = {"loss": abs(loss - reference[0]) / reference[0]}
        for n, ref in reference[1].items():
            assert n in got, f"{n}: no gradient"
            out[n] = ((got[n] - ref).norm() / ref.norm().clamp(min=1e-12)).item()
        return out

    return errors(compiled), errors(rounded)


@pytest.mark.parametrize("doc_mask", [False, True])
def test_one_graph_path_matches_reference_on_cpu(doc_mask):
    errors, _ = relative_errors("cpu", T=128, window=32, amp=False, doc_mask=doc_mask)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("attention", "fused", "doc_mask"),
                         [("triton", True, False), ("flash", False, False), ("flash", True, False), ("fa4", True, False),
                          ("triton", True, True), ("triton", False, True)])  # fmt: skip
def test_compiled_step_matches_reference_on_cuda(attention, fused, doc_mask):
    """bf16 autocast against float32, on each attention backend (FlashAttention-4's where it is
    installed): each error within twice the eager bf16 model's own (plus 1%). bf16 keeps 8 bits,
    so the smallest gradients (the encoder attention's) are a few percent off in any correct
    kernel; a skipped key block or patch is tens of percent off."""
    if attention != "triton" and not fa4.available():
        pytest.skip("needs flash-attn-4")
    set_flex_backend(attention)
    set_fused_products(fused)
    try:
        errors, rounding = relative_errors("cuda", T=1024, window=256, amp=True, doc_mask=doc_mask)
    finally:
        set_flex_backend("triton")
        set_fused_products(False)
    bad = {n: (round(e, 4), round(rounding[n], 4)) for n, e in errors.items() if e > 2 * rounding[n] + 0.01}
    assert not bad, f"(compiled, eager bf16) errors against float32 ({attention}): {bad}"
