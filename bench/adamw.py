"""blt.adamw's one-launch AdamW against torch's fused and foreach AdamW, one GPU: milliseconds per
optimizer step and effective bandwidth (28 bytes a parameter: param, grad, exp_avg and exp_avg_sq
read, param, exp_avg and exp_avg_sq written), for several block sizes and warp counts of ours.

    python bench/adamw.py [--blocks 2048 4096 8192] [--warps 4 8] [--steps 20]

The parameters are float32 and shaped like a ~170 M-parameter BLT: six (50002, 384) hash
embedding tables, the global transformer's and the local models' matrices (384 x 384 up to
768 x 2048) and their norm gains, in two groups as blt.train makes them (weight decay on
matrices, none on gains). Each step is timed with CUDA events, the median of `--steps` steps
after warm-up: "step" from an idle GPU, so the host's time before the kernels are queued counts;
"GPU" with the host's time hidden, as in training, where the step is queued behind the backward;
"host" until step() returns.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blt import adamw  # noqa: E402

SLEEP_CYCLES = 20_000_000  # about 10 ms at 2 GHz: longer than any step's host time


def shapes() -> list[tuple[int, ...]]:
    """About 170 M parameters: 115 M in the hash tables, the rest in ~100 matrices and gains."""
    out = [(50002, 384)] * 6
    for _ in range(6):  # global transformer layers, width 768
        out += [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048), (768,), (768,)]
    for _ in range(7):  # local encoder and decoder layers (and cross-attentions), width 384
        out += [(384, 384)] * 4 + [(1024, 384)] * 2 + [(384, 1024), (384,), (384,)]
    return out + [(768, 384), (384, 768), (260, 384), (384,)]


def events_ms(fn) -> float:
    """Milliseconds from before to after fn() on the current stream."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def timings(opt: torch.optim.Optimizer, steps: int) -> tuple[float, float, float]:
    """Median milliseconds per opt.step() after 3 warm-up steps: from an idle GPU (the host's time
    before the kernels are queued included); on the GPU alone (queued behind a sleep kernel that
    hides the host's time, the sleep's own time subtracted); on the host until step() returns."""
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    idle, gpu, slept, host = [], [], [], []
    for _ in range(steps):
        idle.append(events_ms(opt.step))
        gpu.append(events_ms(lambda: (torch.cuda._sleep(SLEEP_CYCLES), opt.step())))
        slept.append(events_ms(lambda: torch.cuda._sleep(SLEEP_CYCLES)))
        t = time.perf_counter()
        opt.step()
        host.append(1e3 * (time.perf_counter() - t))
        torch.cuda.synchronize()
    med = statistics.median
    return med(idle), med(gpu) - med(slept), med(host)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[adamw.BLOCK], help="elements per program (powers of 2)")
    ap.add_argument("--warps", type=int, nargs="+", default=[adamw.NUM_WARPS], choices=(1, 2, 4, 8, 16))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not adamw.available("cuda"):
        sys.exit("error: this benchmark needs a CUDA GPU and Triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen).requires_grad_() for s in shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    n = sum(p.numel() for p in params)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  {n / 1e6:.1f} M float32 params "
          f"in {len(params)} tensors  {28 * n / 1e9:.2f} GB moved per step")  # fmt: skip

    def make(cls: type, **kwargs) -> torch.optim.Optimizer:
        """A fresh copy of the params (grads shared), in blt.train's two groups."""
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c, p in zip(copies, params):
            c.grad = p.grad
        groups = [{"params": [c for c in copies if c.dim() >= 2], "weight_decay": 0.1},
                  {"params": [c for c in copies if c.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        return cls(groups, lr=1e-4, betas=(0.9, 0.95), **kwargs)

    print(f"{'':>28s} {'step':>8s} {'GPU':>8s} {'host':>8s}  (ms; TB/s of the GPU time)")

    def report(name: str, opt: torch.optim.Optimizer) -> None:
        idle, gpu, host = timings(opt, args.steps)
        print(f"{name:>28s} {idle:8.3f} {gpu:8.3f} {host:8.3f}  {28 * n / gpu / 1e9:6.2f} TB/s", flush=True)

    for name, kwargs in (("torch fused", {"fused": True}), ("torch foreach", {"foreach": True})):
        report(name, make(torch.optim.AdamW, **kwargs))
    for block in args.blocks:
        for warps in args.warps:
            adamw.BLOCK, adamw.NUM_WARPS = block, warps
            report(f"ours BLOCK={block} warps={warps}", make(adamw.AdamW))


if __name__ == "__main__":
    main()
