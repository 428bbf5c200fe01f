"""How a training run executes: one place that turns the flags (each on, off, or left to the
default) and the machine into the execution choices, and says them in one line.

The model code knows none of this: the choices are applied to a finished model from outside
(blt.train). Left to the default, a run takes the fastest path that is available and tested:

    CUDA, one process   the whole forward and loss as one compiled graph (--one-graph), fused
                        products, a bf16 residual stream, entropies computed once over the
                        training shard (entropy patching), FlashAttention-4's kernels when the
                        flash-attn-4 package is installed, otherwise FlexAttention's Triton ones
    CUDA, several       each transformer block compiled (--compile): the one-graph step is one
    processes           process only; fused products and the bf16 residual as above
    CPU                 eager, float32

Every part can be turned off (--no-one-graph, --no-fused-products, ...) or forced on; a forced
choice the machine cannot run is a one-line error (blt.train's flag checks).
"""

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Machine:
    """What the defaults depend on."""

    cuda: bool
    distributed: bool = False  # several processes under torchrun (--dist ddp|fsdp)
    bf16: bool = False  # bf16 autocast (CUDA's default dtype)
    entropy_patching: bool = False  # the patcher reads the entropy model
    fa4_installed: bool = False
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class ExecutionChoices:
    one_graph: bool = False
    compile: bool = False  # each transformer block on its own (the multi-process path)
    fused_products: bool = False
    bf16_residual: bool = False
    precomputed_entropies: bool = False
    attention: str = "triton"

    def describe(self, cuda: bool = True) -> str:
        """One line: what runs. The attention backend is FlexAttention's (or FlashAttention-4's)
        on CUDA; a CPU runs dense SDPA masks whatever the backend's setting."""
        on = [f.name.replace("_", " ") for f in fields(self) if getattr(self, f.name) is True]
        return f"execution: {', '.join(on) or 'eager'}; attention {self.attention if cuda else 'SDPA (dense masks)'}"


def choose(machine: Machine, one_graph=None, compile=None, fused_products=None, bf16_residual=None,
           precomputed_entropies=None, attention=None) -> ExecutionChoices:  # fmt: skip
    """The choices for `machine`; each argument None (the flag not given) takes the default, a
    bool or a backend name is kept as given."""

    def pick(given, default: bool) -> bool:
        return default if given is None else bool(given)

    fast = machine.cuda
    single = not machine.distributed and not machine.activation_checkpointing
    one_graph = pick(one_graph, fast and single and not compile)
    return ExecutionChoices(
        one_graph=one_graph,
        compile=pick(compile, fast and not one_graph),
        fused_products=pick(fused_products, fast),
        bf16_residual=pick(bf16_residual, fast and machine.bf16),
        precomputed_entropies=pick(precomputed_entropies, fast and machine.entropy_patching),
        attention=attention or ("fa4" if fast and machine.fa4_installed else "triton"),
    )
