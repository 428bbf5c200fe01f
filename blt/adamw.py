"""AdamW as one Triton kernel launch per parameter group, for training on CUDA.

torch's fused AdamW is a multi-tensor kernel that walks lists of tensors in chunks; on an H200
it streams a ~170 M-parameter BLT's float32 parameters at about 3.5 TB/s (28 bytes a parameter:
param, grad, exp_avg and exp_avg_sq read, three of them written), 1.38 ms a step. Here one
streaming kernel covers every tensor of a group: the host builds, once per set of tensors, a
device table of their addresses and sizes and a block table (program -> tensor, block within
it); each program loads its tensor's addresses and updates one block of BLOCK elements. It
streams at about 4.2 TB/s, 1.13 ms a step (bench/adamw.py). Its host side takes longer than
torch's (about 0.8 ms against 0.4 on the H200 host's CPU), hidden in training, where the step
is queued while the GPU still runs the backward.

The math is torch.optim.AdamW's single-tensor path (amsgrad and maximize off), in float32,
operation for operation and with torch's roundings, so that the two agree to about a rounding
(the tests check it on CPU under Triton's interpreter, and against torch's fused kernel on CUDA):

    p = p * (1 - lr * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    p = p + (-lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

The state is torch's own (the parent's `_init_group` creates it: step a float32 CPU scalar
tensor, exp_avg and exp_avg_sq like the param), so state_dict() loads into torch.optim.AdamW
and back. Model code does not import this module; training code chooses it.
"""

import contextlib

import torch
from torch.optim.adam import adam
from torch.optim.optimizer import ParamsT, _get_scalar_dtype, _use_grad_for_differentiable

from blt import triton_support

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only torch)
    triton = None


def available(device: torch.device | str) -> bool:
    """Whether the kernel can run on tensors of this device (blt.triton_support)."""
    return triton is not None and triton_support.available(device)


# Elements and warps of each program (bench/adamw.py sweeps both).
BLOCK = 1024
NUM_WARPS = 4
MAX_NUMEL = 2**30  # offsets within a tensor are int32; a larger tensor takes torch's path
_MAX_TABLES = 16  # tables kept per optimizer; more are built only if grads keep moving in memory


if triton is not None:

    @triton.jit
    def _adamw_math(p, g, m, v, decay, w1, beta2, omb2, neg_step_size, bc2_sqrt, eps):
        """torch's single-tensor step on one block: mul_, lerp_, mul_ then addcmul_, sqrt / bc2_sqrt
        + eps, addcdiv_. Square root and divisions are IEEE-rounded (Triton's default ones are
        approximate); the fused multiply-adds are those of torch's compiled lerp and addcmul, and
        the launch stops Triton from contracting the other products and sums."""
        p = p * decay
        small = w1 < 0.5  # torch's lerp works from the nearer end
        m = tl.fma(tl.where(small, w1, w1 - 1.0), g - m, tl.where(small, m, g))
        v = tl.fma(omb2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        return p, m, v

    @triton.jit
    def _adamw_kernel(
        TABLE, BLOCKS, T, NB,
        decay, w1, beta2, omb2, neg_step_size, bc2_sqrt, eps,
        BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    ):  # fmt: skip
        """One block of one tensor. TABLE (5, T) int64: addresses of the params, grads, exp_avgs
        and exp_avg_sqs, then numels; BLOCKS (2, NB) int32: each program's tensor and block."""
        pid = tl.program_id(0)
        t = tl.load(BLOCKS + pid)
        start = tl.load(BLOCKS + NB + pid) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        n = tl.load(TABLE + 4 * T + t)
        p_ptr = tl.load(TABLE + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(TABLE + T + t).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(TABLE + 2 * T + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(TABLE + 3 * T + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # all addresses 16-byte aligned: 128-bit loads and stores
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        if start + BLOCK <= n:  # a full block, unmasked: a mask would keep the loads scalar
            p, m, v = _adamw_math(
                tl.load(p_ptr + offs), tl.load(g_ptr + offs), tl.load(m_ptr + offs), tl.load(v_ptr + offs),
                decay, w1, beta2, omb2, neg_step_size, bc2_sqrt, eps,
            )  # fmt: skip
            tl.store(p_ptr + offs, p)
            tl.store(m_ptr + offs, m)
            tl.store(v_ptr + offs, v)
        else:
            mask = offs < n
            p, m, v = _adamw_math(
                tl.load(p_ptr + offs, mask=mask), tl.load(g_ptr + offs, mask=mask),
                tl.load(m_ptr + offs, mask=mask), tl.load(v_ptr + offs, mask=mask),
                decay, w1, beta2, omb2, neg_step_size, bc2_sqrt, eps,
            )  # fmt: skip
            tl.store(p_ptr + offs, p, mask=mask)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def _tables(key: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The kernel's TABLE (5, T) and BLOCKS (2, NB) on the device, and whether all addresses are
    16-byte aligned, for key = the addresses of the params, grads, exp_avgs and exp_avg_sqs, then
    the numels, T of each."""
    table = torch.tensor(key, dtype=torch.int64).view(5, -1)
    counts = (table[4] + BLOCK - 1) // BLOCK
    tensor = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # of each block's tensor
    blocks = torch.stack([tensor, torch.arange(len(tensor)) - first]).int()
    return table.to(device), blocks.to(device), bool((table[:4] % 16 == 0).all())


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step is one Triton kernel per parameter group where the group
    allows it: its params with a grad, their grads and states all contiguous float32 tensors on
    one CUDA device (or on CPU under TRITON_INTERPRET=1, for tests), one step count, and no
    amsgrad, maximize, capturable, differentiable, tensor hyperparameters or AMP grad scaling.
    Other groups take torch's single-tensor path; sparse grads raise, as in torch.

    foreach and fused are always False, whatever is passed: torch's path is then its single-tensor
    code, and the state is as that path keeps it, the step count on the CPU, where the host reads
    it without a device sync. A state dict of a fused torch.optim.AdamW (step counts on the
    device) loads as well: its step counts are moved to the CPU."""

    def __init__(self, params: ParamsT, *args, foreach: bool | None = None, fused: bool | None = None, **kwargs):
        super().__init__(params, *args, foreach=False, fused=False, **kwargs)
        self._kernel_tables: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_kernel_tables", {})
        for group in self.param_groups:
            group["foreach"] = group["fused"] = False
            for p in group["params"]:
                s = self.state.get(p)
                if s and torch.is_tensor(s.get("step")) and s["step"].device.type != "cpu":
                    s["step"] = torch.tensor(float(s["step"]), dtype=_get_scalar_dtype())

    def _kernel_key(self, group: dict, tensors: list[list[torch.Tensor]], steps: list[torch.Tensor]) -> tuple | None:
        """The key of the group's kernel tables (the addresses of its params, grads, exp_avgs and
        exp_avg_sqs, their numels and BLOCK), or None where the kernel cannot take the group."""
        if any(group[k] for k in ("amsgrad", "maximize", "capturable", "differentiable", "fused")):
            return None
        if not group["decoupled_weight_decay"]:
            return None
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return None  # set by AMP's GradScaler for optimizers that unscale in their step
        hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        if not all(isinstance(x, (float, int)) for x in hyper):
            return None
        device = tensors[0][0].device
        if not available(device):
            return None
        step = float(steps[0])
        if not all(float(s) == step for s in steps):
            return None
        if any(type(x) not in (torch.Tensor, torch.nn.Parameter) for ts in tensors for x in ts):
            return None  # e.g. FSDP2's DTensors: their data_ptr is not the whole tensor's
        f32, numels = torch.float32, []
        for p, g, m, v in zip(*tensors):  # a grad has its param's size, dtype and device (autograd checks)
            n = p.numel()
            if p.device != device or p.dtype is not f32 or n > MAX_NUMEL:
                return None
            if not (p.is_contiguous() and g.is_contiguous()):
                return None
            for x in (m, v):  # on the param's device (load_state_dict moves them), but a loaded one's size is unchecked
                if x.dtype is not f32 or not x.is_contiguous() or x.numel() != n:
                    return None
            numels.append(n)
        return tuple(x.data_ptr() for ts in tensors for x in ts) + tuple(numels) + (BLOCK,)

    def _kernel_step(self, group: dict, key: tuple, device: torch.device, steps: list[torch.Tensor]) -> None:
        torch._foreach_add_(steps, 1)
        step = float(steps[0])
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if key not in self._kernel_tables:  # tables follow from their key alone: a cached one is never stale
            if len(self._kernel_tables) >= _MAX_TABLES:
                self._kernel_tables.clear()
            self._kernel_tables[key] = _tables(key[:-1], device)
        table, blocks, aligned = self._kernel_tables[key]
        if blocks.shape[1] == 0:  # only empty tensors
            return
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _adamw_kernel[(blocks.shape[1],)](
                table, blocks, table.shape[1], blocks.shape[1],
                1 - lr * decay, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps,
                BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )  # fmt: skip

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One optimization step; returns the closure's loss if a closure is given."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            if not params:
                continue
            key = self._kernel_key(group, [params, grads, exp_avgs, exp_avg_sqs], steps)
            if key is not None:
                self._kernel_step(group, key, params[0].device, steps)
                continue
            # torch.optim.Adam.step's call for one group (calling super().step() would run the
            # step hooks a second time)
            beta1, beta2 = group["betas"]
            adam(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"],
            )  # fmt: skip
        return loss
