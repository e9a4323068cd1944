"""moe_swap: run Mixture-of-Experts models on a GPU too small for their experts.

Importing the package loads the native library, which registers ``torch.ops.moe_swap.*``.
"""

import torch  # noqa: F401  (the native library links against torch's; load torch first)

from . import _C  # noqa: F401  (registers the torch ops)
from .ops import fused_moe, fused_moe_quant, set_debug, topk_route
from . import quant  # noqa: F401  (quantized expert layouts and converters)
from .streamer import WeightStreamer
from .offload import OffloadReport, offload  # Hugging Face MoE models with streamed experts
from .loader import load  # a safetensors folder -> model with streamed experts

__all__ = ["OffloadReport", "WeightStreamer", "fused_moe", "fused_moe_quant", "load", "offload", "set_debug", "topk_route"]
__version__ = "0.1.0"
