"""Train a Byte Latent Transformer: `python -m blt.train --entropy-model runs/entropy/model`.

This file is also the training core of `blt.train_entropy` (the byte LM used as entropy model
and as the plain byte-transformer baseline). Both share the flags of `blt.train_flags` and the
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
                    `elapsed` the seconds spent in training steps (all resumes, evals excluded);
                    for blt.train_bpe's token LM, bpb and eval_bpb are bits per byte too, and
                    bytes are training tokens x the training stream's mean bytes per token
    model/          the final model folder, for checkpoint.from_pretrained, blt.eval and blt.generate
    checkpoint/, checkpoint.prev/, run.lock: see blt.train_state, which also says how --resume
                    continues a run and how a signal stops one

Here: building and exporting the BLT, the optimizer and its schedule, metrics.jsonl, and the
loop (`run`, `train`, `train_step`, `evaluate`). What they call on the way:
    blt.train_flags   the flags, and the BLTConfig they make
    blt.train_data    byte shards on every rank, --precomputed-entropies, batches on the device
    blt.distributed   torch.distributed, and the model wrapped for training (activation
                      checkpointing, compile, DDP or FSDP2)
    blt.one_graph     --one-graph, and the slower paths a failed compilation falls back to
    blt.train_state   checkpoints, resuming, the run lock, stopping on a signal
"""

import errno
import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from blt import adamw, fa4
from blt.checkpoint import (
    CONFIG,
    THRESHOLD,
    WEIGHTS,
    CheckpointError,
    WriteError,
    check_replaceable,
    load_entropy_model,
    load_model,
    load_weights,
    read_safetensors,
    save_model,
)
from blt.config import ADDED_LATER, BLTConfig, ConfigError, load_json
from blt.data import Batcher, DataError, iter_eval_batches
from blt.ema import WeightAverage
from blt.distributed import (
    agreed_signal,
    all_reduce,
    average_gradients,
    full_copy,
    grad_sync,
    init_distributed,
    parallelize,
    syncs_itself,
)
from blt.eval import eval_sums, logits_and_patching
from blt.execution import ExecutionChoices, Machine, choose
from blt.flops import blt_flops_per_byte, token_lm_flops_per_byte
from blt.layers import set_flex_backend, set_fused_products
from blt.model import BLT
from blt.one_graph import PATCH_PAD, Fallback, OneGraph
from blt.patcher import patch_starts, patching_from_starts
from blt.tokens import BOE_ID
from blt.train_data import Lookahead, precomputed_entropies, prepare, to_device
from blt.train_flags import blt_config, blt_parser, check_common_args
from blt.train_state import (
    CHECKPOINT,
    Metrics,
    StopOnSignal,
    check_resumable,
    find_checkpoint,
    has_checkpoint,
    release_lock,
    save_checkpoint,
    set_rng_state,
    take_lock,
)

LN2 = math.log(2)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak per GPU


# ---- the BLT: build and export -----------------------------------------------------------


def build_blt(cfg: BLTConfig, entropy_dir: Path | None, checkpoint: Path | None, init_from: str | None = None) -> BLT:
    if checkpoint is not None:
        saved = {**ADDED_LATER, **load_json(checkpoint / CONFIG, "checkpoint config")}  # as load_model reads it
        check_same_config(cfg.to_dict(), saved, checkpoint)
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


# ---- optimizer ---------------------------------------------------------------------------


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


# ---- metrics -----------------------------------------------------------------------------


# ---- the shared loop ---------------------------------------------------------------------


def run(args, build, export, data=prepare) -> None:
    """Train, then export. build(checkpoint_dir | None) -> model (CPU, fp32): fresh, or loaded
    from the checkpoint after checking it is the same model; export(model, data, device) writes
    out/model on rank 0. data(args, rank, world) -> the token streams (default: the byte shards;
    blt.train_bpe passes BPE ones, whose `bytes_per_token` and `byte_counts` make the logged
    bpb and eval_bpb bits per byte and `bytes` the training bytes). Known errors become one
    `error: ...` line and exit code 1; a run stopped by a signal exits with 128 + its number,
    after saving a checkpoint."""
    out, lock, code = Path(args.out), None, 0
    try:
        if int(os.environ.get("RANK", 0)) == 0:
            lock = take_lock(out)
        code = train(args, build, export, data)
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
        # (the other order can hang at exit). The model, optimizer and FSDP state sit in
        # reference cycles (thousands of objects) that only the collector frees: collected here,
        # not during interpreter exit, where a rank can abort in the group's teardown.
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
    if code:
        sys.exit(code)


def loss_and_patching(model, batch, cfg: BLTConfig | None = None):
    """(B, T+1) batch -> (mean next-byte loss, Patching or None): the model run as it is. A batch
    (tokens, entropies) is patched from those entropies as the BLT config `cfg` says."""
    if isinstance(batch, tuple):
        batch, entropies = batch
        starts = patch_starts(batch[:, :-1], cfg.patcher, entropies, cfg.doc_mask)
        patching = patching_from_starts(starts, entropies)
        logits = model(batch[:, :-1], None, patching.patch_lengths, patching.next_starts_patch).logits
    else:
        logits, patching = logits_and_patching(model, batch[:, :-1])
    # the vocabulary is the logits' (bytes for a BLT or byte LM, BPE tokens for blt.train_bpe)
    return F.cross_entropy(logits.float().flatten(0, -2), batch[:, 1:].reshape(-1), ignore_index=BOE_ID), patching


def train_step(model, raw, optimizer, batcher, args, device, amp_dtype, execution=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over --grad-accum micro-batches -> (mean loss, mean bytes/patch, grad
    norm), all device tensors: reading them would make the host wait for the GPU, so the loop
    reads them only when it logs. execution: a Fallback; with its OneGraph (--one-graph)
    computing the loss and a Lookahead as batcher, the next micro-batch is patched early. A
    micro-batch whose compilation fails runs again on the next slower path (Fallback.retry)."""
    execution = execution or Fallback(raw, None, compiled=False)

    def micro_step(batch, sync: bool):
        one_graph = execution.one_graph
        with grad_sync(model, sync):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if one_graph is None:
                    loss, patching = loss_and_patching(model, batch, raw.cfg if isinstance(raw, BLT) else None)
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
    trained = [p for p in raw.parameters() if p.requires_grad]
    if dist.is_initialized() and dist.get_world_size() > 1 and not syncs_itself(model):
        average_gradients(trained, dist.get_world_size())  # --one-graph under --dist ddp
    norm = nn.utils.clip_grad_norm_(trained, args.clip or math.inf)
    optimizer.step()
    if execution.one_graph is not None:
        execution.one_graph.zero_grad(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss_sum / args.grad_accum, bpp_sum / args.grad_accum, norm


def evaluate(model, valid, args, rank, world, device, amp_dtype, byte_counts=None) -> float:
    """Held-out bits per byte over the first --eval-batches batches of every rank (0: all).
    byte_counts: bytes each token id stands for (BPE tokens; None: one byte per token)."""
    model.eval()
    n_windows = math.ceil((len(valid) - 1) / args.seq_len)
    # Every rank runs the same number of batches (FSDP forwards are collective): rank 0 has the
    # most windows; the others pad with all-BOE windows, which add nothing to the sums.
    n = math.ceil(math.ceil(n_windows / world) / args.batch_size)
    n = min(n, args.eval_batches) if args.eval_batches else n
    mine = iter_eval_batches(valid, args.batch_size, args.seq_len, rank, world)
    batches = (next(mine, torch.zeros(1, args.seq_len + 1, dtype=torch.long)) for _ in range(n))
    nats, targets, _, _ = all_reduce(eval_sums(model, batches, device, amp_dtype, byte_counts), world).tolist()
    for module in model.modules():
        # FSDP2 keeps the root's parameters gathered after a forward with no backward (here,
        # under no_grad): shard them again, or the module's parameters are no longer the
        # optimizer's and neither a checkpoint nor the next step sees the right tensors.
        if isinstance(module, FSDPModule):
            module.reshard()
    model.train()
    return nats / LN2 / targets


def train(args, build, export, prepare_data=prepare) -> int:
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
    data = prepare_data(args, rank, world)
    # BPE token streams: bytes per training token (for the logged bpb and bytes, a mean over the
    # training stream) and bytes per token id (exact held-out bits per byte); 1 and None for bytes
    bytes_per_token, byte_counts = getattr(data, "bytes_per_token", 1.0), getattr(data, "byte_counts", None)
    raw.to(device).train()
    entropies = precomputed_entropies(raw, data, args, rank, world) if getattr(args, "precomputed_entropies", False) else None
    batcher = Batcher(data.train, args.batch_size, args.seq_len, args.seed, rank, world, entropies)
    model = parallelize(raw, args, device)
    optimizer = make_optimizer(raw, args, device)
    ema = WeightAverage(raw, args.ema) if args.ema else None
    step, elapsed = 0, 0.0
    torch.manual_seed(args.seed + rank)  # dropout: different masks on different ranks
    if state is not None:
        set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        batcher.load_state_dict(state["batcher"])
        if ema is not None:
            try:
                ema.load_state_dict(state["ema"])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"cannot resume: {resume_dir}'s average of the weights (--ema): {e}") from None
        step, elapsed = state["step"], state["elapsed"]
        if len(state["rng"]) == world:  # else (new world size) keep the fresh per-rank seeds
            set_rng_state(state["rng"][rank], device)
    # after the optimizer state is loaded: that fills the state only while no gradient exists
    one_graph = None
    if getattr(args, "one_graph", False):
        one_graph = OneGraph(raw, device, args.grad_accum > 1, args.tune_kernels, patch_pad=args.patch_pad)
    execution = Fallback(raw, one_graph, args.compile, keep_packing=getattr(args, "pack_patches", None) is not None)
    batches = batcher if one_graph is None else Lookahead(batcher, device)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    bytes_per_step = args.batch_size * world * args.grad_accum * args.seq_len  # tokens, as many bytes for a byte model
    if byte_counts is not None:
        bytes_per_step *= bytes_per_token
    metrics = Metrics(out / "metrics.jsonl", step if state else None, master)
    if master:
        print(f"{type(raw).__name__}: {describe(raw)}; {world} process(es) on {device}, {args.dtype}; "
              f"{bytes_per_step} bytes per step; train {len(data.train)} / held-out {len(data.valid)} tokens")  # fmt: skip

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, raw, optimizer, step, batcher, args, elapsed, rank, world, device, ema)

    def held_out() -> dict:
        """Held-out bits per byte of the trained weights, and of their average (--ema)."""
        def run():
            return evaluate(model, data.valid, args, rank, world, device, amp_dtype, byte_counts)

        bpb = {"eval_bpb": execution.retry(run)}
        if ema is not None:
            with ema.applied():
                bpb["eval_bpb_ema"] = execution.retry(run)
        return bpb

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
            if ema is not None:
                ema.update()
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
                bpp_v *= bytes_per_token  # a token LM's "patch" is a token
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                metrics.write(step=step, loss=loss_v, bpb=loss_v / LN2 / bytes_per_token, lr=lr, bytes=step * bytes_per_step,
                              bytes_per_s=window_steps * bytes_per_step / window_secs, bytes_per_patch=bpp_v,
                              grad_norm=grad_norm, elapsed=elapsed)  # fmt: skip
                bar.set_postfix({"loss": f"{loss_v:.3f}", "bpb": f"{loss_v / LN2 / bytes_per_token:.3f}",
                                 "bytes/s": f"{window_steps * bytes_per_step / window_secs:.3g}",
                                 "bytes/patch": f"{bpp_v:.2f}"})  # fmt: skip
                window.zero_()
                window_steps, window_secs = 0, 0.0
            if step == args.steps or stop:
                break
            if eval_now:
                bpb = held_out()
                metrics.write(step=step, **bpb, bytes=step * bytes_per_step, elapsed=elapsed)
                bar.write(f"step {step}: held-out bpb {bpb['eval_bpb']:.4f}"
                          + (f", of the average {bpb['eval_bpb_ema']:.4f}" if ema is not None else ""))  # fmt: skip
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
        bpb = held_out()
        with ema.applied() if ema is not None else nullcontext():  # --ema: the average is the model
            plain = full_copy(raw, rank)
            if master:
                export(plain, data, device)
        if master:
            averaged = f", of the average (exported) {bpb['eval_bpb_ema']:.4f}" if ema is not None else ""
            print(f"done: {step} steps, {round(step * bytes_per_step)} training bytes, held-out bpb {bpb['eval_bpb']:.4f}"
                  f"{averaged}; model in {out / 'model'}")  # fmt: skip
        # after the export: a run that failed to export and is resumed logs its final row once
        metrics.write(step=step, **bpb, bytes=step * bytes_per_step, elapsed=elapsed)
    metrics.close()
    mean_bpp = all_reduce(run_bpp.clone(), world).item() / (world * run_steps) if run_steps else 1.0  # collective
    if master:
        bytes_per_s = (run_steps - 1) * bytes_per_step / timed_s if run_steps > 1 and timed_s > 0 else None
        print(summary(raw, args, device, world, bytes_per_s, mean_bpp, bytes_per_token))
    if world > 1:
        dist.barrier()  # leave together: rank 0 was still writing files
    return code


def describe(model: nn.Module) -> str:
    if isinstance(model, BLT):
        params = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in model.num_params().items())
        return f"{params}, document masking {'on' if model.cfg.doc_mask else 'off'}"
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def summary(raw, args, device, world, bytes_per_s, bytes_per_patch, bytes_per_token=1.0) -> str:
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
    else:  # a byte LM, or blt.train_bpe's token LM: per token, shared by the bytes a token stands for
        flops = 3 * token_lm_flops_per_byte(raw.cfg, raw.output.out_features, args.seq_len, bytes_per_token)
    mfu = flops * bytes_per_s / (peak * world)
    return f"{memory}; MFU: {100 * mfu:.1f}% ({flops:.3g} FLOPs/byte x {bytes_per_s:.3g} bytes/s over {world} x {peak:.3g} FLOP/s)"


def execution_choices(args) -> ExecutionChoices:
    """The flags left to their default (None) resolved by blt.execution for this machine,
    written back into args; flags given are kept as given (and checked by main). Entropy
    patching is assumed until the config is read (main turns precomputed entropies off for
    other patchings)."""
    machine = Machine(cuda=args.device == "cuda", distributed=args.dist != "none", bf16=args.dtype == "bf16",
                      entropy_patching=True, fa4_installed=fa4.available(),
                      activation_checkpointing=args.activation_checkpointing)  # fmt: skip
    choices = choose(machine, args.one_graph, args.compile, args.fused_products, args.bf16_residual,
                     args.precomputed_entropies, args.attention)  # fmt: skip
    for name, value in asdict(choices).items():
        setattr(args, name, value)
    return choices


def main(argv=None) -> None:
    parser = blt_parser()
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    for flag in ("patch_size", "max_patch_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    forced_precomputed, forced_attention = args.precomputed_entropies, args.attention
    choices = execution_choices(args)
    if args.one_graph and (args.dist == "fsdp" or args.activation_checkpointing):
        parser.error("--one-graph runs in one process or under --dist ddp, without --activation-checkpointing")
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
    cfg, entropy_dir = blt_config(parser, args)
    if cfg.doc_mask and args.attention in ("fa4", "flash"):
        # FlashAttention-4's kernels would need each row's documents as variable-length
        # sequences (blt.masks.document_causal_mask); FlexAttention's Triton kernels run them.
        if forced_attention:
            parser.error(f"--attention {args.attention}: FlashAttention-4's kernels do not run document masks; "
                         "pass --attention triton, or --no-doc-mask")  # fmt: skip
        choices = replace(choices, attention="triton")
        args.attention = "triton"
    try:
        set_flex_backend(args.attention)
    except ValueError as err:
        parser.error(f"--attention: {err}")
    set_fused_products(args.fused_products)
    if not cfg.patcher.needs_entropy and args.precomputed_entropies:
        if forced_precomputed:
            parser.error(f"--precomputed-entropies: patching mode {cfg.patcher.mode!r} uses no entropies")
        choices = replace(choices, precomputed_entropies=False)
        args.precomputed_entropies = False
    if int(os.environ.get("RANK", 0)) == 0:
        print(choices.describe(cuda=args.device == "cuda"), flush=True)

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
