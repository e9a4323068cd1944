import zlib

import pytest
import torch

import moe_swap  # noqa: F401  (loads the native library; tests import the package from this checkout)

HAS_CUDA = torch.cuda.is_available()

# Parametrise a test over the devices it can run on here: CPU always, CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs in every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
