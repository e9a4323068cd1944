"""The planner: budget parsing, placement, spreading, and its errors (pure Python)."""

import pytest

from moe_swap.planner import Plan, format_bytes, parse_bytes, plan_placement, split_device_cache, spread

MiB = 2**20
GiB = 2**30


@pytest.mark.parametrize("text,expected", [
    ("20GiB", 20 * GiB), ("20 GiB", 20 * GiB), ("20gib", 20 * GiB), ("20G", 20 * GiB),
    ("512MB", 512 * 10**6), ("512MiB", 512 * MiB), ("1.5GB", 1_500_000_000), ("4096", 4096),
    ("4096B", 4096), ("2KiB", 2048), ("1TB", 10**12), ("0", 0), (".5GiB", GiB // 2),
])
def test_parse_bytes_strings(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_ints_pass_through():
    assert parse_bytes(123456789) == 123456789
    assert parse_bytes(0) == 0


@pytest.mark.parametrize("bad", ["twenty GiB", "20 parsecs", "", "GiB", "-3GiB", "1e3GB", "20 Gi B"])
def test_parse_bytes_rejects_garbage_naming_the_argument(bad):
    with pytest.raises(ValueError, match="gpu_budget"):
        parse_bytes(bad)


@pytest.mark.parametrize("bad", [-1, True, None, [1], 3j])
def test_parse_bytes_rejects_wrong_types_and_negatives(bad):
    with pytest.raises(ValueError, match="gpu_budget"):
        parse_bytes(bad)


def test_parse_bytes_floats_must_be_whole_bytes():
    # 1.5 almost surely means 1.5 GiB or GB, never one byte: refused, suggesting the unit
    with pytest.raises(ValueError, match=r"gpu_budget=1.5 is not a whole number of bytes.*'1.5GiB'"):
        parse_bytes(1.5)
    assert parse_bytes(2.0 * GiB) == 2 * GiB and isinstance(parse_bytes(2.0 * GiB), int)
    with pytest.raises(ValueError, match="finite"):
        parse_bytes(float("nan"))


def test_format_bytes():
    assert format_bytes(100) == "100 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * GiB) == "3.00 GiB"
    assert format_bytes(5000 * GiB) == "5000.00 GiB"


@pytest.mark.parametrize("n,k", [(8, 1), (8, 2), (8, 3), (8, 4), (8, 8), (7, 3), (48, 17), (1, 1), (5, 0)])
def test_spread_is_distinct_sorted_and_even(n, k):
    picked = spread(n, k)
    assert len(picked) == k
    assert picked == sorted(set(picked))
    assert all(0 <= p < n for p in picked)
    if k >= 2:
        gaps = [b - a for a, b in zip(picked, picked[1:])]
        assert max(gaps) - min(gaps) <= 1  # as even as integers allow


def test_spread_examples():
    assert spread(8, 2) == [2, 6]
    assert spread(8, 4) == [1, 3, 5, 7]
    assert spread(4, 4) == [0, 1, 2, 3]


def test_spread_rejects_more_than_available():
    with pytest.raises(ValueError, match="num_picked"):
        spread(3, 4)


def test_no_budget_streams_every_layer():
    plan = plan_placement([100] * 6, base_bytes=50)
    assert plan.streamed == list(range(6)) and plan.resident == []
    assert plan.slots == 2 and plan.slot_bytes == 100
    assert plan.device_bytes == 50 + 2 * 100
    assert not plan.warnings


def test_budget_keeps_as_many_layers_resident_as_fit():
    layer, base = 100 * MiB, 30 * MiB
    budget = base + 2 * layer + 3 * layer
    plan = plan_placement([layer] * 8, base, budget)
    assert len(plan.resident) == 3 and len(plan.streamed) == 5
    assert sorted(plan.resident + plan.streamed) == list(range(8))
    assert plan.device_bytes <= budget
    # one byte less and one more layer must be streamed
    tighter = plan_placement([layer] * 8, base, budget - 1)
    assert len(tighter.resident) == 2
    assert tighter.device_bytes <= budget - 1


def test_streamed_layers_are_spread_evenly():
    plan = plan_placement([10] * 10, 0, 2 * 10 + 6 * 10)  # 2 slots + 6 resident -> 4 streamed
    assert plan.streamed == [1, 3, 6, 8]
    assert plan.resident == [0, 2, 4, 5, 7, 9]


def test_budget_as_string():
    plan = plan_placement([256 * MiB] * 5, 0, "1GiB")
    assert len(plan.streamed) == 3  # 2 slots + 2 resident = 1 GiB exactly
    assert plan.budget == GiB


def test_budget_that_holds_everything_offloads_nothing_and_warns():
    plan = plan_placement([100] * 4, base_bytes=40, gpu_budget=440)
    assert plan.streamed == [] and plan.resident == [0, 1, 2, 3]
    assert plan.slots == 0 and plan.device_bytes == 440
    assert plan.warnings and "nothing was offloaded" in plan.warnings[0]


def test_budget_too_small_names_the_minimum():
    with pytest.raises(ValueError) as info:
        plan_placement([100 * MiB] * 4, base_bytes=50 * MiB, gpu_budget=200 * MiB)
    message = str(info.value)
    minimum = 50 * MiB + 2 * 100 * MiB
    assert str(minimum) in message and "gpu_budget" in message and "too small" in message


def test_minimum_budget_streams_everything():
    minimum = 50 + 3 * 100
    plan = plan_placement([100] * 4, base_bytes=50, gpu_budget=minimum, slots=3)
    assert plan.streamed == [0, 1, 2, 3] and plan.slots == 3
    assert plan.device_bytes == minimum


def test_slot_size_follows_the_largest_streamed_layer():
    sizes = [100, 100, 300, 100]
    plan = plan_placement(sizes, 0, None)
    assert plan.slot_bytes == 300
    # a budget that would fit with small slots must account for the big layer when it streams
    sizes = [100, 100, 300, 100, 100, 100]
    plan = plan_placement(sizes, 0, 700)
    assert plan.device_bytes <= 700 and plan.streamed
    assert plan.slot_bytes == max(sizes[i] for i in plan.streamed)


@pytest.mark.parametrize("slots", [0, 1, -2, 2.0, "2", True])
def test_slots_must_be_an_int_of_at_least_two(slots):
    with pytest.raises(ValueError, match="slots"):
        plan_placement([10, 10], 0, None, slots=slots)


def test_no_moe_layers_warns():
    plan = plan_placement([], 100, "1GiB")
    assert plan.streamed == [] and plan.warnings


def test_plan_is_a_plan():
    assert isinstance(plan_placement([1], 0), Plan)


def test_device_cache_split_is_computed_in_one_place():
    # the host path keeps one layer (two under auto) for wide steps, the rest is split evenly, capped at E
    assert split_device_cache(1000, "on_demand", [4, 4], [10, 10]) == (40, [4, 4])
    assert split_device_cache(200, "on_demand", [8, 8], [10, 10]) == (80, [6, 6])
    assert split_device_cache(200, "auto", [8, 8], [10, 10]) == (160, [2, 2])
    assert split_device_cache(50, "auto", [8, 8], [10, 10]) == (50, [0, 0])  # no room left for regions
    # with no budget the plan gives the device path the host room on top of the ring's bytes
    host = plan_placement([100] * 3, 0, None, slots=2, policy="on_demand", ids_path="host")
    device = plan_placement([100] * 3, 0, None, slots=2, policy="auto", ids_path="device")
    assert (host.cache_bytes, device.cache_bytes) == (200, 400)
