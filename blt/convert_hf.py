"""Conversion between our `BLT` and transformers' `BltForCausalLM` (the HF port of BLT).

transformers is NOT imported at module import time (it is a test-only dependency): only
`to_hf_model` imports it. Everything else works on plain dicts and tensors, so
`blt.checkpoint.load_hf_checkpoint` reads an HF checkpoint folder with these functions, without
transformers installed.

    hf_config_from_ours(cfg) -> dict        kwargs for transformers.BltConfig
    our_config_from_hf(hf_cfg) -> BLTConfig hf_cfg: a BltConfig or its dict (config.json)
    state_dict_to_hf(our_sd, cfg) -> dict   key mapping, tensors are shared, not copied
    state_dict_from_hf(hf_sd, cfg) -> dict
    from_hf_state_dict(cfg, hf_sd) -> BLT   a folder's weights
    from_hf_model(hf_model) -> BLT          (weights copied)
    to_hf_model(model) -> BltForCausalLM

What the HF port computes, and how our flags express it:
  * cross-attention adds its residual inside the module and again outside:
    x + (x + attn(x))                           -> cross_attn_double_residual=True
  * hash n-gram embeddings are summed onto the byte embedding, not averaged
                                                -> hash_embed_mean=False
  * ONE sliding window (local_attention_window_len) for encoder and decoder byte
    self-attention; key j is visible to query i iff i - window < j <= i, which is our
    `window`. The global transformer is fully causal; the patcher uses
    patcher_config.sliding_window.
  * the encoder pools queries once when cross-attention is only after the last layer; with
    encoder cross_attn_all_layers=True HF re-pools (max + projection) before every layer's
    cross-attention, which we (like the official code) do not: such configs are refused.
  * decoder masks: HF derives the decoder's patch ids from patch_lengths[:, 1:], so with
    patch lengths summing to T the window's LAST patch is never visible (our
    next_starts_patch=False); a trailing zero-length patch (what HF's own entropy patcher
    emits when byte T would open a patch) makes it visible at the last byte (ours: True).
  * both RoPEs rotate interleaved pairs (x[2m], x[2m+1]): no q/k permutation is needed.
  * no document masking: attention crosses the EOS between packed documents
                                                -> doc_mask=False. A config with doc_mask=True
    exports with a warning: on an input that holds one document (a prompt) both compute the
    same; on packed documents they differ.
"""

from __future__ import annotations

import warnings

import torch

from blt.config import (
    BLTConfig,
    EntropyModelConfig,
    GlobalConfig,
    LocalDecoderConfig,
    LocalEncoderConfig,
    PatcherConfig,
    _ffn_hidden,
)
from blt.tokens import VOCAB_SIZE

__all__ = [
    "hf_config_from_ours",
    "our_config_from_hf",
    "state_dict_to_hf",
    "state_dict_from_hf",
    "from_hf_state_dict",
    "from_hf_model",
    "to_hf_model",
    "model_from_state_dict",
]

# ---- configs -------------------------------------------------------------------------------

# Class defaults of transformers' Blt*Config (5.x), used when a config.json omits a key.
# "intermediate_size": None means int(8/3 · hidden_size), as HF's __post_init__.
_HF_SUB_DEFAULTS = {
    "encoder_config": dict(
        hidden_size=1024, num_attention_heads=16, num_hidden_layers=1, intermediate_size=None,
        rms_norm_eps=1e-5, dropout=0.0, cross_attn_all_layers=False, cross_attn_k=2,
        hidden_size_global=2048, hidden_act="silu", rope_theta=500000.0,
    ),
    "decoder_config": dict(
        hidden_size=1024, num_attention_heads=16, num_hidden_layers=9, intermediate_size=2816,
        rms_norm_eps=1e-5, dropout=0.0, cross_attn_all_layers=True, cross_attn_k=2,
        hidden_size_global=2048, hidden_act="silu", rope_theta=500000.0,
    ),
    "global_config": dict(
        hidden_size=2048, num_attention_heads=16, num_hidden_layers=25, intermediate_size=5632,
        rms_norm_eps=1e-5, dropout=0.0, hidden_act="silu", rope_theta=500000.0,
    ),
    "patcher_config": dict(
        hidden_size=768, num_attention_heads=12, num_hidden_layers=14, intermediate_size=2048,
        rms_norm_eps=1e-5, dropout=0.0, hidden_act="silu", rope_theta=10000.0, sliding_window=512,
    ),
}  # fmt: skip
_HF_TOP_DEFAULTS = dict(
    vocab_size=260, patch_in_forward=True, patch_size=4, patching_mode="entropy",
    patching_threshold=1.335442066192627, max_patch_length=None, local_attention_window_len=512,
    cross_attn_k=2, encoder_hash_byte_group_size=None, encoder_hash_byte_group_vocab=500002,
    encoder_hash_byte_group_nb_functions=1,
)  # fmt: skip
_HF_NGRAM_DEFAULT = [3, 4, 5, 6, 7, 8]
_HF_PATCH_MODES = ("entropy", "byte")  # HF patches by entropy, or (any other mode) every byte


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


def _hf_stack(c, extra: dict) -> dict:
    """Fields shared by every HF sub-config, from one of our TransformerConfigs."""
    return dict(
        hidden_size=c.dim,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        num_hidden_layers=c.n_layers,
        intermediate_size=c.hidden,
        rms_norm_eps=c.norm_eps,
        dropout=c.dropout,
        rope_parameters=_rope(c.rope_theta),
        hidden_act="silu",
        **extra,
    )


def hf_config_from_ours(cfg: BLTConfig, patch_in_forward: bool = True, strict_patching: bool = True) -> dict:
    """Keyword arguments for `transformers.BltConfig` describing the same network as `cfg`.

    patch_in_forward: whether the HF model carries a patcher (our entropy model).
    strict_patching: raise for patching modes HF cannot run (monotonic, combined, static,
    space); with False they are exported as "byte" (HF's fallback) with a warning.
    Raises ValueError for networks the HF port cannot express.
    """
    cfg.validate()
    e, d, g, em, p = cfg.encoder, cfg.decoder, cfg.global_model, cfg.entropy_model, cfg.patcher
    problems = []
    if not cfg.cross_attn_double_residual:
        problems.append("cross_attn_double_residual=False (HF adds the cross-attention residual twice)")
    if cfg.hash_embed_mean:
        problems.append("hash_embed_mean=True (HF sums hash embeddings without averaging)")
    if e.dim != d.dim:
        problems.append(f"encoder width {e.dim} != decoder width {d.dim}")
    if e.window != d.window:
        problems.append(f"encoder window {e.window} != decoder window {d.window} (HF has one local window)")
    if e.cross_attn_all_layers:
        problems.append("encoder.cross_attn_all_layers=True (HF re-pools the queries at every layer)")
    if e.cross_attn_window is not None or d.cross_attn_window is not None:
        problems.append("cross_attn_window other than None (HF: a patch sees only its own bytes)")
    if g.window is not None:
        problems.append("global_model.window other than None (HF's global transformer is fully causal)")
    if problems:
        raise ValueError("cannot express this BLT config as a transformers BltConfig: " + "; ".join(problems))
    if cfg.doc_mask:
        warnings.warn("transformers' BLT port has no document masking: it computes the same as this model on "
                      "inputs of one document only", stacklevel=2)  # fmt: skip
    mode = p.mode
    if mode not in _HF_PATCH_MODES:
        msg = f"HF's BltModel patches only by entropy or per byte, not {mode!r}"
        if strict_patching:
            raise ValueError(msg + " (pass strict_patching=False to export it as 'byte')")
        warnings.warn(msg + "; exported as patching_mode='byte'", stacklevel=2)
        mode = "byte"
    k = cfg.cross_attn_k
    return dict(
        vocab_size=cfg.vocab_size,
        patch_in_forward=bool(patch_in_forward),
        patch_size=p.patch_size,
        patching_mode=mode,
        patching_threshold=float(p.threshold),
        max_patch_length=p.max_patch_length,
        local_attention_window_len=e.window,
        cross_attn_k=k,
        encoder_hash_byte_group_size=list(e.ngram_sizes),
        encoder_hash_byte_group_vocab=e.hash_rows,
        encoder_hash_byte_group_nb_functions=e.hash_functions,
        tie_word_embeddings=False,
        encoder_config=_hf_stack(
            e, dict(cross_attn_all_layers=False, cross_attn_k=k, hidden_size_global=g.dim, sliding_window=e.window)
        ),
        decoder_config=_hf_stack(
            d, dict(cross_attn_all_layers=d.cross_attn_all_layers, cross_attn_k=k, hidden_size_global=g.dim)
        ),
        global_config=_hf_stack(g, {}),
        patcher_config=_hf_stack(em, dict(sliding_window=em.window)),
    )


def _sub(top: dict, name: str) -> dict:
    """One HF sub-config as a dict with HF's defaults filled in (a None value counts as absent,
    except for sliding_window: None = full causal, and intermediate_size: None = 8/3 · width)."""
    raw = top.get(name) or {}
    if not isinstance(raw, dict):
        raw = raw.to_dict()
    out = dict(_HF_SUB_DEFAULTS[name])
    for key, value in raw.items():
        if value is not None or key in ("sliding_window", "intermediate_size"):
            out[key] = value
    if out.get("intermediate_size") is None:
        out["intermediate_size"] = _ffn_hidden(out["hidden_size"])
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{name}: rope type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta") or raw.get("rope_theta") or _HF_SUB_DEFAULTS[name]["rope_theta"]
    out["rope_theta"] = float(theta)
    if out.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act {out['hidden_act']!r} is not supported (only silu)")
    if out.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ValueError(f"{name}: vocab_size {out['vocab_size']} != {VOCAB_SIZE}")
    return out


def _stack_kwargs(s: dict) -> dict:
    dim, heads, kv = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    hidden = s["intermediate_size"]
    return dict(
        dim=dim,
        n_layers=s["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        ffn_hidden=None if hidden == _ffn_hidden(dim) else hidden,
        rope_theta=s["rope_theta"],
        norm_eps=float(s["rms_norm_eps"]),
        dropout=float(s["dropout"] or 0.0),
    )


def our_config_from_hf(hf_cfg) -> BLTConfig:
    """BLTConfig for a transformers `BltConfig` (or its dict / config.json contents).

    Raises ValueError for HF configs our model cannot represent.
    """
    top = hf_cfg if isinstance(hf_cfg, dict) else hf_cfg.to_dict()
    if top.get("model_type", "blt") != "blt":
        raise ValueError(f"not a BLT config: model_type={top.get('model_type')!r}")
    t = dict(_HF_TOP_DEFAULTS)
    t.update({key: value for key, value in top.items() if key in _HF_TOP_DEFAULTS})
    names = ("encoder_config", "decoder_config", "global_config", "patcher_config")
    enc, dec, glob, pat = (_sub(top, n) for n in names)
    k = t["cross_attn_k"]
    problems = []
    if t["vocab_size"] != VOCAB_SIZE:
        problems.append(f"vocab_size {t['vocab_size']} != {VOCAB_SIZE}")
    if enc["cross_attn_all_layers"]:
        problems.append(
            "encoder cross_attn_all_layers=True: HF re-pools the patch queries (max + projection) before every "
            "layer's cross-attention, our encoder (like the official code) pools once"
        )
    if enc["hidden_size"] != dec["hidden_size"]:
        problems.append(f"encoder hidden_size {enc['hidden_size']} != decoder hidden_size {dec['hidden_size']}")
    if enc["cross_attn_k"] != k or dec["cross_attn_k"] != k:
        problems.append(
            f"cross_attn_k differs: top {k}, encoder {enc['cross_attn_k']}, decoder {dec['cross_attn_k']}"
        )
    if dec["hidden_size_global"] != glob["hidden_size"]:
        problems.append(
            f"decoder hidden_size_global {dec['hidden_size_global']} != global hidden_size {glob['hidden_size']}"
        )
    if problems:
        raise ValueError("cannot represent this HF BltConfig: " + "; ".join(problems))

    window = t["local_attention_window_len"]
    mode = "entropy" if (t["patching_mode"] == "entropy" and t["patch_in_forward"]) else "byte"
    threshold = t["patching_threshold"]
    cfg = BLTConfig(
        entropy_model=EntropyModelConfig(**_stack_kwargs(pat), window=pat["sliding_window"]),
        patcher=PatcherConfig(
            mode=mode,
            threshold=float(threshold) if threshold is not None else PatcherConfig.threshold,
            patch_size=int(t["patch_size"] or PatcherConfig.patch_size),
            max_patch_length=t["max_patch_length"],
        ),
        encoder=LocalEncoderConfig(
            **_stack_kwargs(enc),
            window=window,
            ngram_sizes=list(t["encoder_hash_byte_group_size"] or _HF_NGRAM_DEFAULT),
            hash_rows=int(t["encoder_hash_byte_group_vocab"]),
            hash_functions=int(t["encoder_hash_byte_group_nb_functions"]),
            cross_attn_all_layers=False,
        ),
        global_model=GlobalConfig(**_stack_kwargs(glob), window=None),
        decoder=LocalDecoderConfig(
            **_stack_kwargs(dec), window=window, cross_attn_all_layers=bool(dec["cross_attn_all_layers"])
        ),
        cross_attn_k=k,
        cross_attn_double_residual=True,
        hash_embed_mean=False,
        doc_mask=False,
    )
    return cfg.validate()


# ---- state dicts ---------------------------------------------------------------------------

_BLOCK = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn.w1.weight", "mlp.gate_proj.weight"),
    ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"),
)
_CROSS = (
    ("q_norm.weight", "q_norm.weight"),
    ("kv_norm.weight", "k_norm.weight"),
    ("wq.weight", "q_proj.weight"),
    ("wk.weight", "k_proj.weight"),
    ("wv.weight", "v_proj.weight"),
    ("wo.weight", "o_proj.weight"),
)
_OURS_ENTROPY, _HF_PATCHER = "entropy_model.", "model.patcher."


def _key_pairs(cfg: BLTConfig, entropy: bool) -> list[tuple[str, str]]:
    """(our key, HF key) for every weight of the model."""
    pairs = [
        ("encoder.tok_embeddings.weight", "model.local_encoder.embed_tokens.weight"),
        ("encoder.hash_embeddings.weight", "model.encoder_hash_tok_embedding.weight"),
        ("encoder.patch_proj.weight", "model.local_encoder.patch_embedding_projection.weight"),
        ("decoder.patch_proj.weight", "model.local_decoder.patch_embedding_projection.weight"),
        ("decoder.norm.weight", "model.local_decoder.norm.weight"),
        ("decoder.output.weight", "lm_head.weight"),
    ]

    def blocks(ours, hf, n):
        for i in range(n):
            pairs.extend((f"{ours}.{i}.{a}", f"{hf}.{i}.{b}") for a, b in _BLOCK)

    def cross(ours, hf, n):
        for i in range(n):
            pairs.extend((f"{ours}.{i}.{a}", f"{hf}.{i}.{b}") for a, b in _CROSS)

    e, g, d = cfg.encoder, cfg.global_model, cfg.decoder
    blocks("encoder.layers", "model.local_encoder.layers", e.n_layers)
    cross("encoder.cross_attn", "model.local_encoder.cross_attn_layers", e.n_layers if e.cross_attn_all_layers else 1)
    if cfg.global_input_dim != g.dim:
        pairs.append(("global_model.in_proj.weight", "model.global_transformer.token_embedding_projection.weight"))
    blocks("global_model.layers", "model.global_transformer.layers", g.n_layers)
    blocks("decoder.layers", "model.local_decoder.layers", d.n_layers)
    cross("decoder.cross_attn", "model.local_decoder.cross_attn_layers", d.n_layers if d.cross_attn_all_layers else 1)
    if entropy:
        pairs += [
            (_OURS_ENTROPY + "tok_embeddings.weight", _HF_PATCHER + "embed_tokens.weight"),
            (_OURS_ENTROPY + "norm.weight", _HF_PATCHER + "norm.weight"),
            (_OURS_ENTROPY + "output.weight", _HF_PATCHER + "lm_head.weight"),
        ]
        blocks(_OURS_ENTROPY + "layers", _HF_PATCHER + "layers", cfg.entropy_model.n_layers)
    return pairs


def _remap(sd: dict, pairs: list[tuple[str, str]], what: str) -> dict:
    """Rename sd's keys by pairs (src, dst); every key must be mapped exactly."""
    missing = [src for src, _ in pairs if src not in sd]
    unexpected = sorted(set(sd) - {src for src, _ in pairs})
    if missing or unexpected:
        raise KeyError(
            f"{what}: state dict does not match the config; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    return {dst: sd[src] for src, dst in pairs}


def state_dict_to_hf(our_sd: dict, cfg: BLTConfig) -> dict:
    """Our BLT state dict -> BltForCausalLM state dict (same tensors, renamed).

    Entropy-model weights (entropy_model.*) become the HF patcher (model.patcher.*) when present.
    """
    entropy = any(key.startswith(_OURS_ENTROPY) for key in our_sd)
    return _remap(our_sd, [(o, h) for o, h in _key_pairs(cfg, entropy)], "state_dict_to_hf")


def state_dict_from_hf(hf_sd: dict, cfg: BLTConfig) -> dict:
    """BltForCausalLM state dict -> our BLT state dict (same tensors, renamed).

    Keys of a bare BltModel (no "model." prefix) are accepted too; lm_head is required.
    """
    if not any(key.startswith("model.") for key in hf_sd):
        hf_sd = {(key if key == "lm_head.weight" else "model." + key): value for key, value in hf_sd.items()}
    entropy = any(key.startswith(_HF_PATCHER) for key in hf_sd)
    return _remap(hf_sd, [(h, o) for o, h in _key_pairs(cfg, entropy)], "state_dict_from_hf")


# ---- models --------------------------------------------------------------------------------


def model_from_state_dict(cfg: BLTConfig, our_sd: dict, device=None, dtype: torch.dtype | None = None):
    """A BLT holding exactly our_sd's tensors (moved/cast if asked), without random init."""
    from blt.entropy_model import EntropyModel
    from blt.layers import Rotary
    from blt.model import BLT

    entropy = any(key.startswith(_OURS_ENTROPY) for key in our_sd)
    with torch.device("meta"):
        model = BLT(cfg, EntropyModel(cfg.entropy_model) if entropy else None)
    if device is not None or dtype is not None:
        our_sd = {
            key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            for key, value in our_sd.items()
        }
    model.load_state_dict(our_sd, strict=True, assign=True)
    device = next(model.parameters()).device
    # Rotary tables are non-persistent buffers: rebuild them for real (float32, as BLT builds them).
    for part in (model.encoder, model.global_model, model.decoder, model.entropy_model):
        if part is not None:
            part.rope = Rotary(part.cfg.head_dim, part.cfg.rope_theta).to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unmaterialised after loading: {left[:8]}")
    if model.entropy_model is not None:
        model.set_entropy_model(model.entropy_model)
    return model.eval()


def from_hf_state_dict(cfg: BLTConfig, hf_sd: dict, patch_in_forward: bool = True, device=None,
                       dtype: torch.dtype | None = None):  # fmt: skip
    """Our BLT (cfg: our_config_from_hf of the folder's config) from a BltForCausalLM state dict
    as its files hold it; patch_in_forward False (the HF config's flag): its patcher is unused.

    dtype: None keeps the tensors' dtypes (the published checkpoints mix float32 and bf16);
    otherwise floating tensors are cast to it."""
    hf_sd = {key: value for key, value in hf_sd.items() if not key.endswith(("inv_freq", "original_inv_freq"))}
    if not patch_in_forward:
        hf_sd = {key: value for key, value in hf_sd.items() if not key.startswith(_HF_PATCHER)}
    return model_from_state_dict(cfg, state_dict_from_hf(hf_sd, cfg), device=device, dtype=dtype)


def from_hf_model(hf_model):
    """Our BLT with the weights of a transformers `BltForCausalLM` (copied, not shared)."""
    cfg = our_config_from_hf(hf_model.config)
    sd = {key: value.detach().clone() for key, value in hf_model.state_dict().items()}
    return model_from_state_dict(cfg, state_dict_from_hf(sd, cfg))


def to_hf_model(model, attn_implementation: str = "sdpa", strict_patching: bool = True):
    """A transformers `BltForCausalLM` with our model's weights (copied), in eval mode.

    Without an attached entropy model the HF model gets no patcher (patch_in_forward=False):
    it then patches per byte unless patch_lengths are passed, so pass them.
    """
    from transformers import BltConfig, BltForCausalLM

    cfg = model.cfg
    has_entropy = model.entropy_model is not None
    if not has_entropy and cfg.patcher.needs_entropy:
        warnings.warn(
            "model has no entropy model: the HF model gets no patcher and patches per byte "
            "unless patch_lengths are given",
            stacklevel=2,
        )
    hf_cfg = BltConfig(**hf_config_from_ours(cfg, patch_in_forward=has_entropy, strict_patching=strict_patching))
    param = next(model.parameters())
    hf = BltForCausalLM._from_config(hf_cfg, attn_implementation=attn_implementation)
    hf = hf.to(device=param.device, dtype=param.dtype)
    hf_sd = state_dict_to_hf(model.state_dict(), cfg)
    hf.load_state_dict(hf_sd, strict=True)
    return hf.eval()
