"""Data parallelism for blt.train: the process group under torchrun (gloo on CPU, nccl on CUDA),
sums over ranks, and the trained model's wrapping: activation checkpointing, torch.compile of
each block, then DDP or FSDP2 (`parallelize`). Also what the loop needs of it: gradients synced
only on an accumulation's last micro-step, a plain copy of FSDP's sharded weights for writing
model folders, and every rank stopping when one caught a signal.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from blt.entropy_model import EntropyModel
from blt.model import BLT


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


def agreed_signal(signum: int, device: torch.device) -> int:
    """The largest signal number any rank caught (0: none), so that all stop if one does."""
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


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
    elif args.dist == "ddp" and one_graph:
        # The one compiled graph computes the gradients of the plain model; average_gradients
        # then does what DDP's hooks would (DDP's reducer cannot run inside the graph).
        for p in model.parameters():
            dist.broadcast(p.data, src=0)  # as DDP does at construction: rank 0's weights everywhere
    elif args.dist == "ddp":
        # No buffer needs syncing (rotary tables and frequencies are the same on every rank),
        # so none is broadcast before each forward.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def average_gradients(params: list[nn.Parameter], world: int, bucket_bytes: int = 64 << 20) -> None:
    """Replace each gradient by its mean over the ranks, as DDP's reducer does: one all-reduce
    per bucket of about bucket_bytes, the gradients flattened into it and copied back."""
    grads = [p.grad for p in params if p.grad is not None]
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and (end == start or size + grads[end].numel() * grads[end].element_size() <= bucket_bytes):
            size += grads[end].numel() * grads[end].element_size()
            end += 1
        bucket = grads[start:end]
        flat = torch.cat([g.reshape(-1) for g in bucket]).div_(world)
        dist.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))
        start = end


def syncs_itself(model: nn.Module) -> bool:
    """Whether the wrapped model averages its gradients over the ranks itself (DDP, FSDP)."""
    return isinstance(model, (DDP, FSDPModule))


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


def grad_sync(model: nn.Module, enabled: bool):
    """Reduce gradients only on the last micro-step of an accumulation."""
    if isinstance(model, DDP):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()
