"""Weight averaging: an exponential moving average (EMA) of the trained weights (--ema DECAY).

After every optimizer step each trained parameter's average moves towards it,

    avg <- avg + (1 - decay) * (w - avg),        avg = w at the start,

in float32, beside the weights the optimizer trains (which it never changes). The average
counts about the last 1 / (1 - decay) steps: decay 0.995 averages over ~200 steps. Keep that
short against the run: a cosine schedule already anneals the final weights, and an average
over 500 of 1,200 steps keeps weights of the high learning rates (1.3121 against 1.2309 BPB at
CPU scale, PROGRESS.md). Not in the paper; a standard way to try for a better model from the
same training.

blt.train evaluates it beside the trained weights (`eval_bpb_ema` next to `eval_bpb` in the
metrics) and exports it as the model; checkpoints hold it, so --resume continues the same
average. Frozen parameters (a BLT's entropy model) are not averaged. The parameters must be
whole on every process (one process or DDP; FSDP shards them, which blt.train refuses).
"""

from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.avg = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: call after each optimizer step."""
        torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self):
        """The model's trained parameters hold the average inside the block, their own values
        again after it."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "avg": {n: a.cpu() for n, a in zip(self.names, self.avg)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved average; ValueError when it is of another model or decay."""
        if state["decay"] != self.decay:
            raise ValueError(f"the checkpoint's EMA decay is {state['decay']}, this run's {self.decay}")
        if list(state["avg"]) != self.names:
            raise ValueError("the checkpoint's EMA is of other parameters than this model's")
        with torch.no_grad():
            for a, n in zip(self.avg, self.names):
                a.copy_(state["avg"][n])
