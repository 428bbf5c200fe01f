"""Train a Byte Latent Transformer: `python -m blt.train --entropy-model runs/entropy/model`.

This file is also the training core of `blt.train_entropy` (the byte LM used as entropy model
and as the plain byte-transformer baseline). Both share the flags of `add_common_args` and the
loop of `train`; they differ only in how the model is built and how the final one is exported.

A run, top to bottom:
    check the flags -> build the model (with --resume: check it against out/checkpoint, load it)
    -> torch.distributed if launched by torchrun -> byte shards (blt.data)
    (-> with --precomputed-entropies: the training shard's entropies, computed once and cached)
    -> activation checkpointing, compile, DDP or FSDP2 -> AdamW
    -> loop: micro-batches, loss, clip, step; log, evaluate, checkpoint
    -> final checkpoint, model folder, held-out bits per byte, peak memory, MFU.

Output folder (--out):
    metrics.jsonl   one JSON row per log step {"step","loss","bpb","lr","bytes","bytes_per_s",
                    "bytes_per_patch","grad_norm","elapsed"} and per evaluation
                    {"step","eval_bpb","bytes","elapsed"}; `bytes` counts training bytes so far,
                    `elapsed` the seconds spent in training steps (all resumes, evals excluded)
    checkpoint/     the latest checkpoint, replaced atomically: a model folder (what
                    blt.checkpoint writes) + train_state.pt (optimizer, step, RNG states,
                    batcher state, the flags; tensors and plain values, loaded weights_only)
    checkpoint.prev/  the checkpoint before it: a new one is written beside them, read back,
                    then swapped in, so two are on disk and three while one is written
    model/          the final model folder, for BLT.from_pretrained, blt.eval and blt.generate
    run.lock        "PID host" of the run writing the folder, while it runs: a second run on
                    the same --out is refused; a dead run's lock is taken over

Resuming: the batch at step k is a pure function of (--seed, k) (blt.data.Batcher) and the
checkpoint holds everything else that changes, so a resumed CPU fp32 run repeats the losses
of an uninterrupted one exactly. The learning rate is a function of (step, --steps): resume
with the same --steps, or extend a run with `--schedule wsd` before its decay starts. A latest
checkpoint that does not read back whole gives way to checkpoint.prev, with a warning; a
metrics row cut off by a crash is dropped, with a warning.
SIGINT/SIGTERM finish the current step, save a checkpoint and exit with code 128 + the
signal's number (a second signal kills). A write that fails (a full disk) stops the run with
one error line, exit code 1, the last checkpoint intact and no temp folder left.
"""

import argparse
import errno
import hashlib
import json
import math
import os
import random
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from blt import adamw
from blt.checkpoint import (
    CHECKPOINT_FILES,
    CONFIG,
    ENTROPY_CONFIG,
    THRESHOLD,
    TRAIN_STATE,
    WEIGHTS,
    CheckpointError,
    WriteError,
    atomic_dir_write,
    check_replaceable,
    load_entropy_model,
    load_model,
    load_weights,
    pid_alive,
    read_safetensors,
    read_train_state,
    save_model,
    verify_folder,
    write_entropy_model_files,
    write_model_files,
)
from blt.config import PATCH_MODES, PRESETS, BLTConfig, ConfigError, entropy_config_from_dict, load_json
from blt.data import Batcher, DataConfig, DataError, entropy_shard, iter_eval_batches, prepare_data
from blt.entropy_model import EntropyModel, stream_entropies
from blt.eval import eval_sums, logits_and_patching
from blt.flops import blt_flops_per_byte, transformer_flops_per_byte
from blt import layers
from blt.layers import FLEX_BACKENDS, Rotary, set_flex_backend, set_fused_products
from blt.masks import default_backend
from blt.model import BLT, packing_align
from blt.packing import aligned_slot_count
from blt.patcher import StartsPatching, lengths_from_starts, model_patch_starts, patch_starts, patching_from_starts
from blt.tokens import BOE_ID, VOCAB_SIZE

LN2 = math.log(2)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak per GPU
CHECKPOINT, PREVIOUS, LOCK = "checkpoint", "checkpoint.prev", "run.lock"  # in --out
# Flags that must not change on --resume: they decide which bytes each step sees.
RESUME_FIXED = ("data", "valid_data", "valid_fraction", "seq_len", "grad_accum", "seed")


# ---- flags -------------------------------------------------------------------------------


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
    g.add_argument("--seed", type=int, default=0, help="model init and data order")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16 autocast (CUDA only; its default) or fp32 (CPU default)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
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
    g.add_argument("--one-graph", action="store_true",
                   help="compile the whole BLT forward and loss as one graph (CUDA graphs on CUDA) on patch counts "
                        "padded to a multiple of --patch-pad; the patching runs outside it; one process")  # fmt: skip
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
    g.add_argument("--precomputed-entropies", action="store_true",
                   help="patch training batches from entropies that the frozen entropy model computes once over the "
                        "training shard (cached beside it), as the official training does, instead of running it on "
                        "every batch; each byte's entropy then sees its full context, across window edges. "
                        "Evaluation still patches live")  # fmt: skip
    g.add_argument("--bf16-residual", action="store_true",
                   help="under bf16 autocast, carry the byte-level residual stream in bf16 (as the official code's "
                        "bf16 parameters do) instead of float32: less memory traffic")  # fmt: skip
    g.add_argument("--fused-products", action="store_true",
                   help="run the products that read one normalised input as one product with the norm's gain "
                        "folded into the weights (q, k, v; w1, w3; k, v), and on CUDA Triton kernels for the "
                        "split, rotary and SwiGLU after them: same function and gradients, fewer kernels "
                        "(blt.layers.set_fused_products)")  # fmt: skip
    g.add_argument("--attention", choices=FLEX_BACKENDS, default="triton",
                   help="on CUDA, the self-attentions' kernels: FlexAttention's Triton ones (triton), FlexAttention's "
                        "experimental FlashAttention-4 backend (flash; with --one-graph), or FlashAttention-4's own "
                        "causal kernels (fa4); flash and fa4 need the optional flash-attn-4 package")  # fmt: skip
    g.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of this model folder (e.g. a run on other data), not from a random "
                        "init; same architecture; optimizer and schedule start fresh")  # fmt: skip
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
        pc.threshold = args.threshold if args.threshold is not None else calibrated_threshold(folder, pc.mode)
    except (CheckpointError, ConfigError) as e:
        p.error(str(e))
    return cfg, folder


def calibrated_threshold(folder: Path, mode: str) -> float:
    cal = load_json(folder / THRESHOLD, "patcher threshold (pass --threshold instead)")
    if cal.get("mode") != mode:
        raise ConfigError(f"{folder / THRESHOLD} was calibrated for mode {cal.get('mode')!r}, not {mode!r}: pass --threshold")
    return float(cal["threshold"])


# ---- the BLT: build and export -----------------------------------------------------------


def build_blt(cfg: BLTConfig, entropy_dir: Path | None, checkpoint: Path | None, init_from: str | None = None) -> BLT:
    if checkpoint is not None:
        check_same_config(cfg.to_dict(), load_json(checkpoint / CONFIG, "checkpoint config"), checkpoint)
        return load_model(checkpoint)
    entropy_model = load_entropy_model(entropy_dir) if entropy_dir else None
    model = BLT(cfg)
    if init_from is not None:
        # Weights only: the source may differ in dropout or patching, not in any tensor's shape.
        src = Path(init_from) / "model" if (Path(init_from) / "model" / WEIGHTS).is_file() else Path(init_from)
        load_weights(model, read_safetensors(src / WEIGHTS), f"--init-from {init_from}")
    if entropy_model is not None:
        model.set_entropy_model(entropy_model)
    return model


def export_blt(model: BLT, entropy_dir: Path | None, out: Path) -> None:
    """The final model folder, with the entropy model's calibration record when there is one."""
    extra = {THRESHOLD: load_json(entropy_dir / THRESHOLD, "threshold")} if entropy_dir and (entropy_dir / THRESHOLD).exists() else None
    save_model(model, out, extra_json=extra)


def check_same_config(wanted: dict, saved: dict, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint of a different model, naming the first difference."""
    def first_diff(a, b, path=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                diff = first_diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
                if diff:
                    return diff
            return None
        return None if a == b else f"{path}: checkpoint has {b!r}, this run has {a!r}"

    diff = first_diff(json.loads(json.dumps(wanted)), saved)  # JSON round trip: tuples -> lists
    if diff:
        raise CheckpointError(f"cannot resume from {checkpoint}: different model config ({diff})")


# ---- distributed setup -------------------------------------------------------------------


def init_distributed(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    if args.dist == "none":
        return 0, 1, torch.device(args.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(args.device, local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks, in place."""
    if world > 1:
        dist.all_reduce(t)
    return t


def prepare(args, rank: int, world: int):
    """Byte shards: rank 0 builds (or finds) the cache, then the others map it."""
    cfg = DataConfig(source=args.data, valid_source=args.valid_data, valid_fraction=args.valid_fraction, cache_dir=args.cache_dir)
    if rank == 0:
        data = prepare_data(cfg)
    if world > 1:
        dist.barrier()
    if rank != 0:
        data = prepare_data(cfg)
    return data


ENTROPY_CHUNK = 8192  # positions per piece when precomputing a shard's entropies


def precomputed_entropies(raw: BLT, data, args, rank: int, world: int) -> np.ndarray:
    """--precomputed-entropies: the entropy of every training token, computed once by the frozen
    entropy model (rank 0, the others wait) and cached beside the shard. The file name holds a
    hash of what the entropies depend on: the entropy model's config and weights, its context
    and the dtype. Each piece of the stream is run with the model's whole receptive field before
    it, so every entropy is what a run over the unbroken stream would give."""
    em = raw.entropy_model
    context = em.receptive_field or args.seq_len  # a full-attention model: a training window's worth
    key = hashlib.sha256(json.dumps([asdict(em.cfg), context, ENTROPY_CHUNK, args.dtype], sort_keys=True).encode())
    for name, tensor in sorted(em.state_dict().items()):
        key.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    path = data.directory / f"train.entropies-{key.hexdigest()[:16]}.f16"

    def compute(tokens, out):
        was_training = em.training
        em.eval()
        with tqdm(total=len(tokens), unit="B", unit_scale=True, desc="entropies (once per data and entropy model)") as bar:
            dtype = torch.bfloat16 if args.dtype == "bf16" else None
            stream_entropies(em, tokens, out, context, ENTROPY_CHUNK, dtype=dtype, progress=bar.update)
        em.train(was_training)

    if rank == 0:
        entropies = entropy_shard(data.train, path, compute)
    if world > 1:
        dist.barrier()
    if rank != 0:
        entropies = entropy_shard(data.train, path, compute)
    return entropies


def to_device(batch, device: torch.device, pin: bool = False):
    """A batch (a tensor, or tokens and entropies) on the device; pinned first if asked."""
    if isinstance(batch, tuple):
        return tuple(to_device(t, device, pin) for t in batch)
    return (batch.pin_memory() if pin else batch).to(device, non_blocking=True)


# ---- model wrapping ----------------------------------------------------------------------


PATCH_PAD = 128  # --one-graph pads the patch count to a multiple of this (FlexAttention's block)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The trained blocks (transformer layers and cross-attentions): the unit of activation
    checkpointing, compilation and FSDP sharding. A BLT's frozen entropy model is not among them."""
    if isinstance(model, BLT):
        e, d = model.encoder, model.decoder
        return [e.layers, e.cross_attn, model.global_model.layers, d.layers, d.cross_attn]
    return [model.layers]


def parallelize(model: nn.Module, args, device: torch.device) -> nn.Module:
    """Activation checkpointing, then compile, then FSDP2 or DDP (torchtitan's order).

    checkpoint_wrapper's state-dict hooks hide its `_checkpoint_wrapped_module.` prefix and
    Module.compile() compiles in place, so state-dict keys stay those of a plain BLT.
    FSDP keeps fp32 parameters and runs under the same bf16 autocast as DDP (no
    MixedPrecisionPolicy), so both modes compute the same thing; at these model sizes the fp32
    all-gathers are cheap. The frozen entropy model is replicated (ignored_params), not sharded.
    """
    one_graph = getattr(args, "one_graph", False)  # the trained blocks compile inside OneGraph
    if args.compile or one_graph:
        # Every block of every stack shares one code object (TransformerBlock.forward), and
        # dynamo counts its recompiles together: per width, input dtype (fp32 embeddings or
        # bf16 under autocast), grad mode and train/eval. Past the limit (default 8) it runs the
        # rest eagerly, FlexAttention included, which then materializes full score matrices.
        dyn = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(dyn, limit, max(getattr(dyn, limit), 64))  # (and --one-graph: one graph per padded P)
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            if args.activation_checkpointing:
                block = checkpoint_wrapper(block)
            if args.dist == "fsdp":
                fully_shard(block)
            blocks[i] = block
    if args.compile and not one_graph:  # OneGraph compiles the model whole
        compile_blocks(model)
    frozen = model.entropy_model if isinstance(model, BLT) else None
    if args.dist == "fsdp":
        fully_shard(model, ignored_params=set(frozen.parameters()) if frozen is not None else None)
    elif args.dist == "ddp":
        # No buffer needs syncing (rotary tables and frequencies are the same on every rank),
        # so none is broadcast before each forward.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each trained block in place, and the frozen entropy model's blocks. In place
    (Module.compile), so wrappers around the blocks (checkpointing, FSDP) stay as they are."""
    blocks = [block for blocks in block_lists(model) for block in blocks]
    if isinstance(model, BLT) and model.entropy_model is not None:
        blocks += list(model.entropy_model.layers)
    for block in blocks:
        block.compile()


def full_copy(raw: nn.Module, rank: int) -> nn.Module | None:
    """A plain model with full weights, for writing model folders. Only FSDP needs a copy (its
    parameters are shards); every rank must call this, rank 0 gets the model, others None."""
    if not isinstance(raw, FSDPModule):
        return raw if rank == 0 else None
    sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    if isinstance(raw, BLT):
        plain = BLT(raw.cfg)
        plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith("entropy_model.")})
        if raw.entropy_model is not None:
            plain.set_entropy_model(raw.entropy_model)
        return plain
    plain = EntropyModel(raw.cfg)
    plain.load_state_dict(sd)
    return plain


def make_optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (>= 2-D), not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if adamw.available(device):  # one Triton launch per group: faster than torch's fused kernel on an H200
        return adamw.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, fused=device.type == "cuda")


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to --lr, then cosine to
    --min-lr at the last step, or (wsd) constant until the last --decay-frac of the steps and
    linear to --min-lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
        return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - args.min_lr)
    decay_start = max(args.warmup, args.steps - round(args.decay_frac * args.steps))
    if step < decay_start:
        return args.lr
    progress = (step + 1 - decay_start) / max(1, args.steps - decay_start)
    return args.lr - min(progress, 1.0) * (args.lr - args.min_lr)


def grad_sync(model: nn.Module, enabled: bool):
    """Reduce gradients only on the last micro-step of an accumulation."""
    if isinstance(model, DDP):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


# ---- checkpoints -------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """Every RNG's state, as tensors and plain values (what torch.load(weights_only=True) reads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_checkpoint(path: Path, raw, optimizer, step, batcher, args, elapsed, rank, world, device) -> None:
    """Model folder + train_state.pt, written together atomically; the checkpoint they replace
    becomes checkpoint.prev, the one before it is deleted. Collective (FSDP state dicts, every
    rank's RNG state); rank 0 writes."""
    optim_state = get_optimizer_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    plain = full_copy(raw, rank)
    if rank == 0:
        # the flags through JSON: plain values only, as weights_only loading requires
        state = {"step": step, "optimizer": optim_state, "batcher": batcher.state_dict(), "rng": rngs,
                 "args": json.loads(json.dumps(vars(args))), "elapsed": elapsed, "world_size": world}  # fmt: skip

        def write(tmp: Path) -> None:
            write_weights(plain, tmp)
            with open(tmp / TRAIN_STATE, "wb") as f:  # a file object: a full disk raises OSError, not RuntimeError
                torch.save(state, f)

        atomic_dir_write(path, write, own=CHECKPOINT_FILES, keep=path.with_name(PREVIOUS))
    if world > 1:
        dist.barrier()


def write_weights(model, folder: Path) -> None:
    (write_model_files if isinstance(model, BLT) else write_entropy_model_files)(model, folder)


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).exists() or (out / PREVIOUS).exists()


def find_checkpoint(out: Path) -> tuple[Path, dict]:
    """--resume: the latest checkpoint that reads back whole, and its train state. When the latest
    is corrupt or cut short (a crash, a full disk, a bad copy), the previous one, with a warning."""
    folders = [folder for folder in (out / CHECKPOINT, out / PREVIOUS) if folder.exists()]
    if not folders:
        raise CheckpointError(f"--resume: no checkpoint in {out / CHECKPOINT}")
    problems = []
    for folder in folders:
        try:
            verify_folder(folder)
            state = read_train_state(folder)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from the previous checkpoint, {folder} (step {state['step']})",
                  file=sys.stderr)  # fmt: skip
        return folder, state
    raise CheckpointError(f"cannot resume: {'; '.join(problems)}")


def check_resumable(state: dict, args, world: int) -> None:
    """Refuse to continue a checkpoint with flags that change which bytes each step sees."""
    saved = state["args"]
    for key in RESUME_FIXED:
        if saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"cannot resume: checkpoint has {flag} {saved[key]}, this run has {getattr(args, key)}")
    if saved["batch_size"] * state["world_size"] != args.batch_size * world:
        raise CheckpointError(
            f"cannot resume: checkpoint's global batch is {saved['batch_size']} x {state['world_size']} processes, "
            f"this run's is {args.batch_size} x {world} (keep --batch-size x processes the same)"
        )


# ---- metrics -----------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl, written by rank 0. On resume, rows after the checkpoint's step (logged by
    the interrupted run after its last save) are dropped, so every step appears once; so is a
    row cut off by a crash, with a warning."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.file = path, None
        if not enabled:
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and path.exists():
                kept = [line for line, row in self._rows(path) if row["step"] <= resume_step]
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)  # a crash meanwhile leaves the old file whole
            elif resume_step is None:
                path.write_text("")
            self.file = path.open("a")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WriteError(path, e) from None

    @staticmethod
    def _rows(path: Path) -> list[tuple[str, dict]]:
        """(line, row) of every complete row; a line cut off (or not a row) is dropped with a warning."""
        rows = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "step" in row:
                rows.append((line, row))
            else:
                print(f"warning: {path} line {number} is cut off or not a metrics row: dropped", file=sys.stderr)
        return rows

    def write(self, **row) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                raise WriteError(self.path, e) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---- the shared loop ---------------------------------------------------------------------


def run(args, build, export) -> None:
    """Train, then export. build(checkpoint_dir | None) -> model (CPU, fp32): fresh, or loaded
    from the checkpoint after checking it is the same model; export(model, data, device) writes
    out/model on rank 0. Known errors become one `error: ...` line and exit code 1; a run
    stopped by a signal exits with 128 + its number, after saving a checkpoint."""
    out, lock, code = Path(args.out), None, 0
    try:
        if int(os.environ.get("RANK", 0)) == 0:
            lock = take_lock(out)
        code = train(args, build, export)
    except WriteError as e:
        fix = "free space" if e.errno == errno.ENOSPC else "fix that"
        hint = f"the last checkpoint is intact: {fix} and rerun with --resume" if has_checkpoint(out) else f"{fix} and rerun"
        print(f"error: {e}; {hint}", file=sys.stderr)
        code = 1
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        if lock is not None:
            release_lock(lock)
        # Only after train() returned: DDP's reducer must be freed while its process group lives
        # (the other order can hang at exit).
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


def take_lock(out: Path) -> Path:
    """One run per output folder: out/run.lock holds the PID and host of the run writing there.
    A live holder's lock is refused; a dead one's (on this host) is taken over. -> the lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"--out {out} is a file, not a folder: choose another --out") from None
    except OSError as e:
        raise CheckpointError(f"--out {out} cannot be created ({e.strerror}): choose a writable --out") from None
    path, host = out / LOCK, socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None and not path.exists():
                continue  # released meanwhile
            if holder is not None and holder[1] == host and not pid_alive(holder[0]):
                print(f"note: taking over {path} from PID {holder[0]}, which is no longer running", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            who = f"the run of PID {holder[0]} on {holder[1]}" if holder else "another run"
            raise CheckpointError(f"{out} is in use by {who}: wait for it to end or choose another --out "
                                  f"(if no run uses it, delete {path})") from None  # fmt: skip
        except OSError as e:
            raise CheckpointError(f"--out {out} is not writable ({e.strerror}): "
                                  "choose another --out or make it writable") from None  # fmt: skip
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        return path


def read_lock(path: Path) -> tuple[int, str] | None:
    """(PID, host) of a lock file; None if it is gone or unreadable."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def release_lock(path: Path) -> None:
    """Remove the lock, if it is still ours."""
    if read_lock(path) == (os.getpid(), socket.gethostname()):
        path.unlink()


class StopOnSignal:
    """Inside the `with` block the first SIGINT/SIGTERM is only recorded, so the loop can finish
    its step and save; the handler then steps aside, so a second signal acts as usual."""

    def __enter__(self):
        self.caught = []  # signal numbers
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.caught.append(signum)
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agreed_signal(signum: int, device: torch.device) -> int:
    """The largest signal number any rank caught (0: none), so that all stop if one does."""
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class OneGraph:
    """--one-graph: two compiled graphs per micro-batch with one host sync between them.

    1. The patcher (the frozen entropy model and the patching rule) on the (B, T) window:
       a fixed shape, so one graph, which also counts the patches. Then the host reads the
       count. In training this runs one micro-batch ahead (Lookahead): the count is read while
       the GPU still works on the previous micro-batch, so the GPU never waits for the host here.
    2. The whole forward and loss, fed the patch starts and a patch count padded to a multiple
       of patch_pad (as Patching.padded pads), so that a few shapes recur; the graph computes
       the patch lengths itself, so no bookkeeping kernels run between the graphs. With
       raw.pack_patches, the global transformer runs on the rows' patches packed end to end
       (blt.packing), the total also padded to patch_pad (from the count read here, so the
       graph reads nothing back), when that makes fewer slots than the padded rows: with each
       row aligned to 128 slots, rows of similar lengths often pack into exactly as many.

    On CUDA both are CUDA graphs (mode "reduce-overhead"), the loss graph's backward too: a step
    is a handful of launches instead of thousands, which is what bounds a small model's step.
    A CUDA graph's outputs (the backward's gradients among them) live in memory that its next
    replay overwrites. With one micro-batch per step, autograd stores the gradients as they come
    and zero_grad frees them before the next replay. With several, the next micro-batch's
    gradients are added to the stored ones, so these must not be graph outputs: they are made
    here once and zeroed, not freed, between steps (train_step).
    """

    def __init__(
        self, raw: BLT, device: torch.device, accumulate: bool, tune_kernels: bool = False, autotune: bool = False,
        patch_pad: int = PATCH_PAD, inductor: dict | None = None,
    ):  # fmt: skip
        self.raw, self.cuda, self.accumulate, self.patch_pad = raw, device.type == "cuda", accumulate, patch_pad
        self.align = packing_align(default_backend(device))
        # CUDA graphs ("reduce-overhead"). tune_kernels: block sizes of the fused pointwise and
        # reduction kernels tuned at compile time (coordinate descent), a few percent off the step
        # for minutes more compilation per padded patch count; autotune (max-autotune) also
        # benchmarks matmul and attention kernels. Combo kernels: independent small kernels
        # (e.g. the casts of many weights to bf16) launched as one, 1.7% off the step on an H200.
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": tune_kernels, "max_autotune": autotune}
        import torch._inductor.config as inductor_config  # only the settings, not the compiler

        if hasattr(inductor_config, "combo_kernels"):
            options["combo_kernels"] = True
        options = {**options, **(inductor or {})} if self.cuda else None
        self.loss = torch.compile(self._loss, options=options, dynamic=False)
        self.starts = torch.compile(self._starts, options=options, dynamic=False) if self.cuda else self._starts
        self.rotaries = [m for m in raw.modules() if isinstance(m, Rotary)]
        self.pending = None  # the patcher's work queued for the upcoming batch
        if accumulate:
            for p in raw.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _launch_patcher(self, batch: torch.Tensor):
        """Queue the patcher graph on a (B, T+1) batch -> (batch, starts, patch count, event).
        The count is copied to pinned host memory once the event has fired."""
        tokens, entropies = batch if isinstance(batch, tuple) else (batch, None)
        inputs = tokens[:, :-1]
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        starts, count = self.starts(inputs, entropies)
        starts = starts.clone()  # out of the CUDA graph's memory
        if not self.cuda:
            return batch, starts, count, None
        host = torch.empty(2, dtype=count.dtype, pin_memory=True)
        host.copy_(count, non_blocking=True)  # queued before the graph's next replay overwrites it
        ready = torch.cuda.Event()
        ready.record()
        return batch, starts, host, ready

    def _starts(self, inputs, entropies=None):
        """-> the (B, T+1) patch starts, and the counts the host reads: the longest row's
        patches, and the slots of all rows packed (each row aligned as the model packs)."""
        with torch.no_grad():
            if entropies is not None:  # --precomputed-entropies
                starts = patch_starts(inputs, self.raw.cfg.patcher, entropies)
            else:
                starts = model_patch_starts(inputs, self.raw.cfg.patcher, self.raw.entropy_model)[0]
            per_row = starts[:, : inputs.shape[1]].sum(1)
            return starts, torch.stack((per_row.max(), aligned_slot_count(per_row, self.align)))

    def _loss(self, inputs, targets, starts, num_patches: int, packed_slots=None):
        """The loss, the patch lengths (padded to num_patches) computed from the starts in the graph."""
        lengths = lengths_from_starts(starts[:, : inputs.shape[1]], num_patches)
        return self.raw(inputs, targets, lengths, starts[:, -1], packed_slots=packed_slots).loss

    def __call__(self, batch: torch.Tensor, upcoming: torch.Tensor | None = None):
        """(B, T+1) batch -> (loss, Patching): BLT.patch's patches, then the loss. A batch may
        also be (tokens, entropies): patches from precomputed entropies.

        upcoming: the next micro-batch, if known (same shape; neither may change in place
        afterwards). Its patcher graph is queued before this batch's loss graph, and the next
        call finds its patches done: the host then reads the patch count while the GPU works
        on this batch, instead of leaving the GPU idle at the sync."""
        tokens = batch[0] if isinstance(batch, tuple) else batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        for rotary in self.rotaries:
            rotary.table(inputs.shape[1])  # grown here if need be, so that the graphs read the tables
        if self.pending is None or self.pending[0] is not batch:
            self.pending = self._launch_patcher(batch)
        _, starts, count, ready = self.pending
        self.pending = self._launch_patcher(upcoming) if upcoming is not None else None
        if ready is not None:
            ready.synchronize()
        longest, total = count.tolist()
        padded = -(-longest // self.patch_pad) * self.patch_pad  # as Patching.padded pads
        slots = None
        if self.raw.pack_patches:  # packed, unless that takes as many slots as padding (then 0: padded)
            slots = -(-total // self.patch_pad) * self.patch_pad
            slots = slots if slots < starts.shape[0] * padded else 0
        return self.loss(inputs, targets, starts, padded, slots), StartsPatching(starts, longest)

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self.accumulate)


class Lookahead:
    """A Batcher's batches on the device, the next one visible: peek() moves the batch that
    next() will return to the device without advancing the batcher, so --one-graph can patch
    it one micro-batch early. The batcher's step (what checkpoints save) is unchanged by it."""

    def __init__(self, batcher, device: torch.device):
        self.batcher, self.device = batcher, device
        self.ahead = None  # (step, device batch)

    def peek(self) -> torch.Tensor:
        step = self.batcher.step
        if self.ahead is None or self.ahead[0] != step:
            # from pageable memory the copy may wait for the GPU: pinned on CUDA
            self.ahead = (step, to_device(self.batcher.batch_at(step), self.device, self.device.type == "cuda"))
        return self.ahead[1]

    def __next__(self) -> torch.Tensor:
        batch = self.peek()
        self.batcher.step += 1
        return batch


def loss_and_patching(model, batch, patcher=None):
    """(B, T+1) batch -> (mean next-byte loss, Patching or None): the model run as it is. A batch
    (tokens, entropies) is patched from those entropies by the `patcher` config."""
    if isinstance(batch, tuple):
        batch, entropies = batch
        patching = patching_from_starts(patch_starts(batch[:, :-1], patcher, entropies), entropies)
        logits = model(batch[:, :-1], None, patching.patch_lengths, patching.next_starts_patch).logits
    else:
        logits, patching = logits_and_patching(model, batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1), ignore_index=BOE_ID), patching


def train_step(model, raw, optimizer, batcher, args, device, amp_dtype, execution=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over --grad-accum micro-batches -> (mean loss, mean bytes/patch, grad
    norm), all device tensors: reading them would make the host wait for the GPU, so the loop
    reads them only when it logs. execution: an Execution; with its OneGraph (--one-graph)
    computing the loss and a Lookahead as batcher, the next micro-batch is patched early. A
    micro-batch whose compilation fails runs again on the next slower path (Execution.retry)."""
    execution = execution or Execution(raw, None, compiled=False)

    def micro_step(batch, sync: bool):
        one_graph = execution.one_graph
        with grad_sync(model, sync):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if one_graph is None:
                    loss, patching = loss_and_patching(model, batch, raw.cfg.patcher if isinstance(raw, BLT) else None)
                else:
                    loss, patching = one_graph(batch, batcher.peek() if isinstance(batcher, Lookahead) else None)
            (loss / args.grad_accum).backward()
        return loss, patching

    loss_sum = torch.zeros((), device=device)
    bpp_sum = torch.zeros((), device=device, dtype=torch.float64)
    for micro in range(args.grad_accum):
        batch = to_device(next(batcher), device)
        loss, patching = execution.retry(partial(micro_step, batch, micro == args.grad_accum - 1))
        loss_sum += loss.detach()
        bpp_sum += patching.mean_patch_length() if patching is not None else 1.0  # a byte LM steps once per byte
    norm = nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], args.clip or math.inf)
    optimizer.step()
    if execution.one_graph is not None:
        execution.one_graph.zero_grad(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss_sum / args.grad_accum, bpp_sum / args.grad_accum, norm


def is_compile_error(error: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) comes from the compiler stack (dynamo,
    inductor, Triton), not from the model, the data or the device."""
    while error is not None:
        module = type(error).__module__
        if module.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
        error = error.__cause__ or error.__context__
    return False


class Execution:
    """How training steps run, and the slower paths left to fall back on: the one compiled
    graph (--one-graph), then each block compiled on its own (--compile), then eager. A compiler
    bug on some shape (inductor once failed on a mask of 65 blocks that the benchmark's shapes
    never reach) then costs speed, not the run."""

    def __init__(self, raw: nn.Module, one_graph: "OneGraph | None", compiled: bool, keep_packing: bool = True):
        self.raw, self.one_graph, self.compiled, self.keep_packing = raw, one_graph, compiled, keep_packing

    def retry(self, fn):
        """fn() on the current path; after a compiler error, again on the next slower one."""
        while True:
            try:
                return fn()
            except Exception as error:
                if not is_compile_error(error):
                    raise
                tqdm.write(self.fall_back(error), file=sys.stderr)

    def fall_back(self, error: BaseException) -> str:
        """Step down one path -> the one-line warning to print; re-raises on the eager path."""
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
        if self.one_graph is not None:
            self.one_graph = None
            if isinstance(self.raw, BLT) and not self.keep_packing:
                self.raw.pack_patches = False  # packed rows vary in shape: one-graph pads them
            if layers.flex_backend() == "flash":  # FlexAttention's FLASH backend needs the one graph
                set_flex_backend("triton")
            compile_blocks(self.raw)
            self.compiled = True
            return f"warning: --one-graph failed to compile ({why}); continuing with each block compiled (--compile)"
        if self.compiled and hasattr(torch.compiler, "set_stance"):
            torch.compiler.set_stance("force_eager")  # every compiled function now runs eagerly
            self.compiled = False
            return f"warning: compilation failed ({why}); continuing eagerly"
        raise error


def evaluate(model, valid, args, rank, world, device, amp_dtype) -> float:
    """Held-out bits per byte over the first --eval-batches batches of every rank (0: all)."""
    model.eval()
    n_windows = math.ceil((len(valid) - 1) / args.seq_len)
    # Every rank runs the same number of batches (FSDP forwards are collective): rank 0 has the
    # most windows; the others pad with all-BOE windows, which add nothing to the sums.
    n = math.ceil(math.ceil(n_windows / world) / args.batch_size)
    n = min(n, args.eval_batches) if args.eval_batches else n
    mine = iter_eval_batches(valid, args.batch_size, args.seq_len, rank, world)
    batches = (next(mine, torch.zeros(1, args.seq_len + 1, dtype=torch.long)) for _ in range(n))
    nats, targets, _, _ = all_reduce(eval_sums(model, batches, device, amp_dtype), world).tolist()
    for module in model.modules():
        # FSDP2 keeps the root's parameters gathered after a forward with no backward (here,
        # under no_grad): shard them again, or the module's parameters are no longer the
        # optimizer's and neither a checkpoint nor the next step sees the right tensors.
        if isinstance(module, FSDPModule):
            module.reshard()
    model.train()
    return nats / LN2 / targets


def train(args, build, export) -> int:
    """The run; -> its exit code: 0, or 128 + the number of the signal that stopped it."""
    out, ckpt_dir = Path(args.out), Path(args.out) / CHECKPOINT
    if not args.resume and has_checkpoint(out):
        raise CheckpointError(f"{ckpt_dir} exists: pass --resume to continue it, or choose another --out")
    resume_dir, state = find_checkpoint(out) if args.resume else (None, None)
    check_replaceable(out / "model")  # now, not after the training
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = build(resume_dir)
    rank, world, device = init_distributed(args)
    master = rank == 0
    if state is not None:
        check_resumable(state, args, world)
    data = prepare(args, rank, world)
    raw.to(device).train()
    entropies = precomputed_entropies(raw, data, args, rank, world) if getattr(args, "precomputed_entropies", False) else None
    batcher = Batcher(data.train, args.batch_size, args.seq_len, args.seed, rank, world, entropies)
    model = parallelize(raw, args, device)
    optimizer = make_optimizer(raw, args, device)
    step, elapsed = 0, 0.0
    torch.manual_seed(args.seed + rank)  # dropout: different masks on different ranks
    if state is not None:
        set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        batcher.load_state_dict(state["batcher"])
        step, elapsed = state["step"], state["elapsed"]
        if len(state["rng"]) == world:  # else (new world size) keep the fresh per-rank seeds
            set_rng_state(state["rng"][rank], device)
    # after the optimizer state is loaded: that fills the state only while no gradient exists
    one_graph = None
    if getattr(args, "one_graph", False):
        one_graph = OneGraph(raw, device, args.grad_accum > 1, args.tune_kernels, patch_pad=args.patch_pad)
    execution = Execution(raw, one_graph, args.compile, keep_packing=getattr(args, "pack_patches", None) is not None)
    batches = batcher if one_graph is None else Lookahead(batcher, device)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    bytes_per_step = args.batch_size * world * args.grad_accum * args.seq_len
    metrics = Metrics(out / "metrics.jsonl", step if state else None, master)
    if master:
        print(f"{type(raw).__name__}: {describe(raw)}; {world} process(es) on {device}, {args.dtype}; "
              f"{bytes_per_step} bytes per step; train {len(data.train)} / held-out {len(data.valid)} tokens")  # fmt: skip

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, raw, optimizer, step, batcher, args, elapsed, rank, world, device)

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    # The host reads the GPU's numbers only at "sync points" (metrics rows, evaluations,
    # checkpoints, the end): between them it queues step after step without waiting, so its
    # Python work overlaps the GPU's. Sums stay on the device until then.
    window = torch.zeros(2, device=device, dtype=torch.float64)  # loss, bytes/patch since the last row
    window_steps, window_secs = 0, 0.0
    run_bpp = torch.zeros((), device=device, dtype=torch.float64)
    run_steps, timed_s = 0, 0.0  # this run; timed_s skips its first step (compilation)
    stop = 0  # the number of the signal that stops the run
    mark = time.perf_counter()

    def sync_time() -> float:
        """Wait for the queued GPU work; -> seconds since the last sync point."""
        nonlocal mark
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        dt, mark = now - mark, now
        return dt

    with StopOnSignal() as signals, bar:  # closed on errors too: an error line starts a line of its own
        while step < args.steps:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, bpp, norm = train_step(model, raw, optimizer, batches, args, device, amp_dtype, execution)
            step += 1
            run_steps += 1
            window += torch.stack((loss.double(), bpp))
            run_bpp += bpp
            window_steps += 1
            bar.update()
            stop = signals.caught[0] if signals.caught else 0
            if world > 1:
                # Every rank must stop at the same step, or collectives would hang. Agreeing
                # means waiting for the GPU, so the ranks agree at metrics rows only.
                row = step % args.log_every == 0 or step == args.steps
                stop = agreed_signal(stop, device) if row else 0

            log_now = step % args.log_every == 0 or step == args.steps or stop
            eval_now = bool(args.eval_every) and step % args.eval_every == 0 and step < args.steps and not stop
            save_now = bool(args.save_every) and step % args.save_every == 0 and step < args.steps and not stop
            if log_now or eval_now or save_now or run_steps == 1:
                dt = sync_time()
                elapsed += dt
                window_secs += dt
                timed_s += dt if run_steps > 1 else 0.0
            if log_now:
                # One small all-reduce per row: mean loss and bytes/patch over ranks.
                loss_v, bpp_v = (all_reduce(window.clone(), world) / (world * window_steps)).tolist()
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                metrics.write(step=step, loss=loss_v, bpb=loss_v / LN2, lr=lr, bytes=step * bytes_per_step,
                              bytes_per_s=window_steps * bytes_per_step / window_secs, bytes_per_patch=bpp_v,
                              grad_norm=grad_norm, elapsed=elapsed)  # fmt: skip
                bar.set_postfix({"loss": f"{loss_v:.3f}", "bpb": f"{loss_v / LN2:.3f}",
                                 "bytes/s": f"{window_steps * bytes_per_step / window_secs:.3g}",
                                 "bytes/patch": f"{bpp_v:.2f}"})  # fmt: skip
                window.zero_()
                window_steps, window_secs = 0, 0.0
            if step == args.steps or stop:
                break
            if eval_now:
                eval_bpb = execution.retry(lambda: evaluate(model, data.valid, args, rank, world, device, amp_dtype))
                metrics.write(step=step, eval_bpb=eval_bpb, bytes=step * bytes_per_step, elapsed=elapsed)
                bar.write(f"step {step}: held-out bpb {eval_bpb:.4f}")
            if save_now:
                checkpoint()
            if eval_now or save_now:
                sync_time()  # their time is not training time

    checkpoint()
    code = 0
    if stop and step < args.steps:
        code = 128 + stop  # the shell's convention for a process ended by a signal
        if master:
            print(f"stopped by a signal ({signal.Signals(stop).name}) after step {step}; checkpoint in {ckpt_dir}; continue with --resume")
    else:
        eval_bpb = execution.retry(lambda: evaluate(model, data.valid, args, rank, world, device, amp_dtype))
        plain = full_copy(raw, rank)
        if master:
            export(plain, data, device)
            print(f"done: {step} steps, {step * bytes_per_step} training bytes, held-out bpb {eval_bpb:.4f}; model in {out / 'model'}")
        # after the export: a run that failed to export and is resumed logs its final row once
        metrics.write(step=step, eval_bpb=eval_bpb, bytes=step * bytes_per_step, elapsed=elapsed)
    metrics.close()
    mean_bpp = all_reduce(run_bpp.clone(), world).item() / (world * run_steps) if run_steps else 1.0  # collective
    if master:
        bytes_per_s = (run_steps - 1) * bytes_per_step / timed_s if run_steps > 1 and timed_s > 0 else None
        print(summary(raw, args, device, world, bytes_per_s, mean_bpp))
    if world > 1:
        dist.barrier()  # leave together: rank 0 was still writing files
    return code


def describe(model: nn.Module) -> str:
    if isinstance(model, BLT):
        return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in model.num_params().items())
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def summary(raw, args, device, world, bytes_per_s, bytes_per_patch) -> str:
    """Peak GPU memory and MFU (model FLOPs per byte from blt.flops at the measured patch size)."""
    if device.type != "cuda":
        return "peak GPU memory: n/a (CPU); MFU: n/a (CPU)"
    memory = f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None or bytes_per_s is None:
        return f"{memory}; MFU: n/a ({name if peak is None else 'too few steps to time'})"
    if isinstance(raw, BLT):
        count = blt_flops_per_byte(raw.cfg, bytes_per_patch, args.seq_len)
        # precomputed entropies: the entropy model's forward is not part of the step
        flops = count.train_blt if getattr(args, "precomputed_entropies", False) else count.train
    else:
        flops = 3 * transformer_flops_per_byte(raw.cfg, args.seq_len)
    mfu = flops * bytes_per_s / (peak * world)
    return f"{memory}; MFU: {100 * mfu:.1f}% ({flops:.3g} FLOPs/byte x {bytes_per_s:.3g} bytes/s over {world} x {peak:.3g} FLOP/s)"


def main(argv=None) -> None:
    parser = blt_parser()
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    for flag in ("patch_size", "max_patch_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.one_graph and (args.dist != "none" or args.activation_checkpointing):
        parser.error("--one-graph runs in one process, without --activation-checkpointing")
    if args.tune_kernels and not args.one_graph:
        parser.error("--tune-kernels tunes the --one-graph compilation; add --one-graph")
    if args.patch_pad < 1:
        parser.error("--patch-pad must be >= 1")
    if args.patch_pad != PATCH_PAD and not args.one_graph:
        parser.error("--patch-pad pads the --one-graph patch count; add --one-graph")
    if args.bf16_residual and args.dtype != "bf16":
        parser.error("--bf16-residual needs bf16 autocast (--dtype bf16, on CUDA)")
    if args.attention == "flash" and not (args.one_graph and args.device == "cuda"):
        parser.error("--attention flash runs inside --one-graph on CUDA (its kernels need static shapes)")
    if args.attention == "fa4" and args.device != "cuda":
        parser.error("--attention fa4 runs on CUDA")
    try:
        set_flex_backend(args.attention)
    except ValueError as err:
        parser.error(f"--attention: {err}")
    set_fused_products(args.fused_products)
    cfg, entropy_dir = blt_config(parser, args)
    if args.precomputed_entropies and not cfg.patcher.needs_entropy:
        parser.error(f"--precomputed-entropies: patching mode {cfg.patcher.mode!r} uses no entropies")

    def build(checkpoint):
        model = build_blt(cfg, entropy_dir, checkpoint, args.init_from)
        model.encoder.autocast_residual = args.bf16_residual
        model.pack_patches = args.one_graph if args.pack_patches is None else args.pack_patches
        return model

    run(
        args,
        build=build,
        export=lambda model, data, device: export_blt(model, entropy_dir, Path(args.out) / "model"),
    )


if __name__ == "__main__":
    main()
