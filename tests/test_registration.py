"""The library registers every op, and its CUDA kernels whenever torch and the toolkit have CUDA."""

import os
import shutil

import pytest
import torch

OPS = ["topk_route", "fused_moe", "expert_cache_pull"]


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_swap::{op}", "CPU")


@pytest.mark.skipif(not torch.version.cuda, reason="torch was built without CUDA")
@pytest.mark.skipif(not _toolkit_present(), reason="no CUDA toolkit (nvcc) to have built the kernels with")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    # A GPU is not needed: with a CUDA build of torch and nvcc, the build compiles every kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_swap::{op}", "CUDA"), (
        f"moe_swap::{op} has no CUDA kernel although torch {torch.__version__} has CUDA "
        f"{torch.version.cuda} and nvcc is present: the CUDA sources were not built")


def test_debug_switch_round_trip():
    import moe_swap

    before = moe_swap.ops.debug_enabled()
    try:
        moe_swap.set_debug(True)
        assert moe_swap.ops.debug_enabled()
        moe_swap.set_debug(False)
        assert not moe_swap.ops.debug_enabled()
    finally:
        moe_swap.set_debug(before)


def test_cpu_kernels_use_the_threads_they_are_given():
    # at::parallel_for is compiled into moe_swap's own objects: built without the parallel backend's
    # flags (-fopenmp for ATen's OpenMP backend) every CPU kernel silently runs on one thread.
    import moe_swap

    if torch.get_num_threads() < 2:
        pytest.skip(f"torch.get_num_threads() = {torch.get_num_threads()}: nothing to spread over")
    used = moe_swap.ops.cpu_parallel_threads()
    assert used == torch.get_num_threads(), (
        f"a parallel region of moe_swap's CPU kernels ran on {used} thread(s) of the "
        f"{torch.get_num_threads()} torch offers ({torch.__config__.parallel_info().splitlines()[-1].strip()})")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert moe_swap.ops.cpu_parallel_threads() == 1
    finally:
        torch.set_num_threads(previous)
