"""How blt.train's steps run compiled: --one-graph (`OneGraph`: the patcher, then the whole
forward and loss, as compiled graphs; CUDA graphs on CUDA), and `Fallback`, which steps down to
a slower path when the compiler fails: the one graph, then each block compiled on its own
(--compile), then eager.

Replaces: the eager training step (train.loss_and_patching: the model run as it is, one
micro-batch at a time). Equal to it: test_compiled_step.py:
test_one_graph_path_matches_reference_on_cpu, test_compiled_step_matches_reference_on_cuda;
test_train.py: test_one_graph_training_matches_eager,
test_one_graph_patch_pad_changes_shapes_not_losses.
"""

import sys

import torch
from torch import nn
from tqdm import tqdm

from blt import layers
from blt.distributed import compile_blocks
from blt.layers import Rotary, set_flex_backend
from blt.masks import default_backend
from blt.model import BLT, packing_align
from blt.packing import aligned_slot_count
from blt.patcher import StartsPatching, lengths_from_starts, model_patch_starts, patch_starts

PATCH_PAD = 128  # --one-graph pads the patch count to a multiple of this (FlexAttention's block)


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
        self.align = packing_align(default_backend(device), raw.cfg.doc_mask)
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
        cfg = self.raw.cfg
        with torch.no_grad():
            if entropies is not None:  # --precomputed-entropies
                starts = patch_starts(inputs, cfg.patcher, entropies, cfg.doc_mask)
            else:
                starts = model_patch_starts(inputs, cfg.patcher, self.raw.entropy_model, cfg.doc_mask)[0]
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


def is_compile_error(error: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) comes from the compiler stack (dynamo,
    inductor, Triton), not from the model, the data or the device."""
    while error is not None:
        module = type(error).__module__
        if module.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
        error = error.__cause__ or error.__context__
    return False


class Fallback:
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
