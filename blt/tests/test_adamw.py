"""blt.adamw: the one-launch AdamW against torch.optim.AdamW.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported, hence in a child process); without Triton that test is skipped. Without the
interpreter the optimizer takes torch's path on CPU, checked in-process. On CUDA it is checked
against torch's fused AdamW.
"""

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blt import adamw

ROOT = Path(__file__).resolve().parents[2]
has_triton = importlib.util.find_spec("triton") is not None
SHAPES = [(7,), (33, 5), (1000,), (3, 2049)]  # odd sizes: tails of blocks, a tensor of several blocks


def make(cls: type, params: list[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
    """Two groups with different learning rates and weight decays: params[:2] and params[2:]."""
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.01, "lr": 3e-3}]
    return cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def leaves(device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in SHAPES]


def set_grads(param_sets: list[list[torch.Tensor]], g: torch.Generator, skip: int | None = None) -> None:
    """The same random grads for each set of params; param `skip` gets none."""
    for i, ps in enumerate(zip(*param_sets)):
        grad = None if i == skip else torch.randn(ps[0].shape, generator=g).to(ps[0].device)
        for p in ps:
            p.grad = None if grad is None else grad.clone()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, msg: str = "") -> None:
    """Within rtol of b's elements or of b's largest magnitude: where a moment is near zero by
    cancellation, one rounding more or less upstream is a large part of it."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()), msg=msg or None)


def assert_same(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, rtol: float = 1e-6) -> None:
    """Params and states of two optimizers over equal-shaped params agree, step counts exactly
    (value, dtype and device)."""
    mine = [p for group in ours.param_groups for p in group["params"]]
    other = [p for group in theirs.param_groups for p in group["params"]]
    for p, q in zip(mine, other, strict=True):
        assert_close(p, q, rtol)
        a, b = ours.state[p], theirs.state[q]
        assert a.keys() == b.keys()
        for k in a:
            if k == "step":
                assert torch.equal(a[k], b[k]) and a[k].device == b[k].device and a[k].dtype == b[k].dtype
            else:
                assert_close(a[k], b[k], rtol, k)


CHECKS = textwrap.dedent(
    """
    import copy

    import torch
    from blt import adamw
    from blt.tests.test_adamw import assert_same, leaves, make, set_grads

    assert adamw.available("cpu")
    launches = []
    kernel_step = adamw.AdamW._kernel_step

    def counted(self, group, key, device, steps):
        launches.append(len(steps))  # params updated by one launch
        kernel_step(self, group, key, device, steps)

    adamw.AdamW._kernel_step = counted
    g = torch.Generator().manual_seed(1)
    mine, theirs = leaves(), leaves()
    ours, ref = make(adamw.AdamW, mine), make(torch.optim.AdamW, theirs, foreach=False)

    def step(opts, sets, skip=None):
        set_grads(sets, g, skip)
        for opt in opts:
            opt.step()

    for _ in range(3):
        step([ours, ref], [mine, theirs])
        assert_same(ours, ref)
    assert launches == [2, 2] * 3, launches

    # state dicts (copies, as from a file: loading keeps the tensors) both ways, then a step of all four
    mine2, theirs2 = ([p.detach().clone().requires_grad_() for p in ps] for ps in (mine, theirs))
    ref2, ours2 = make(torch.optim.AdamW, mine2, foreach=False), make(adamw.AdamW, theirs2)
    ref2.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours2.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert_same(ref2, ref)
    assert_same(ours2, ref)
    step([ours, ref, ref2, ours2], [mine, theirs, mine2, theirs2])
    for opt in (ours, ref2, ours2):
        assert_same(opt, ref)

    # a param without a grad is skipped: its state stays, and its step count falls behind its
    # group's, which then takes torch's path
    launches.clear()
    before = mine[1].detach().clone(), ours.state[mine[1]]["exp_avg"].clone()
    step([ours, ref], [mine, theirs], skip=1)
    assert_same(ours, ref)
    assert torch.equal(mine[1], before[0]) and torch.equal(ours.state[mine[1]]["exp_avg"], before[1])
    step([ours, ref], [mine, theirs])
    assert_same(ours, ref)
    assert launches == [1, 2, 2], launches

    # options the kernel does not take: torch's path for every group
    launches.clear()
    for kwargs in ({"amsgrad": True}, {"maximize": True}):
        mine, theirs = leaves(), leaves()
        ours, ref = make(adamw.AdamW, mine, **kwargs), make(torch.optim.AdamW, theirs, foreach=False, **kwargs)
        for _ in range(2):
            step([ours, ref], [mine, theirs])
        assert_same(ours, ref, rtol=0)
    assert launches == [], launches
    print("ok")
    """
)


@pytest.mark.skipif(not has_triton, reason="needs Triton (its interpreter runs the kernel on CPU)")
def test_kernel_interpreted_matches_torch():
    """Several steps of two groups (different lr and weight decay) against torch's single-tensor
    AdamW; state dicts both ways, then a step; a param without a grad skipped as torch skips it;
    amsgrad and maximize left to torch. Within 1e-6 relative: CPU builds of torch differ in
    which products and sums they fuse (torch 2.13 on x86-64 agrees with the kernel in all but a
    few elements, by a rounding)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_falls_back_to_torch_on_cpu(monkeypatch):
    """Without the interpreter, CPU params take torch's single-tensor path: bit for bit torch's,
    state and state dict alike, whatever foreach and fused say."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(adamw.AdamW, "_kernel_step", lambda *a: pytest.fail("the kernel ran on CPU"))
    g = torch.Generator().manual_seed(0)
    mine, theirs = leaves(), leaves()
    ours, ref = make(adamw.AdamW, mine, foreach=True, fused=True), make(torch.optim.AdamW, theirs, foreach=False)
    for skip in (None, 2, None):
        set_grads([mine, theirs], g, skip)
        ours.step()
        ref.step()
        assert_same(ours, ref, rtol=0)
    assert all(not group["foreach"] and not group["fused"] for group in ours.param_groups)
    assert str(ours.state_dict()["state"]) == str(ref.state_dict()["state"])


@pytest.mark.skipif(not torch.cuda.is_available() or not has_triton, reason="needs CUDA and Triton")
def test_kernel_matches_fused_adamw_on_cuda(monkeypatch):
    """Against torch's fused AdamW on CUDA, params of many blocks too, within 1e-6 relative; a
    fused optimizer's state dict (step counts on the GPU) loads and steps on."""
    launches = []
    kernel_step = adamw.AdamW._kernel_step

    def counted(self, group, key, device, steps):
        launches.append(len(steps))
        kernel_step(self, group, key, device, steps)

    monkeypatch.setattr(adamw.AdamW, "_kernel_step", counted)
    g = torch.Generator().manual_seed(0)
    shapes = [*SHAPES, (4096,), (384, 1536), (50002, 96)]

    def params() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(s, generator=gen).cuda().requires_grad_() for s in shapes]

    mine, theirs = params(), params()
    ours, ref = make(adamw.AdamW, mine), make(torch.optim.AdamW, theirs, fused=True)
    for _ in range(5):
        set_grads([mine, theirs], g)
        ours.step()
        ref.step()
        assert_same_values(ours, ref)
    assert launches == [2, len(shapes) - 2] * 5
    ours2 = make(adamw.AdamW, [p.detach().clone().requires_grad_() for p in theirs])
    ours2.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert all(s["step"].device.type == "cpu" and float(s["step"]) == 5 for s in ours2.state.values())
    set_grads([[p for group in ours2.param_groups for p in group["params"]], theirs], g)
    ours2.step()
    ref.step()
    assert_same_values(ours2, ref)
    assert launches[-2:] == [2, len(shapes) - 2]


def assert_same_values(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    """Params and states within 1e-6 relative (torch's fused kernel rounds differently from its
    single-tensor path: its exp_avg is beta1 * m + (1 - beta1) * g, not a lerp); step counts equal
    in value (torch's fused keeps them on the GPU)."""
    mine = [p for group in ours.param_groups for p in group["params"]]
    other = [p for group in theirs.param_groups for p in group["params"]]
    for p, q in zip(mine, other, strict=True):
        assert_close(p, q, 1e-6)
        a, b = ours.state[p], theirs.state[q]
        assert float(a["step"]) == float(b["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(a[k], b[k], 1e-6, k)
