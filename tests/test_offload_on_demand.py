"""moe_swap.offload(..., policy="on_demand") on random models of every supported family: the same
outputs as policy full (which test_offload.py checks against the unmodified model)."""

import copy
import warnings

import pytest
import torch

import moe_swap
from test_offload import FAMILIES, greedy, logits, prompt, tiny_model


def offloaded(model, **kwargs):
    model = copy.deepcopy(model)
    report = moe_swap.offload(model, device="cpu", **kwargs)
    return model, report


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy", ["on_demand", "auto"])
def test_on_demand_equals_full(model_type, policy):
    model = tiny_model(model_type)
    ids = prompt()
    full, _ = offloaded(model, policy="full")
    demand, report = offloaded(model, policy=policy)
    torch.testing.assert_close(logits(demand, ids), logits(full, ids), rtol=0, atol=0)
    assert torch.equal(greedy(demand, ids), greedy(full, ids))
    stats = report.stats()
    assert stats["expert_misses"] > 0 and stats["bytes_copied"] > 0


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("predict", [False, True])
def test_device_ids_path_equals_full(model_type, predict):
    # the device path at decode, the host path for the prompt. With no budget the regions get what full's
    # two ring slots would (two layers over three: enough for one sequence's top-k), the host path a layer
    model = tiny_model(model_type)
    ids = prompt(batch=1)
    full, _ = offloaded(model, policy="full")
    device, report = offloaded(model, policy="on_demand", ids_path="device", predict=predict)
    torch.testing.assert_close(logits(device, ids), logits(full, ids), rtol=0, atol=0)
    assert torch.equal(greedy(device, ids), greedy(full, ids))
    stats = report.stats()
    assert stats["device_steps"] > 0 and stats["expert_misses"] > 0 and stats["ids_path"] == "device"
    # predictions for every streamed layer that follows a streamed layer (the next layer's router)
    assert (stats["predicted"] > 0) == (predict and len(report.streamed_layers) > 1)
    assert "device steps" in report.cache_table() and "routed ids read on the device" in str(report)


def test_device_ids_path_bad_combinations_raise():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="ids_path must be one of host, device, got 'cuda'"):
        offloaded(model, policy="on_demand", ids_path="cuda")
    with pytest.raises(ValueError, match="ids_path='device' needs policy 'on_demand' or 'auto'"):
        offloaded(model, ids_path="device")


def test_auto_with_a_given_cost_model():
    model = tiny_model("mixtral")
    ids = prompt(batch=1)
    full, _ = offloaded(model, policy="full")
    # a slow link with a large per-copy cost: every step with a miss copies the whole layer
    auto, report = offloaded(model, policy="auto", copy_cost=(1e4, 0.1))
    assert torch.equal(greedy(auto, ids, 3), greedy(full, ids, 3))
    assert report.streamer.cache_state()["copy_overhead_us"] == 1e4
    assert report.stats()["layer_copies"] > 0
    with pytest.raises(ValueError, match="copy_cost is the cost model of policy 'auto'"):
        offloaded(model, policy="on_demand", copy_cost=(1.0, 10.0))
    with pytest.raises(ValueError, match=r"gb_per_s .* must be in \(0, 1e4\]"):
        offloaded(model, policy="auto", copy_cost=(1.0, 0))


def test_device_ids_path_without_room_for_regions_warns():
    # a budget that leaves the cache at most two layers: all of it auto's host room for prefills
    model = tiny_model("qwen3_moe")
    _, probe = offloaded(model, policy="auto")
    layer = probe.expert_bytes // len(probe.moe_layers)
    budget = probe.device_bytes - probe.cache_bytes + 2 * layer
    with pytest.warns(UserWarning, match="leaves no region after the host path's room for wide steps \\(two layers\\)"):
        device, report = offloaded(model, policy="auto", ids_path="device", gpu_budget=budget)
    assert report.streamed_layers and report.cache_bytes <= 2 * layer
    ids = prompt(batch=1)
    full, _ = offloaded(model, policy="full")
    assert torch.equal(greedy(device, ids, 3), greedy(full, ids, 3))
    assert report.stats()["device_steps"] == 0


@pytest.mark.parametrize("eviction", ["lru", "lfu", "flru"])
@pytest.mark.parametrize("predict", [False, True])
def test_small_cache_every_eviction_with_and_without_prediction(eviction, predict):
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    ids = prompt()
    full, _ = offloaded(model, policy="full")
    probe, probe_report = offloaded(model, policy="on_demand")
    # the smallest budget the planner accepts: non-expert weights + one layer, the rest resident
    minimum = probe_report.device_bytes - probe_report.cache_bytes + probe_report.expert_bytes // 4
    demand, report = offloaded(model, policy="on_demand", gpu_budget=minimum, eviction=eviction, predict=predict)
    assert report.streamed_layers and report.cache_bytes <= report.expert_bytes // 4
    assert torch.equal(greedy(demand, ids, 6), greedy(full, ids, 6))
    stats = report.stats()
    assert stats["evictions"] > 0
    assert (stats["predicted"] > 0) == (predict and len(report.streamed_layers) > 1
                                        and any(b - a == 1 for a, b in zip(report.moe_layers, report.moe_layers[1:])
                                                if a in report.streamed_layers and b in report.streamed_layers))
    table = report.cache_table()
    assert "hit rate" in table and "recall" in table and len(table.splitlines()) == 3 + len(report.streamed_layers)
    assert "expert cache" in str(report) and eviction in str(report)


@pytest.mark.parametrize("ids_path", ["host", "device"])
def test_on_demand_torch_compile_fullgraph_matches_eager(ids_path):
    model = tiny_model("qwen3_moe", num_hidden_layers=2)
    report = moe_swap.offload(model, device="cpu", policy="on_demand", predict=ids_path == "host", ids_path=ids_path)
    # device: one token, so every step takes the device path (expert_cache_pull + fused_moe in the graph)
    ids = prompt() if ids_path == "host" else prompt(batch=1, length=1)
    expected = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)  # streamer_moe is one opaque op: no graph break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = logits(compiled, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if ids_path == "device":
        assert report.stats()["device_steps"] == 2 * len(report.streamed_layers)  # eager + compiled


def test_on_demand_needs_less_than_full_at_the_minimum():
    model = tiny_model("mixtral")
    _, full = offloaded(model, policy="full")
    minimum_full = full.device_bytes  # base + 2 slots with no budget
    layer = full.expert_bytes // len(full.moe_layers)
    _, demand = offloaded(model, policy="on_demand", gpu_budget=minimum_full - layer)
    assert demand.streamed_layers and demand.cache_bytes >= layer
    with pytest.raises(ValueError, match="one step's working set"):
        offloaded(model, policy="on_demand", gpu_budget=minimum_full - 2 * layer - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("policy, ids_path, predict", [("full", "host", False), ("on_demand", "host", False),
                                                       ("on_demand", "host", True), ("auto", "host", False),
                                                       ("on_demand", "device", False), ("on_demand", "device", True)])
def test_offload_on_cuda_gives_the_unmodified_models_tokens_cuda(model_type, policy, ids_path, predict):
    # the CUDA backend end to end: pinned host store, copy stream (or the pull kernel), fused_moe on CUDA
    model = tiny_model(model_type)
    reference = copy.deepcopy(model).cuda()
    ids = prompt(batch=1).cuda()
    report = moe_swap.offload(model, device="cuda", policy=policy, ids_path=ids_path, predict=predict)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-3, atol=1e-3)
    assert torch.equal(greedy(model, ids), greedy(reference, ids))
    stats = report.stats()
    assert stats["bytes_copied"] > 0
    if ids_path == "device":
        assert stats["device_steps"] > 0


@pytest.mark.parametrize("policy, mode", [("full", "full"), ("full", "sync"), ("on_demand", "full"), ("auto", "full")])
def test_report_and_stats_agree(policy, mode):
    # one source of truth: the report's streamer figures are the streamer's stats(), before and after a step
    model, report = offloaded(tiny_model("qwen3_moe"), policy=policy, mode=mode)
    ids = prompt()
    for when in ("before", "after"):
        stats = report.stats()
        assert (stats["policy"], stats["mode"]) == (report.policy, report.mode), when
        assert (stats["slots"], stats["slot_bytes"], stats["cache_bytes"]) == \
            (report.slots, report.slot_bytes, report.cache_bytes), when
        non_streamer = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        assert report.device_bytes == non_streamer + stats["device_bytes"], when
        logits(model, ids)
    assert stats["device_bytes_allocated"] == stats["device_bytes"]  # what was planned is what was allocated
    if policy == "full":
        assert report.slots == 2 and report.streamed_bytes_per_forward == report.streamed_expert_bytes
        assert report.cache_bytes == 0
    else:  # the ring is unused on demand; what a forward streams depends on the routing
        assert report.slots == 0 and report.slot_bytes == 0 and report.cache_bytes > 0
        assert report.streamed_bytes_per_forward is None
        assert 0 < report.copied_bytes and "only routed experts missing from the cache" in str(report)


def test_device_ids_path_warns_once_when_most_steps_are_too_wide():
    model, report = offloaded(tiny_model("qwen3_moe"), policy="on_demand", ids_path="device")
    region_slots = max(r[0] for r in report.streamer.cache_state()["device_regions"] if r is not None)
    top_k = moe_swap.models.family_for_config(model.config).routing(model.config).top_k
    wide = prompt(batch=region_slots // top_k + 1)[:, :1]  # one decode-like step whose ids overflow the region
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(12):
                model(wide)
    said = [w for w in caught if "took the host path" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    stats = report.stats()
    assert stats["wide_steps"] == 12 * len(report.streamed_layers) and stats["device_steps"] == 0
    assert "wide steps" in report.cache_table()
