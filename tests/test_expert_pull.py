"""expert_cache_pull: the device-side on_demand step (CPU kernel here; the CUDA kernel runs the same
algorithm and is exercised where a GPU is present). Oracle: checksums of the host experts, and LRU
victims worked out by hand."""

import zlib

import pytest
import torch

import moe_swap  # noqa: F401
from moe_swap.ops import expert_cache_pull, fused_moe
from conftest import DEVICES


def checksum(t):
    return zlib.crc32(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())


class Region:
    def __init__(self, experts, slots, pool_slots=None, base=0, device="cpu", inter=4, hidden=8):
        self.host_w13 = torch.randn(experts, 2 * inter, hidden).to(device)
        self.host_w2 = torch.randn(experts, hidden, inter).to(device)
        n = pool_slots or slots
        self.pool_w13 = torch.zeros(n, 2 * inter, hidden, device=device)
        self.pool_w2 = torch.zeros(n, hidden, inter, device=device)
        self.base = base
        self.slot_expert = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.slot_stamp = torch.zeros(slots, dtype=torch.int64, device=device)
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)
        self.expert_map = torch.empty(experts, dtype=torch.int32, device=device)
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)

    def step(self, ids):
        expert_cache_pull(ids, self.host_w13, self.host_w2, self.pool_w13, self.pool_w2, self.base, self.slot_expert,
                          self.slot_stamp, self.clock, self.expert_map, self.counters)
        return self.expert_map.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts, slots, tokens, top_k", [(8, 2, 1, 2), (8, 6, 3, 2), (16, 16, 8, 4), (6, 6, 4, 3)])
def test_every_routed_expert_lands_in_its_slot(device, experts, slots, tokens, top_k):
    r = Region(experts, slots, pool_slots=slots + 3, base=2, device=device)
    sums = [(checksum(r.host_w13[e]), checksum(r.host_w2[e])) for e in range(experts)]
    total = 0
    for _ in range(12):
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).int().to(device)
        expert_map = r.step(ids)
        routed = set(ids.flatten().tolist())
        total += len(routed)
        for e in range(experts):
            if e not in routed:
                assert expert_map[e] == -1
            else:
                slot = int(expert_map[e])
                assert r.base <= slot < r.base + slots
                assert (checksum(r.pool_w13[slot]), checksum(r.pool_w2[slot])) == sums[e]
        x = torch.randn(tokens, 8, device=device)
        w = torch.rand(tokens, top_k, device=device)
        torch.testing.assert_close(fused_moe(x, r.pool_w13, r.pool_w2, w, ids, r.expert_map),
                                   fused_moe(x, r.host_w13, r.host_w2, w, ids))
    hits, misses = r.counters.tolist()
    assert hits + misses == total
    assert int(r.clock) == 12


def test_least_recently_used_slot_is_the_victim():
    r = Region(experts=8, slots=3)
    for e in (0, 1, 2, 0):  # stamps: 0 -> 4, 1 -> 2, 2 -> 3
        r.step(torch.tensor([[e]]))
    r.step(torch.tensor([[5]]))  # evicts expert 1
    assert sorted(r.slot_expert.tolist()) == [0, 2, 5]
    assert r.counters.tolist() == [1, 4]


def test_bad_inputs_raise_clearly():
    r = Region(experts=8, slots=2)
    with pytest.raises(RuntimeError, match=r"region has 2 slots but a step may route 3"):
        r.step(torch.tensor([[0, 1, 2]]))
    with pytest.raises(RuntimeError, match=r"expert ids in \[0, 8\), got 9"):
        r.step(torch.tensor([[9]]))
    with pytest.raises(RuntimeError, match=r"must lie in the pool's 2 slots"):
        expert_cache_pull(torch.tensor([[0]]), r.host_w13, r.host_w2, r.pool_w13, r.pool_w2, 1, r.slot_expert,
                          r.slot_stamp, r.clock, r.expert_map, r.counters)
    with pytest.raises(RuntimeError, match="slot_stamp must have dtype Long"):
        expert_cache_pull(torch.tensor([[0]]), r.host_w13, r.host_w2, r.pool_w13, r.pool_w2, 0, r.slot_expert,
                          r.slot_stamp.int(), r.clock, r.expert_map, r.counters)


def test_slot_base_near_int64_max_raises_and_writes_nothing():
    """The region check formed slot_base + C, which overflows int64 for a slot_base near INT64_MAX
    (undefined behaviour; UBSan reports it under scripts/sanitize.sh): a wrapped, negative sum passed
    the check and the copies went to pool + slot_base * expert bytes."""
    r = Region(experts=4, slots=2)
    pool_before = (r.pool_w13.clone(), r.pool_w2.clone())
    for base in (2**63 - 1, 2**63 - 2, 2**62, 3):
        with pytest.raises(RuntimeError, match=rf"slot_base must place the region.*got slot_base = {base}"):
            expert_cache_pull(torch.tensor([[0, 1]]), r.host_w13, r.host_w2, r.pool_w13, r.pool_w2, base,
                              r.slot_expert, r.slot_stamp, r.clock, r.expert_map, r.counters)
    assert torch.equal(r.pool_w13, pool_before[0]) and torch.equal(r.pool_w2, pool_before[1])
    assert int(r.clock) == 0 and r.slot_expert.tolist() == [-1, -1]


def test_opcheck():
    r = Region(experts=6, slots=4)
    args = (torch.tensor([[1, 3]], dtype=torch.int32), r.host_w13, r.host_w2, r.pool_w13, r.pool_w2, 0, r.slot_expert,
            r.slot_stamp, r.clock, r.expert_map, r.counters)
    torch.library.opcheck(torch.ops.moe_swap.expert_cache_pull.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_debug_mode_names_an_invalid_id_and_leaves_the_device_usable_cuda():
    r = Region(experts=8, slots=4, device="cuda")
    ids = torch.tensor([[2, 11], [5, 2]], dtype=torch.int32, device="cuda")
    before = moe_swap.ops.debug_enabled()
    try:
        moe_swap.set_debug(True)
        with pytest.raises(RuntimeError, match=r"expert ids in \[0, 8\), got 11 at flat position 1"):
            r.step(ids)
        # the step's valid ids were pulled all the same, and the device still works (no trap)
        assert r.counters.tolist() == [0, 2]
        for e in (2, 5):
            slot = int(r.expert_map[e])
            assert (checksum(r.pool_w13[slot]), checksum(r.pool_w2[slot])) == (checksum(r.host_w13[e]),
                                                                               checksum(r.host_w2[e]))
        moe_swap.set_debug(False)
        expert_map = r.step(ids)  # without debug the invalid id is skipped
    finally:
        moe_swap.set_debug(before)
    assert r.counters.tolist() == [2, 2] and expert_map[3].item() == -1
