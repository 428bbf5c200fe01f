"""A training run's data on every rank: the byte shards (rank 0 builds or finds the cache, the
others map it), the training shard's entropies for --precomputed-entropies (computed once by the
frozen entropy model and cached beside the shard), and batches on the device, with a Lookahead
that shows the next one early (for --one-graph).
"""

import hashlib
import json
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from blt.data import DataConfig, entropy_shard, prepare_data
from blt.entropy_model import stream_entropies
from blt.model import BLT


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
    hash of what the entropies depend on: the entropy model's config and weights, its context,
    the dtype and whether it reads within documents (the BLT's doc_mask). Each piece of the
    stream is run with the model's whole receptive field before it, so every entropy is what a
    run over the unbroken stream would give."""
    em, doc_mask = raw.entropy_model, raw.cfg.doc_mask
    context = em.receptive_field or args.seq_len  # a full-attention model: a training window's worth
    record = [asdict(em.cfg), context, ENTROPY_CHUNK, args.dtype] + (["doc_mask"] if doc_mask else [])
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for name, tensor in sorted(em.state_dict().items()):
        key.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    path = data.directory / f"train.entropies-{key.hexdigest()[:16]}.f16"

    def compute(tokens, out):
        was_training = em.training
        em.eval()
        with tqdm(total=len(tokens), unit="B", unit_scale=True, desc="entropies (once per data and entropy model)") as bar:
            dtype = torch.bfloat16 if args.dtype == "bf16" else None
            stream_entropies(em, tokens, out, context, ENTROPY_CHUNK, dtype=dtype, progress=bar.update,
                             doc_mask=doc_mask)  # fmt: skip
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
