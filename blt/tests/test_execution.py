"""The execution defaults: the fastest tested path on CUDA, eager on CPU, every part can be
turned off or forced on, and the choice is said in one line."""

from blt.execution import ExecutionChoices, Machine, choose

GPU = Machine(cuda=True, bf16=True, entropy_patching=True)


def test_cuda_one_process_takes_the_whole_fast_path():
    c = choose(GPU)
    assert c == ExecutionChoices(one_graph=True, compile=False, fused_products=True, bf16_residual=True,
                                 precomputed_entropies=True, attention="triton")  # fmt: skip
    assert choose(Machine(cuda=True, bf16=True, entropy_patching=True, fa4_installed=True)).attention == "fa4"


def test_cpu_runs_eager():
    assert choose(Machine(cuda=False, entropy_patching=True)) == ExecutionChoices()
    assert choose(Machine(cuda=False)).describe(cuda=False) == "execution: eager; attention SDPA (dense masks)"


def test_several_processes_compile_each_block():
    for machine in (Machine(cuda=True, distributed=True, bf16=True), Machine(cuda=True, bf16=True, activation_checkpointing=True)):
        c = choose(machine)
        assert not c.one_graph and c.compile and c.fused_products and c.bf16_residual


def test_flags_turn_parts_off_and_on():
    c = choose(GPU, one_graph=False, fused_products=False, precomputed_entropies=False, attention="flash")
    assert (c.one_graph, c.compile, c.fused_products, c.precomputed_entropies, c.attention) == (False, True, False, False, "flash")
    assert choose(GPU, compile=True) == choose(GPU, one_graph=False)  # asking for per-block compile
    assert not choose(GPU, compile=False, one_graph=False).compile
    assert not choose(Machine(cuda=True, bf16=False)).bf16_residual  # fp32 has no bf16 stream
    assert not choose(Machine(cuda=True, bf16=True, entropy_patching=False)).precomputed_entropies
    assert choose(Machine(cuda=False), fused_products=True).fused_products


def test_the_choice_is_one_line():
    line = choose(GPU).describe()
    assert "\n" not in line
    assert line == "execution: one graph, fused products, bf16 residual, precomputed entropies; attention triton"


def test_plain_lms_compile_on_cuda_and_say_so(capsys):
    from argparse import Namespace

    from blt.train_flags import plain_lm_execution

    for device, given, want in (("cuda", None, True), ("cpu", None, False), ("cuda", False, False), ("cpu", True, True)):
        args = Namespace(device=device, compile=given)
        plain_lm_execution(args)
        assert args.compile is want
        assert capsys.readouterr().out == f"execution: {'compile' if want else 'eager'}\n"
