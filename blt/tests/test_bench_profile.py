"""bench/train_throughput.py's profile summary: the kernel classes, the idle-time count and the
kernel table by compiled graph."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from collections import namedtuple  # noqa: E402

from train_throughput import gaps, kernel_kind, kernels_by_graph  # noqa: E402


def test_gaps_counts_time_no_span_covers():
    assert gaps([], 0, 4) == 4
    assert gaps([(0, 2), (1, 3), (5, 6)], 0, 10) == 6  # overlapping spans count once
    assert gaps([(0, 10)], 2, 5) == 0  # spans reaching outside the window are clipped
    assert gaps([(0, 3), (4, 12)], 2, 5) == 1
    assert gaps([(6, 7), (1, 2)], 0, 8) == 6  # in any order


def test_kernel_kinds():
    assert kernel_kind("_bytes_read_patches_bwd") == "attention"
    assert kernel_kind("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90") == "attention"
    assert kernel_kind("_patch_max_fwd") == "fused pointwise/reduction"
    assert kernel_kind("_rotate_heads") == kernel_kind("_swiglu_bwd") == "fused pointwise/reduction"
    assert kernel_kind("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_NNN") == "matmul"
    assert kernel_kind("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>") == "optimizer"
    assert kernel_kind("triton_poi_fused_mul_silu_19") == "fused pointwise/reduction"
    assert kernel_kind("Memset (Unknown)") == "copies"


def test_kernels_by_graph_keeps_same_names_of_different_graphs_apart():
    Event = namedtuple("Event", ["name", "cpu_parent", "kernels"])
    Kernel = namedtuple("Kernel", ["name", "device", "duration"])
    fwd = Event("## Call CompiledFxGraph aaaaaaaaaaaaaaaa ##", None, [])
    bwd = Event("## Call CompiledFxGraph bbbbbbbbbbbbbbbb ##", None, [])
    events = [
        fwd,
        bwd,
        Event("cudaGraphLaunch", Event("inner", fwd, []), [Kernel("triton_poi_fused_0", 0, 5.0), Kernel("nvjet", 0, 7.0)]),
        Event("cudaGraphLaunch", fwd, [Kernel("triton_poi_fused_0", 0, 1.0)]),  # a second replay
        Event("cudaGraphLaunch", bwd, [Kernel("triton_poi_fused_0", 0, 3.0)]),
        Event("aten::mm", None, [Kernel("nvjet", 0, 2.0)]),
    ]
    assert kernels_by_graph(events) == {
        ("aaaaaaaaaaaa", "triton_poi_fused_0"): (6.0, 2),
        ("aaaaaaaaaaaa", "nvjet"): (7.0, 1),
        ("bbbbbbbbbbbb", "triton_poi_fused_0"): (3.0, 1),
        ("eager", "nvjet"): (2.0, 1),
    }
