"""Policy on_demand of the weight streamer (CPU backend): the expert cache, its eviction policies,
prediction, and bad inputs. The oracle is fused_moe on the layer's full weights (itself checked
against moe_swap.reference) and checksums of the host store's experts."""

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_swap
from moe_swap import WeightStreamer
from moe_swap.testing import set_hooks
from moe_swap.ops import fused_moe, topk_route


def random_layers(num_layers, experts, inter=8, hidden=16, dtype=torch.float32):
    return [((torch.randn(experts, 2 * inter, hidden) / 4).to(dtype), (torch.randn(experts, hidden, inter) / 4).to(dtype))
            for _ in range(num_layers)]


def on_demand(layers, cache_experts=0, eviction="lru", policy="on_demand", copy_delay_us=0, fail_copy_at=-1,
              **kwargs):
    w13, w2 = layers[0]
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    s = WeightStreamer("cpu", policy=policy, cache_bytes=cache_experts * expert_bytes, eviction=eviction, **kwargs)
    set_hooks(s, copy_delay_us=copy_delay_us, fail_copy_at=fail_copy_at)
    for a, b in layers:
        s.add_layer(a, b)
    return s


def route(tokens, experts, top_k):
    return topk_route(torch.randn(tokens, experts), top_k, renormalize=True)


def checksum(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def test_outputs_equal_fused_moe_on_the_whole_layer():
    layers = random_layers(3, 8)
    with on_demand(layers, cache_experts=12) as s:
        for _ in range(6):
            for i, (w13, w2) in enumerate(layers):
                x = torch.randn(5, 16)
                weights, ids = route(5, 8, 2)
                torch.testing.assert_close(s.moe(i, x, weights, ids), fused_moe(x, w13, w2, weights, ids),
                                           rtol=0, atol=0)
        stats = s.stats()
        assert stats["expert_hits"] > 0 and stats["expert_misses"] > 0
        assert stats["expert_hits"] + stats["expert_misses"] == sum(l["routed_distinct"] for l in stats["layers"])


def test_distinct_experts_are_copied_once_per_step():
    layers = random_layers(1, 8)
    with on_demand(layers, cache_experts=0) as s:
        ids = torch.tensor([[3, 1], [1, 3], [3, 1], [1, 3]], dtype=torch.int32)
        s.moe(0, torch.randn(4, 16), torch.rand(4, 2), ids)
        stats = s.stats()
        expert_bytes = s.cache_state()["expert_bytes"]
        assert stats["expert_misses"] == 2 and stats["bytes_copied"] == 2 * expert_bytes


def test_zero_byte_cache_keeps_nothing_and_still_computes():
    layers = random_layers(2, 6)
    with on_demand(layers, cache_experts=0) as s:
        for _ in range(4):
            for i, (w13, w2) in enumerate(layers):
                x = torch.randn(3, 16)
                weights, ids = route(3, 6, 2)
                torch.testing.assert_close(s.moe(i, x, weights, ids), fused_moe(x, w13, w2, weights, ids))
                assert s.cache_state()["occupied"] == 0
        stats = s.stats()
        assert stats["expert_hits"] == 0 and stats["hit_rate"] == 0.0


def test_cache_smaller_than_a_step_grows_a_working_set_then_trims_to_budget():
    layers = random_layers(1, 8)
    with on_demand(layers, cache_experts=1) as s:
        x = torch.randn(16, 16)
        weights, ids = route(16, 8, 3)
        distinct = len(set(ids.flatten().tolist()))
        torch.testing.assert_close(s.moe(0, x, weights, ids), fused_moe(x, *layers[0], weights, ids))
        state = s.cache_state()
        assert state["slots"] >= distinct and state["capacity"] == 1 and state["occupied"] == 1


def test_no_tokens():
    layers = random_layers(1, 4)
    with on_demand(layers, cache_experts=2) as s:
        out = s.moe(0, torch.randn(0, 16), torch.rand(0, 2), torch.zeros(0, 2, dtype=torch.int32))
        assert out.shape == (0, 16)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(experts=st.integers(2, 12), top_k=st.integers(1, 4), cache_experts=st.integers(0, 3),
       num_layers=st.integers(1, 3), eviction=st.sampled_from(["lru", "lfu", "flru"]),
       seed=st.integers(0, 2**31 - 1), delay=st.sampled_from([0, 50]), policy=st.sampled_from(["on_demand", "auto"]))
def test_every_expert_used_in_a_step_holds_that_experts_weights(experts, top_k, cache_experts, num_layers, eviction,
                                                                 seed, delay, policy):
    top_k = min(top_k, experts)
    gen = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(experts, 4, 8, generator=gen), torch.randn(experts, 8, 2, generator=gen))
              for _ in range(num_layers)]
    sums = [[(checksum(w13[e]), checksum(w2[e])) for e in range(experts)] for w13, w2 in layers]
    with on_demand(layers, cache_experts, eviction, policy, copy_delay_us=delay) as s:
        for step in range(8):
            for layer in range(num_layers):
                tokens = int(torch.randint(1, 5, (1,), generator=gen))
                ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).int()
                if step % 3 == 2 and layer + 1 < num_layers:  # sometimes a (random) prediction for the next layer
                    s.predict(layer + 1, torch.randint(0, experts, (3,), generator=gen))
                guess = {}
                if step % 3 == 1 and num_layers > 1:  # or one issued after the step's own copies
                    guess = dict(next_layer=(layer + 1) % num_layers,
                                 next_ids=torch.randint(0, experts, (3,), generator=gen))
                w13, w2, expert_map = s.acquire_experts(layer, ids, **guess)
                routed = set(ids.flatten().tolist())
                for e in range(experts):
                    slot = int(expert_map[e])
                    if e not in routed:
                        assert slot == -1
                        continue
                    assert 0 <= slot < w13.shape[0]
                    assert (checksum(w13[slot]), checksum(w2[slot])) == sums[layer][e], (step, layer, e, slot)
                s.release_experts(layer)
                # the budget, plus at most one prediction; auto's whole-layer step is trimmed back too
                assert s.cache_state()["occupied"] <= cache_experts + 3
        if cache_experts == 0:
            stats = s.stats()  # with no cache, only predictions hit
            assert stats["expert_hits"] == sum(l["predicted_used"] for l in stats["layers"])


def run_trace(eviction, capacity, trace, num_layers):
    layers = random_layers(num_layers, 8)
    with on_demand(layers, cache_experts=capacity, eviction=eviction) as s:
        for layer, expert in trace:
            s.moe(layer, torch.randn(1, 16), torch.ones(1, 1), torch.tensor([[expert]], dtype=torch.int32))
        return {tuple(e) for e in s.cache_state()["entries"] if e[0] >= 0}, s.stats()


# A: layer 0, B: layer 1. X: expert 0 used often then 1 once; Y: A0 used a little long ago, B5 hot, A1 once just now.
TRACE_X = [(0, 0)] * 10 + [(0, 1), (0, 2)]
TRACE_Y = [(0, 0)] * 3 + [(1, 5)] * 40 + [(0, 1), (0, 2)]


@pytest.mark.parametrize("eviction, trace, capacity, kept", [
    ("lru", TRACE_X, 2, {(0, 1), (0, 2)}),    # least recent: expert 0
    ("lfu", TRACE_X, 2, {(0, 0), (0, 2)}),    # least frequent: expert 1
    ("flru", TRACE_X, 2, {(0, 0), (0, 2)}),   # 10 recent uses outweigh 1
    ("lru", TRACE_Y, 3, {(0, 1), (0, 2), (1, 5)}),
    ("lfu", TRACE_Y, 3, {(0, 0), (0, 2), (1, 5)}),
    ("flru", TRACE_Y, 3, {(0, 1), (0, 2), (1, 5)}),  # A0's 3 uses decayed over 40 steps (~5 half-lives)
])
def test_eviction_policies_on_a_hand_made_trace(eviction, trace, capacity, kept):
    cached, stats = run_trace(eviction, capacity, trace, num_layers=2)
    assert cached == kept
    assert stats["evictions"] == 1
    assert stats["expert_misses"] == len({e for e in trace})


def test_a_step_with_several_misses_takes_victims_in_eviction_order():
    # LRU, 4 slots: experts 0 and 1 used at tick 1 (a tie: the lower slot goes first), 2 at tick 2, 3 at
    # tick 3; one step missing 4, 5 and 6 gives up 0, 1 and 2, in that order, and keeps 3.
    layers = random_layers(1, 8)
    with on_demand(layers, cache_experts=4, eviction="lru") as s:
        for ids in ([[0, 1]], [[2]], [[3]]):
            s.acquire_experts(0, torch.tensor(ids, dtype=torch.int32))
            s.release_experts(0)
        assert s.cache_state()["entries"] == [(0, 0), (0, 1), (0, 2), (0, 3)]
        ids = torch.tensor([[4, 5], [6, 4]], dtype=torch.int32)
        w13, w2, expert_map = s.acquire_experts(0, ids)
        assert s.cache_state()["entries"] == [(0, 4), (0, 5), (0, 6), (0, 3)]
        assert expert_map.tolist() == [-1, -1, -1, -1, 0, 1, 2, -1]
        x, weights = torch.randn(2, 16), torch.rand(2, 2)
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, expert_map), fused_moe(x, *layers[0], weights, ids))
        s.release_experts(0)
        assert s.stats()["evictions"] == 3


def test_a_routed_miss_takes_a_predictions_slot_when_nothing_else_is_left():
    layers = random_layers(2, 8)
    with on_demand(layers, cache_experts=2, eviction="lru") as s:
        s.acquire_experts(0, torch.tensor([[0, 1]], dtype=torch.int32))
        s.release_experts(0)
        s.predict(1, torch.tensor([5]))  # takes the least recent slot: 0 (a tie with slot 1)
        assert s.cache_state()["entries"] == [(1, 5), (0, 1)]
        # expert 1 is a hit (pinned), 2 is missing and only the prediction's slot is left
        s.acquire_experts(0, torch.tensor([[1, 2]], dtype=torch.int32))
        assert s.cache_state()["entries"] == [(0, 2), (0, 1)]
        s.release_experts(0)
        assert s.stats()["layers"][1]["evictions"] == 1
        s.acquire_experts(1, torch.tensor([[5]], dtype=torch.int32))
        s.release_experts(1)
        layer1 = s.stats()["layers"][1]
        assert layer1["predicted"] == 1 and layer1["predicted_used"] == 0 and layer1["expert_misses"] == 1


def test_prediction_turns_misses_into_hits_and_reports_recall():
    layers = random_layers(2, 8)
    with on_demand(layers, cache_experts=8) as s:
        ids = torch.tensor([[1, 4], [4, 6]], dtype=torch.int32)
        s.moe(0, torch.randn(2, 16), torch.rand(2, 2), ids)  # allocates the pool
        s.predict(1, torch.tensor([1, 4, 7]))
        x = torch.randn(2, 16)
        weights = torch.rand(2, 2)
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        layer1 = s.stats()["layers"][1]
        assert layer1["predicted"] == 3 and layer1["predicted_used"] == 2 and layer1["expert_misses"] == 1
        assert layer1["prediction_recall"] == pytest.approx(2 / 3)


def test_a_guess_given_with_the_step_copies_after_the_steps_own_experts():
    """moe(layer, ..., next_layer, next_ids): the guess is copied behind the step's own copies (so on
    one copy engine it runs under the step's compute), where predict() just before the step would be
    copied first and delay it. Copy spans record (layer, channel): 0 demand, 1 prediction."""
    layers = random_layers(2, 8)
    ids, guess = torch.tensor([[1, 4]], dtype=torch.int32), torch.tensor([[2, 5, 7]])
    for combined in (True, False):
        # 10 ms per copy: the guess's three copies outlast a descheduled compute thread on a loaded machine
        # (with 2 ms the wait's end was once seen 4.6 ms after them, under load 6 on 2 cores)
        with on_demand(layers, cache_experts=8, trace=True, copy_delay_us=10000) as s:
            x, weights = torch.randn(1, 16), torch.rand(1, 2)
            s.moe(0, x, weights, torch.tensor([[0, 3]], dtype=torch.int32))  # allocates the pool
            s.synchronize()
            if combined:
                out = s.moe(0, x, weights, ids, next_layer=1, next_ids=guess)
            else:
                s.predict(1, guess)
                out = s.moe(0, x, weights, ids)
            torch.testing.assert_close(out, fused_moe(x, *layers[0], weights, ids))
            s.synchronize()
            spans = s.stats()["trace"]
            copies = sorted((sp for sp in spans if sp["kind"] == "copy"), key=lambda sp: sp["start_us"])[1:]
            assert [(sp["layer"], sp["slot"]) for sp in copies] == ([(0, 0), (1, 1)] if combined else [(1, 1), (0, 0)])
            wait = max((sp for sp in spans if sp["kind"] == "wait" and sp["layer"] == 0), key=lambda sp: sp["start_us"])
            if combined:  # the step waited for its own copy only; the guess's copy ended after
                assert wait["end_us"] < copies[1]["end_us"]
            # the guess turns layer 1's step into hits (5 and 7), one miss (3)
            out1 = s.moe(1, x, weights, torch.tensor([[5, 3]], dtype=torch.int32))
            torch.testing.assert_close(out1, fused_moe(x, *layers[1], weights, torch.tensor([[5, 3]], dtype=torch.int32)))
            layer1 = s.stats()["layers"][1]
            assert (layer1["predicted"], layer1["predicted_used"], layer1["expert_misses"]) == (3, 1, 1)


def test_a_guess_with_the_step_is_checked_before_the_step_changes_anything():
    layers = random_layers(2, 8)
    ids = torch.tensor([[1, 4]], dtype=torch.int32)
    with on_demand(layers, cache_experts=4) as s:
        x, weights = torch.randn(1, 16), torch.rand(1, 2)
        s.moe(0, x, weights, ids)
        def state():  # the cache and every count (not the times: reading the ids is timed even when they fail)
            return s.cache_state()["entries"], [{k: v for k, v in layer.items() if not k.endswith("_ms")}
                                                for layer in s.stats()["layers"]]
        before = state()
        with pytest.raises(ValueError, match="next_layer and next_ids go together"):
            s.moe(0, x, weights, ids, next_layer=1)
        with pytest.raises(RuntimeError, match="next_layer must be another layer than the step's"):
            s.moe(0, x, weights, ids, next_layer=0, next_ids=ids)
        with pytest.raises(RuntimeError, match="layer 2 out of range|layer must be in"):
            s.moe(0, x, weights, ids, next_layer=2, next_ids=ids)
        with pytest.raises(RuntimeError, match=r"next_ids must be expert ids in \[0, 8\) .*got 8"):
            s.moe(0, x, weights, ids, next_layer=1, next_ids=torch.tensor([[8]]))
        with pytest.raises(RuntimeError, match="without next_ids"):  # the op itself, past the Python check
            torch.ops.moe_swap.streamer_acquire_experts(s.handle, 0, ids, 1, None)
        assert state() == before
        # and the streamer still works, guess included
        torch.testing.assert_close(s.moe(0, x, weights, ids, next_layer=1, next_ids=ids),
                                   fused_moe(x, *layers[0], weights, ids))


def test_a_failed_copy_raises_and_the_next_step_recovers():
    layers = random_layers(1, 4)
    with on_demand(layers, cache_experts=4, fail_copy_at=0) as s:
        x = torch.randn(2, 16)
        weights, ids = route(2, 4, 2)
        with pytest.raises(RuntimeError, match="injected copy fault"):
            s.moe(0, x, weights, ids)
        torch.testing.assert_close(s.moe(0, x, weights, ids), fused_moe(x, *layers[0], weights, ids))


def test_one_step_at_a_time():
    """acquire_experts while another layer's step is held is refused. The cache pins one step's experts
    (release_experts unpins every slot), and with the pool full of the held step's experts a second
    step hit an internal assertion ("no slot for expert") after assigning slots to experts whose copies
    were never issued: the next step found them cached and computed with stale weights."""
    layers = random_layers(2, 4)
    with on_demand(layers, cache_experts=3) as s:
        s.acquire_experts(0, torch.tensor([[0, 1]]))
        with pytest.raises(RuntimeError, match=r"acquire_experts\(1\): layer 0's step is still acquired; "
                                               r"release_experts\(0\) first"):
            s.acquire_experts(1, torch.tensor([[2, 3]]))
        s.release_experts(0)
        ids = torch.tensor([[2, 3]])
        w13, w2, expert_map = s.acquire_experts(1, ids)
        for e in (2, 3):
            slot = int(expert_map[e])
            assert checksum(w13[slot]) == checksum(layers[1][0][e]) and checksum(w2[slot]) == checksum(layers[1][1][e])
        s.release_experts(1)


def test_bad_inputs_raise_clearly():
    layers = random_layers(2, 6)
    with on_demand(layers, cache_experts=2) as s:
        x = torch.randn(2, 16)
        w = torch.rand(2, 2)
        with pytest.raises(RuntimeError, match=r"topk_ids must be expert ids in \[0, 6\).*got 6"):
            s.moe(0, x, w, torch.tensor([[0, 6], [1, 2]], dtype=torch.int32))
        with pytest.raises(RuntimeError, match=r"got -1"):
            s.acquire_experts(0, torch.tensor([[-1, 2]]))
        with pytest.raises(RuntimeError, match="int32 or int64, got Float"):
            s.acquire_experts(0, torch.zeros(2, 2))
        with pytest.raises(RuntimeError, match=r"layer must be in \[0, 2\), got 5"):
            s.acquire_experts(5, torch.zeros(1, 1, dtype=torch.int32))
        with pytest.raises(RuntimeError, match="not acquired by acquire_experts"):
            s.release_experts(1)
        s.acquire_experts(0, torch.tensor([[1]]))
        with pytest.raises(RuntimeError, match="already acquired"):
            s.acquire_experts(0, torch.tensor([[1]]))
        s.release_experts(0)
        with pytest.raises(RuntimeError, match="policy on_demand/auto; use acquire_experts"):
            s.acquire(0)
        with pytest.raises(RuntimeError, match="same shape and dtype"):
            s.add_layer(torch.randn(6, 8, 16), torch.randn(6, 16, 4))
        # still works after every error
        weights, ids = route(2, 6, 2)
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
    with pytest.raises(ValueError, match="policy must be one of full, on_demand, auto, got 'lazy'"):
        WeightStreamer("cpu", policy="lazy")
    with pytest.raises(ValueError, match="eviction must be one of lru, lfu, flru, got 'fifo'"):
        WeightStreamer("cpu", policy="on_demand", eviction="fifo")
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0, got -1"):
        WeightStreamer("cpu", policy="on_demand", cache_bytes=-1)
    with pytest.raises(ValueError, match=r"copy_cost must be \(overhead_us, gb_per_s\), two numbers, got \(1.0,\)"):
        WeightStreamer("cpu", policy="auto", copy_cost=(1.0,))
    with pytest.raises(ValueError, match=r"copy_cost: overhead_us .* must be in \[0, 1e6\], got -1"):
        WeightStreamer("cpu", policy="auto", copy_cost=(-1, 10))
    with pytest.raises(ValueError, match=r"copy_cost: gb_per_s .* must be in \(0, 1e4\], got 0"):
        WeightStreamer("cpu", policy="auto", copy_cost=(1, 0))
    with pytest.raises(ValueError, match=r"copy_cost: overhead_us .* got 1e\+300"):
        WeightStreamer("cpu", policy="auto", copy_cost=(1e300, 10))
    with pytest.raises(ValueError, match=r"copy_cost: gb_per_s .* got 1e\+300"):
        WeightStreamer("cpu", policy="auto", copy_cost=(1, 1e300))
    with pytest.raises(ValueError, match=r"copy_cost: gb_per_s .* got inf"):
        WeightStreamer("cpu", policy="auto", copy_cost=(1, float("inf")))
    with pytest.raises(ValueError, match="copy_cost is the cost model of policy 'auto'; got it with policy 'on_demand'"):
        WeightStreamer("cpu", policy="on_demand", copy_cost=(1, 10))
    with pytest.raises(RuntimeError, match="must be given together"):  # the op itself checks too
        torch.ops.moe_swap.streamer_create("cpu", 2, 1, "full", False, True, "auto", 0, "lru", 1.0, None)
    with pytest.raises(ValueError, match="policy='on_demand' needs mode='full'"):
        WeightStreamer("cpu", policy="on_demand", mode="sync")
    with pytest.raises(RuntimeError, match="needs mode \"full\""):  # and the op itself
        torch.ops.moe_swap.streamer_create("cpu", 2, 1, "sync", False, True, "on_demand")
    with WeightStreamer("cpu") as full:
        full.add_layer(*layers[0])
        with pytest.raises(RuntimeError, match="policy full; use acquire"):
            full.acquire_experts(0, torch.tensor([[0]]))


def test_streamer_moe_traces_under_torch_compile():
    layers = random_layers(2, 6)
    with on_demand(layers, cache_experts=3) as s:
        def step(x, logits):
            for layer in range(2):
                weights, ids = topk_route(logits, 2)
                x = x + s.moe(layer, x, weights, ids)
            return x

        compiled = torch.compile(step, fullgraph=True)
        x, logits = torch.randn(4, 16), torch.randn(4, 6)
        torch.testing.assert_close(compiled(x, logits), step(x, logits))


# A cost model for random_layers' 1536-byte experts: 10 us per copy, 0.1 GB/s (15.4 us per expert). The
# whole layer (2 copies of 8 experts) costs 142.9 us, m missing experts 35.4 us each (2 copies): the
# whole layer wins from 5 missing experts on.
SLOW_LINK = (10.0, 0.1)


def test_auto_measures_its_cost_model_unless_given():
    layers = random_layers(2, 8)
    x = torch.randn(8, 16)
    weights = torch.rand(8, 1)
    ids = torch.arange(8, dtype=torch.int32).view(8, 1)
    with on_demand(layers, cache_experts=8, policy="auto") as s:
        assert s.cache_state()["copy_gb_per_s"] is None  # measured when the cache is first allocated
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        model = s.cache_state()
        assert model["copy_gb_per_s"] > 0 and model["copy_overhead_us"] >= 0
    with on_demand(layers, cache_experts=8, policy="auto", copy_cost=(7.5, 3.25)) as s:
        assert (s.cache_state()["copy_overhead_us"], s.cache_state()["copy_gb_per_s"]) == (7.5, 3.25)
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        # set, not overwritten by a measurement
        assert (s.cache_state()["copy_overhead_us"], s.cache_state()["copy_gb_per_s"]) == (7.5, 3.25)


def test_auto_copies_the_whole_layer_when_its_cost_model_says_so():
    layers = random_layers(2, 8)
    with on_demand(layers, cache_experts=8, policy="auto", copy_cost=SLOW_LINK) as s:
        x = torch.randn(4, 16)
        weights = torch.rand(4, 1)
        # four missing experts: on demand (4 x 35.4 us) is cheaper than the whole layer (142.9 us)
        ids = torch.tensor([[0], [2], [5], [7]], dtype=torch.int32)
        torch.testing.assert_close(s.moe(0, x, weights, ids), fused_moe(x, *layers[0], weights, ids))
        assert s.stats()["layer_copies"] == 0 and s.stats()["expert_misses"] == 4
        # five missing experts of the other layer: the whole layer is cheaper
        x = torch.randn(5, 16)
        weights = torch.rand(5, 1)
        ids = torch.tensor([[1], [2], [3], [4], [6]], dtype=torch.int32)
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        assert s.stats()["layers"][1]["layer_copies"] == 1
        # the whole-layer step left a correct cache behind for both layers
        x = torch.randn(8, 16)
        weights = torch.rand(8, 1)
        ids = torch.arange(8, dtype=torch.int32).view(8, 1)
        for layer in (0, 1):
            torch.testing.assert_close(s.moe(layer, x, weights, ids), fused_moe(x, *layers[layer], weights, ids))
    # no per-copy overhead: copying only the missing experts moves fewer bytes for the same cost; with
    # every expert missing the bytes are the same, and the tie goes to the whole layer (and its region)
    with on_demand(layers, cache_experts=8, policy="auto", copy_cost=(0.0, 0.1)) as s:
        x = torch.randn(8, 16)
        weights = torch.rand(8, 1)
        ids = torch.arange(8, dtype=torch.int32).view(8, 1)
        torch.testing.assert_close(s.moe(0, x[:7], weights[:7], ids[:7]), fused_moe(x[:7], *layers[0], weights[:7], ids[:7]))
        assert s.stats()["layer_copies"] == 0 and s.stats()["expert_misses"] == 7
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        assert s.stats()["layers"][1]["layer_copies"] == 1 and s.stats()["layers"][1]["expert_misses"] == 8


def test_auto_on_a_pool_smaller_than_a_layer_stays_on_demand():
    layers = random_layers(1, 8)
    with on_demand(layers, cache_experts=2, policy="auto") as s:
        x = torch.randn(2, 16)
        weights, ids = route(2, 8, 2)
        torch.testing.assert_close(s.moe(0, x, weights, ids), fused_moe(x, *layers[0], weights, ids))
        assert s.stats()["layer_copies"] == 0


@pytest.mark.parametrize("num_layers", [2, 3, 4])
def test_auto_wide_steps_copy_the_next_layer_ahead(num_layers):
    experts = 8
    layers = random_layers(num_layers, experts)
    sums = [[(checksum(w13[e]), checksum(w2[e])) for e in range(experts)] for w13, w2 in layers]
    with on_demand(layers, cache_experts=2 * experts, policy="auto", copy_cost=SLOW_LINK, copy_delay_us=30) as s:
        x = torch.randn(16, 16)
        weights = torch.rand(16, 2)
        for step in range(3):
            for layer in range(num_layers):
                # wide steps (every expert) and, in between, a narrow one
                ids = (torch.arange(32, dtype=torch.int32).view(16, 2) % experts if step != 1
                       else torch.tensor([[layer % experts, (layer + 3) % experts]] * 16, dtype=torch.int32))
                w13, w2, expert_map = s.acquire_experts(layer, ids)
                for e in set(ids.flatten().tolist()):
                    slot = int(expert_map[e])
                    assert (checksum(w13[slot]), checksum(w2[slot])) == sums[layer][e]
                out = fused_moe(x, w13, w2, weights, ids, expert_map)
                s.release_experts(layer)
                torch.testing.assert_close(out, fused_moe(x, *layers[layer], weights, ids))
        stats = s.stats()
        # wide steps (8 missing experts) copy whole layers, narrow ones (2) go on demand
        assert stats["layer_copies"] > 0 and stats["expert_misses"] > 0
        assert stats["predicted"] > 0 and sum(l["predicted_used"] for l in stats["layers"]) > 0


def test_auto_wide_step_copies_the_next_layer_under_this_layers_compute():
    # A cache of two layers (full's ring): a wide step uses two layer regions (full's double buffering),
    # and acquire returns while the next layer's copy (slowed by the copy delay) is still running.
    experts = 8
    layers = random_layers(3, experts, inter=64, hidden=128)
    # 96 KiB experts, 10 us per copy, 0.1 GB/s: the whole layer (7.9 ms) beats 8 missing experts (8.0 ms)
    with on_demand(layers, cache_experts=2 * experts, policy="auto", copy_cost=SLOW_LINK, trace=True,
                   copy_delay_us=20000) as s:
        x = torch.randn(16, 128)
        weights = torch.rand(16, 2)
        ids = torch.arange(32, dtype=torch.int32).view(16, 2) % experts
        for layer in range(2):
            torch.testing.assert_close(s.moe(layer, x, weights, ids), fused_moe(x, *layers[layer], weights, ids))
        s.synchronize()
        stats = s.stats()
        assert s.cache_state()["slots"] == 2 * experts
        assert stats["layers"][0]["layer_copies"] == 1
        assert stats["layers"][1]["predicted"] == experts and stats["layers"][1]["expert_misses"] == 0
        layer0_acquired = max(sp["end_us"] for sp in stats["trace"] if sp["layer"] == 0 and sp["kind"] == "wait")
        layer1_landed = max(sp["end_us"] for sp in stats["trace"] if sp["layer"] == 1 and sp["kind"] == "copy")
        assert layer0_acquired < layer1_landed


def test_auto_with_a_one_layer_cache_stays_within_its_budget():
    # one layer of cache: prefill layers go one at a time; the pool does not grow to two regions
    experts = 8
    layers = random_layers(3, experts, inter=64, hidden=128)
    with on_demand(layers, cache_experts=experts, policy="auto", copy_cost=SLOW_LINK) as s:
        x = torch.randn(16, 128)
        weights = torch.rand(16, 2)
        ids = torch.arange(32, dtype=torch.int32).view(16, 2) % experts
        for layer in range(3):
            torch.testing.assert_close(s.moe(layer, x, weights, ids), fused_moe(x, *layers[layer], weights, ids))
        stats = s.stats()
        assert s.cache_state()["slots"] == experts
        assert [l["layer_copies"] for l in stats["layers"]] == [1, 1, 1] and stats["predicted"] == 0


# ---- CUDA: the copy-engine path of on_demand/auto (pinned host store, per-expert copies on the copy
# stream, predictions on the second channel, the expert map uploaded from pinned memory) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy, copy_cost", [("on_demand", None), ("auto", SLOW_LINK), ("auto", None)])
def test_every_step_on_cuda_holds_the_right_experts_cuda(policy, copy_cost):
    experts, num_layers = 8, 3
    layers = random_layers(num_layers, experts)
    cuda_layers = [(a.cuda(), b.cuda()) for a, b in layers]
    sums = [[(checksum(w13[e]), checksum(w2[e])) for e in range(experts)] for w13, w2 in layers]
    expert_bytes = (layers[0][0][0].numel() + layers[0][1][0].numel()) * 4
    # two layers of cache: auto's wide steps copy the next layer ahead into the other region
    with WeightStreamer("cuda", policy=policy, cache_bytes=2 * experts * expert_bytes, trace=True,
                        copy_cost=copy_cost) as s:
        for a, b in layers:
            s.add_layer(a, b)
        for step in range(9):
            tokens = 16 if step % 3 == 0 else step % 3  # wide steps (most experts) and narrow ones
            for layer in range(num_layers):
                x = torch.randn(tokens, 16, device="cuda")
                weights, ids = topk_route(torch.randn(tokens, experts, device="cuda"), 2, renormalize=True)
                if step % 2 == 1 and layer + 1 < num_layers:  # a guess at the next layer, from device ids
                    s.predict(layer + 1, torch.randint(0, experts, (3,), device="cuda"))
                if step % 4 == 3:  # the one-op step (streamer_moe)
                    out = s.moe(layer, x, weights, ids)
                else:
                    w13, w2, expert_map = s.acquire_experts(layer, ids)
                    assert w13.is_cuda and expert_map.is_cuda and expert_map.dtype == torch.int32
                    out = fused_moe(x, w13, w2, weights, ids, expert_map)
                    slots = expert_map.tolist()
                    for e in set(ids.flatten().tolist()):  # the slot the map names holds that expert
                        assert (checksum(w13[slots[e]].cpu()), checksum(w2[slots[e]].cpu())) == sums[layer][e]
                    assert all(slots[e] == -1 for e in range(experts) if e not in set(ids.flatten().tolist()))
                    s.release_experts(layer, after=[out])
                torch.testing.assert_close(out, fused_moe(x, *cuda_layers[layer], weights, ids))
        stats = s.stats()
        assert stats["expert_hits"] > 0 and stats["expert_misses"] > 0 and stats["predicted"] > 0
        assert stats["ids_to_host_ms"] > 0  # the host path reads the ids: a device->host copy
        assert any(sp["kind"] == "copy" and sp["end_us"] >= sp["start_us"] for sp in stats["trace"])
        state = s.cache_state()
        if policy == "auto":
            assert state["copy_gb_per_s"] > 0 and state["copy_overhead_us"] >= 0  # set, or timed on the copy stream
        if copy_cost is not None:
            assert stats["layer_copies"] > 0  # wide steps copied whole layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["on_demand", "auto"])
def test_steps_queued_back_to_back_on_cuda_compute_the_same_cuda(policy):
    # The races the test above cannot see (it reads results on the host after every step): here the ids
    # come from pinned CPU memory, so no step waits for the device -- copies into slots the previous
    # steps' kernels still read, predictions, auto's whole-layer copies ahead and the expert maps' uploads
    # all queue behind each other; the chained outputs are compared once, at the end.
    experts, num_layers, steps = 8, 3, 12
    layers = random_layers(num_layers, experts, inter=64, hidden=128)
    cuda_layers = [(a.cuda(), b.cuda()) for a, b in layers]
    expert_bytes = (layers[0][0][0].numel() + layers[0][1][0].numel()) * 4
    plan = []  # per (step, layer): (weights on cuda, ids pinned on the host, ids on cuda, predicted ids on the host)
    for step in range(steps):
        tokens = 16 if step % 4 == 0 else 1 + step % 3
        for layer in range(num_layers):
            weights, ids = topk_route(torch.randn(tokens, experts), 2, renormalize=True)
            guess = torch.randint(0, experts, (3,)).pin_memory() if step % 2 else None
            plan.append((weights.cuda(), ids.pin_memory(), ids.cuda(), guess))
    x0 = torch.randn(16, 128, device="cuda")
    with WeightStreamer("cuda", policy=policy, cache_bytes=2 * experts * expert_bytes,
                        copy_cost=SLOW_LINK if policy == "auto" else None) as s:
        for a, b in layers:
            s.add_layer(a, b)
        torch.cuda.synchronize()
        outs = []
        for step in range(steps):
            x = x0[: plan[step * num_layers][1].shape[0]]
            for layer in range(num_layers):
                weights, ids_host, ids, _ = plan[step * num_layers + layer]
                if layer + 1 < num_layers and plan[step * num_layers + layer + 1][3] is not None:
                    s.predict(layer + 1, plan[step * num_layers + layer + 1][3])
                w13, w2, expert_map = s.acquire_experts(layer, ids_host)
                x = fused_moe(x, w13, w2, weights, ids, expert_map)
                s.release_experts(layer, after=[x])
            outs.append(x)
        got = [o.cpu() for o in outs]
        stats = s.stats()
    for step in range(steps):
        x = x0[: plan[step * num_layers][1].shape[0]]
        for layer in range(num_layers):
            weights, _, ids, _ = plan[step * num_layers + layer]
            x = fused_moe(x, *cuda_layers[layer], weights, ids)
        torch.testing.assert_close(got[step], x.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert stats["expert_misses"] > 0 and stats["predicted"] > 0
    if policy == "auto":
        assert stats["layer_copies"] > 0


def test_on_demand_needs_no_second_ring_slot():
    """The expert cache copies on its own two channels (demand, ahead), not on ring slots: one slot (and
    prefetch_depth 0) is enough, with predictions on."""
    layers = random_layers(2, 4)
    w13, w2 = layers[0]
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    with WeightStreamer("cpu", slots=1, prefetch_depth=0, policy="on_demand", cache_bytes=3 * expert_bytes) as s:
        for a, b in layers:
            s.add_layer(a, b)
        for step in range(6):
            layer = step % 2
            x = torch.randn(2, 16)
            weights, ids = route(2, 4, 2)
            out = s.moe(layer, x, weights, ids, next_layer=1 - layer, next_ids=torch.randint(0, 4, (2, 2)))
            torch.testing.assert_close(out, fused_moe(x, *layers[layer], weights, ids))
        assert s.stats()["predicted"] > 0


def test_release_of_an_expert_step_is_refused():
    """release() (the ring's) on a step held by acquire_experts is refused, and the step stays held
    (the old streamer read it as a ring slot: slots_[-3], out of bounds)."""
    layers = random_layers(2, 4)
    with on_demand(layers, cache_experts=2) as s:
        s.acquire_experts(0, torch.tensor([[0, 1]]))
        with pytest.raises(RuntimeError, match=r"release\(0\): this streamer has policy on_demand/auto; use "
                                               r"release_experts"):
            s.release(0)
        with pytest.raises(RuntimeError, match="policy on_demand/auto; use acquire_experts"):
            s.acquire(1)
        s.release_experts(0)
