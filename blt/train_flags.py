"""The command-line flags of blt.train and blt.train_entropy: the ones they share (data,
optimisation, system, output) and their checks (`add_common_args`, `check_common_args`), and
blt.train's model flags (`blt_parser`), resolved into the run's BLTConfig with the entropy model
folder and its calibrated threshold (`blt_config`).
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from blt.checkpoint import CONFIG, ENTROPY_CONFIG, THRESHOLD, CheckpointError
from blt.config import (
    ADDED_LATER,
    PATCH_MODES,
    PRESETS,
    BLTConfig,
    ConfigError,
    EntropyModelConfig,
    entropy_config_from_dict,
    load_json,
    tinystories,
)
from blt.layers import FLEX_BACKENDS
from blt.one_graph import PATCH_PAD
from blt.train_state import CHECKPOINT, PREVIOUS


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    """The flags shared by blt.train and blt.train_entropy."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tinystories", help="train|valid|tinystories (TinyStories splits) or a path/dir/glob")
    g.add_argument("--valid-data", help="held-out source; default: a --valid-fraction split of --data")
    g.add_argument("--valid-fraction", type=float, default=0.01, help="share of --data documents held out")
    g.add_argument("--cache-dir", default="data_cache", help="where the byte shards are cached")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=10000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per process and micro-step")
    g.add_argument("--seq-len", type=int, default=2048, help="bytes per sequence")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the decay")
    g.add_argument("--warmup", type=int, default=500, help="linear warmup steps")
    g.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine",
                   help="cosine decay after warmup, or warmup-stable-decay (linear decay over --decay-frac)")
    g.add_argument("--decay-frac", type=float, default=0.2, help="wsd: share of --steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices and embeddings")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"))
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--dropout", type=float, help="dropout of the trained model (default: its config's)")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.995: ~200 steps), evaluated beside "
                        "them and exported as the model (blt.ema; 0: off)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="model init and data order")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16 autocast (CUDA only; its default) or fp32 (CPU default)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (default: on CUDA where the whole step is not one "
                        "graph; see blt.execution)")  # fmt: skip
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--dist", choices=("none", "ddp", "fsdp"), default="none", help="data parallelism under torchrun")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=out, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--eval-every", type=int, default=500, help="held-out bpb every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=32, help="held-out batches per evaluation (0: all)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="metrics row every N steps")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line parser errors for values no run can use; resolves --device and --dtype."""
    checks = [
        (args.steps >= 1, "--steps must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.seq_len >= 2, "--seq-len must be >= 2 (one input and one target byte)"),
        (args.grad_accum >= 1, "--grad-accum must be >= 1"),
        (args.lr > 0 and 0 <= args.min_lr <= args.lr, "need --lr > 0 and 0 <= --min-lr <= --lr"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (0 < args.decay_frac <= 1, "--decay-frac must be in (0, 1]"),
        (args.weight_decay >= 0 and args.clip >= 0 and args.eps > 0, "--weight-decay and --clip must be >= 0, --eps > 0"),
        (all(0 <= b < 1 for b in args.betas), "--betas must be in [0, 1)"),
        (args.dropout is None or 0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (0 <= args.ema < 1, "--ema must be in [0, 1) (0: off)"),
        (not (args.ema and args.dist == "fsdp"), "--ema needs whole parameters on every process: --dist ddp or none"),
        (0 <= args.seed < 2**63, "--seed must be >= 0 and < 2**63"),  # torch seeds are 64-bit
        (0 < args.valid_fraction < 1, "--valid-fraction must be in (0, 1)"),
        (args.log_every >= 1, "--log-every must be >= 1"),
        (min(args.eval_every, args.eval_batches, args.save_every) >= 0, "--eval-every, --eval-batches and --save-every must be >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.dtype == "bf16" and args.device != "cuda":
        p.error("--dtype bf16 needs --device cuda (CPU runs are fp32)")
    launched = "RANK" in os.environ
    if args.dist == "none" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("launched with several processes: pass --dist ddp or --dist fsdp")
    if args.dist != "none" and not launched:
        p.error(f"--dist {args.dist} needs torchrun (python -m torch.distributed.run ...)")


def blt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blt.train", description="Train a Byte Latent Transformer.")
    add_common_args(p, out="runs/blt")
    g = p.add_argument_group("model")
    g.add_argument("--config", default="tinystories", help=f"preset ({', '.join(PRESETS)}) or BLTConfig JSON file")
    g.add_argument("--entropy-model", help="blt.train_entropy output (its --out or its model/ folder)")
    g.add_argument("--threshold", type=float, help="entropy threshold θ (default: the entropy model's patcher_threshold.json)")
    g.add_argument("--patch-mode", choices=PATCH_MODES, help="override the config's patching mode")
    g.add_argument("--patch-size", type=int, help="static patching: bytes per patch")
    g.add_argument("--max-patch-length", type=int, help="split longer patches")
    g.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="document masking: no attention, patch or hash n-gram crosses the end of a document (EOS) "
                        "in a training window, as the official training's block-causal masks. Default: the "
                        "config's (on for the presets; a JSON config saved without the key: off); with --resume, "
                        "the run's own")  # fmt: skip
    g.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of this model folder (e.g. a run on other data), not from a random "
                        "init; same architecture; optimizer and schedule start fresh")  # fmt: skip
    g = p.add_argument_group("execution (defaults: blt.execution; on CUDA the fast path, on CPU eager)")
    g.add_argument("--one-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the whole BLT forward and loss as one graph (CUDA graphs on CUDA) on patch counts "
                        "padded to a multiple of --patch-pad; the patching runs outside it; one process. "
                        "Default: on CUDA in one process")  # fmt: skip
    g.add_argument("--patch-pad", type=int, default=PATCH_PAD,
                   help="with --one-graph: pad the patch count to a multiple of this; smaller wastes less global "
                        "compute on padding and compiles more shapes")  # fmt: skip
    g.add_argument("--tune-kernels", action="store_true",
                   help="with --one-graph on CUDA: tune the fused kernels' block sizes while compiling (about 1%% "
                        "faster steps, minutes more compilation per padded patch count; for long runs)")  # fmt: skip
    g.add_argument("--pack-patches", action=argparse.BooleanOptionalAction, default=None,
                   help="run the global transformer on the rows' patches packed end to end, not on rows padded to "
                        "the longest (same outputs, no compute on padding; with --one-graph: more shapes). "
                        "Default: on with --one-graph (5%% faster steps of the bench preset on an H200), which "
                        "packs a micro-batch when that makes fewer slots than padding; off otherwise")  # fmt: skip
    g.add_argument("--precomputed-entropies", action=argparse.BooleanOptionalAction, default=None,
                   help="patch training batches from entropies that the frozen entropy model computes once over the "
                        "training shard (cached beside it), as the official training does, instead of running it on "
                        "every batch; each byte's entropy then sees its full context, across window edges. "
                        "Evaluation still patches live. Default: on CUDA with entropy patching")  # fmt: skip
    g.add_argument("--bf16-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="under bf16 autocast, carry the byte-level residual stream in bf16 (as the official code's "
                        "bf16 parameters do) instead of float32: less memory traffic. Default: on under bf16")  # fmt: skip
    g.add_argument("--fused-products", action=argparse.BooleanOptionalAction, default=None,
                   help="run the products that read one normalised input as one product with the norm's gain "
                        "folded into the weights (q, k, v; w1, w3; k, v), and on CUDA Triton kernels for the "
                        "split, rotary and SwiGLU after them: same function and gradients, fewer kernels "
                        "(blt.layers.set_fused_products). Default: on CUDA")  # fmt: skip
    g.add_argument("--attention", choices=FLEX_BACKENDS,
                   help="on CUDA, the self-attentions' kernels: FlexAttention's Triton ones (triton), FlexAttention's "
                        "experimental FlashAttention-4 backend (flash; with --one-graph), or FlashAttention-4's own "
                        "causal kernels (fa4); flash and fa4 need the optional flash-attn-4 package. Default: fa4 on CUDA "
                        "when flash-attn-4 is installed, else triton")  # fmt: skip
    return p


def entropy_model_dir(path: str) -> Path:
    """Accept train_entropy's --out folder as well as its model/ folder."""
    path = Path(path)
    return path / "model" if not (path / ENTROPY_CONFIG).exists() and (path / "model").is_dir() else path


def blt_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[BLTConfig, Path | None]:
    """The run's BLTConfig (preset or JSON, then the flag overrides) and the entropy model folder."""
    try:
        if args.config in PRESETS:
            cfg = PRESETS[args.config]()
        elif args.config.endswith(".json") or Path(args.config).is_file():
            cfg = BLTConfig.from_json(args.config)
        else:
            p.error(f"unknown preset {args.config!r}: choose from {', '.join(PRESETS)} or give a JSON file")
        pc = cfg.patcher
        pc.mode = args.patch_mode or pc.mode
        pc.patch_size = args.patch_size if args.patch_size is not None else pc.patch_size
        pc.max_patch_length = args.max_patch_length if args.max_patch_length is not None else pc.max_patch_length
        if args.dropout is not None:
            cfg.encoder.dropout = cfg.global_model.dropout = cfg.decoder.dropout = args.dropout
        if args.doc_mask is not None:
            cfg.doc_mask = args.doc_mask
        elif getattr(args, "resume", False):
            cfg.doc_mask = resumed_doc_mask(Path(args.out), cfg.doc_mask)
        cfg.validate()
    except ConfigError as e:
        p.error(str(e))
    if not cfg.patcher.needs_entropy:
        if args.entropy_model:
            p.error(f"--entropy-model is only used by entropy-based patching, not --patch-mode {cfg.patcher.mode}")
        return cfg, None
    if not args.entropy_model:
        p.error(f"patch mode {cfg.patcher.mode!r} needs --entropy-model DIR (blt.train_entropy's output)")
    folder = entropy_model_dir(args.entropy_model)
    if not (folder / ENTROPY_CONFIG).is_file():
        p.error(f"--entropy-model {args.entropy_model}: no entropy model there (entropy_config.json missing)")
    try:
        cfg.entropy_model = entropy_config_from_dict(load_json(folder / ENTROPY_CONFIG, "entropy model config"))
        pc.threshold = args.threshold if args.threshold is not None else calibrated_threshold(folder, pc.mode, cfg.doc_mask)
    except (CheckpointError, ConfigError) as e:
        p.error(str(e))
    return cfg, folder


def resumed_doc_mask(out: Path, default: bool) -> bool:
    """--resume without --doc-mask/--no-doc-mask: the run's own document masking, as its
    checkpoint's config says (one saved before the field existed: off); `default` if no
    checkpoint config reads (the resume then says what is wrong)."""
    for folder in (out / CHECKPOINT, out / PREVIOUS):
        try:
            return {**ADDED_LATER, **load_json(folder / CONFIG, "checkpoint config")}["doc_mask"]
        except ConfigError:
            continue
    return default


def calibrated_threshold(folder: Path, mode: str, doc_mask: bool = False) -> float:
    """θ of an entropy model's calibration record, for a BLT patching in `mode`; a note when the
    record was calibrated across documents and the BLT reads within them, or the other way
    round (a record without the key is from before: across)."""
    cal = load_json(folder / THRESHOLD, "patcher threshold (pass --threshold instead)")
    if cal.get("mode") != mode:
        raise ConfigError(f"{folder / THRESHOLD} was calibrated for mode {cal.get('mode')!r}, not {mode!r}: pass --threshold")
    calibrated = bool(cal.get("doc_mask", False))
    if calibrated != doc_mask:
        how = {True: "within documents", False: "across documents"}
        print(f"note: θ of {folder} was calibrated {how[calibrated]}, this BLT patches {how[doc_mask]}: its mean "
              f"patch size will differ from {cal.get('target_bytes_per_patch')} (recalibrate with blt.train_entropy "
              f"--{'' if doc_mask else 'no-'}doc-mask, or pass --threshold)", file=sys.stderr)  # fmt: skip
    return float(cal["threshold"])


def add_lm_shape_args(p: argparse.ArgumentParser, unit: str) -> None:
    """The model flags of a plain transformer LM (blt.train_entropy, blt.train_bpe); its window
    counts `unit` (bytes, tokens)."""
    g = p.add_argument_group("model")
    g.add_argument("--config", help="EntropyModelConfig JSON file (default: the tinystories preset's entropy model)")
    g.add_argument("--dim", type=int, help="width")
    g.add_argument("--layers", type=int, help="transformer layers")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--window", type=int, help=f"sliding attention window in {unit} (0: full causal)")


def lm_config(p: argparse.ArgumentParser, args: argparse.Namespace, what: str) -> EntropyModelConfig:
    """add_lm_shape_args's values -> the validated config (a one-line parser error if invalid)."""
    try:
        cfg = entropy_config_from_dict(load_json(args.config, f"{what} config")) if args.config else tinystories().entropy_model
        shape = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "dropout": args.dropout}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in shape.items() if v is not None})
        if args.window is not None:
            cfg.window = args.window or None
        cfg.validate(what)
    except ConfigError as e:
        p.error(str(e))
    return cfg


def plain_lm_execution(args: argparse.Namespace) -> None:
    """A plain transformer LM's execution (blt.train_entropy, blt.train_bpe): --compile left to
    its default compiles each block on CUDA and runs eager on a CPU (blt.execution); said in
    one line, as blt.train says its choice."""
    if args.compile is None:
        args.compile = args.device == "cuda"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"execution: {'compile' if args.compile else 'eager'}", flush=True)
