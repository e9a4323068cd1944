import zlib

import pytest
import torch

import moe_swap  # noqa: F401  (loads the native library; tests import the package from this checkout)

HAS_CUDA = torch.cuda.is_available()

# Parametrise a test over the devices it can run on here: CPU always, CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def debug_off():
    """Debug switch off for this test (gpu_check runs the suite with MOE_SWAP_DEBUG=1), restored after."""
    before = moe_swap.ops.debug_enabled()
    moe_swap.set_debug(False)
    yield
    moe_swap.set_debug(before)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs in every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# Tests that run real transformers models: CI runs these a second time under transformers 4.57
# (`pytest -m hf`), whose experts are per-expert ModuleLists instead of 5.x's fused tensors.
_HF_FILES = {"test_hf_parity.py", "test_offload.py", "test_offload_load.py", "test_cli.py",
             "test_offload_on_demand.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _HF_FILES or "transformers" in item.name:
            item.add_marker(pytest.mark.hf)
