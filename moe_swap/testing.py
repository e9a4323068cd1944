"""Test hooks of the weight streamer: the ``torch.ops.moe_swap_testing`` ops, apart from the API.

Not for use outside tests: they slow copies down, make them fail, and read the host store back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .streamer import WeightStreamer, _check_int64, _layer_meta

__all__ = ["set_hooks", "host_tensors", "live_counts"]


def set_hooks(streamer: WeightStreamer, copy_delay_us: int = 0, fail_copy_at: int = -1) -> WeightStreamer:
    """From now on: a random delay in ``[0, copy_delay_us]`` microseconds before each copied chunk (CPU
    backend only), and the copy with index ``fail_copy_at`` (0-based, counting every copy since the
    streamer was created; -1 none) fails -- the error surfaces where that copy is waited for. Returns
    the streamer."""
    copy_delay_us = _check_int64("copy_delay_us", copy_delay_us)
    fail_copy_at = _check_int64("fail_copy_at", fail_copy_at)
    if not 0 <= copy_delay_us <= 1_000_000:  # a larger one would park the copy thread for ages
        raise ValueError(f"test_copy_delay_us must be in [0, 1000000] (microseconds), got {copy_delay_us}")
    torch.ops.moe_swap_testing.streamer_set_hooks(streamer.handle, copy_delay_us, fail_copy_at)
    return streamer


def host_tensors(streamer: WeightStreamer, layer: int) -> tuple[Tensor, Tensor]:
    """CPU copies of the layer's weights as held in the host store."""
    return torch.ops.moe_swap_testing.streamer_host_copy(streamer.handle, layer)


def live_counts() -> dict:
    """Process-wide: live streamers, live host-store bytes and blocks (for leak checks)."""
    streamers, host_bytes, host_blocks = torch.ops.moe_swap_testing.streamer_live_counts()
    return {"streamers": streamers, "host_bytes": host_bytes, "host_blocks": host_blocks}


@torch.library.register_fake("moe_swap_testing::streamer_host_copy")
def _host_copy_fake(handle, layer):
    w13_shape, w2_shape, dtype, _ = _layer_meta("host_copy", handle, layer)
    return torch.empty(w13_shape, dtype=dtype), torch.empty(w2_shape, dtype=dtype)
