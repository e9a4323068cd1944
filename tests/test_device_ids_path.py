"""ids_path="device" of the weight streamer: expert_cache_pull reads the routed ids where they are and
pulls the missing experts into a per-layer region, no host sync (CPU backend here; on CUDA the same
code runs with mapped pinned memory, covered by the *_cuda cases). Oracle: fused_moe on the layer's
whole weights, and checksums of the host store's experts."""

import warnings
import zlib

import pytest
import torch

from moe_swap import WeightStreamer
from moe_swap.ops import fused_moe, topk_route
from conftest import DEVICES, requires_cuda

from test_expert_cache import random_layers


def checksum(t: torch.Tensor) -> int:
    return zlib.crc32(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())


def device_streamer(layers, cache_experts_per_layer, device="cpu", policy="on_demand"):
    """Regions of `cache_experts_per_layer` slots: the budget adds the host path's room for wide steps
    (one layer, two under auto) that the streamer takes first."""
    w13, w2 = layers[0]
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    host_room = (2 if policy == "auto" else 1) * w13.shape[0] * expert_bytes
    s = WeightStreamer(device, policy=policy, ids_path="device",
                       cache_bytes=cache_experts_per_layer * expert_bytes * len(layers) + host_room)
    for a, b in layers:
        s.add_layer(a, b)
    return s


def route(tokens, experts, top_k, device="cpu"):
    """(weights, ids) of random routing."""
    return topk_route(torch.randn(tokens, experts, device=device), top_k, renormalize=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts, top_k, region", [(8, 2, 2), (8, 2, 5), (16, 4, 16), (32, 3, 12)])
def test_every_step_computes_with_the_right_experts(device, experts, top_k, region):
    layers = random_layers(3, experts)
    sums = [[(checksum(w13[e]), checksum(w2[e])) for e in range(experts)] for w13, w2 in layers]
    with device_streamer(layers, region, device=device) as s:
        s.prepare_device_cache()
        routed = 0
        for step in range(10):
            tokens = 1 + step % max(1, region // top_k)  # every step fits the region
            for layer, (w13, w2) in enumerate(layers):
                x = torch.randn(tokens, 16, device=device)
                weights, ids = route(tokens, experts, top_k, device)
                out = s.moe(layer, x, weights, ids)
                torch.testing.assert_close(out, fused_moe(x, w13.to(device), w2.to(device), weights, ids))
                r = s._regions[layer]
                for e in set(ids.flatten().tolist()):  # the slot the map names holds that expert
                    slot = int(r.expert_map[e])
                    assert (checksum(r.pool_w13[slot]), checksum(r.pool_w2[slot])) == sums[layer][e]
                routed += len(set(ids.flatten().tolist()))
        stats = s.stats()
        assert stats["device_steps"] == 30 and stats["ids_path"] == "device"
        assert stats["expert_hits"] + stats["expert_misses"] == routed
        expert_bytes = (layers[0][0][0].numel() + layers[0][1][0].numel()) * 4
        assert stats["bytes_copied"] == stats["expert_misses"] * expert_bytes
        assert stats["ids_to_host_ms"] == 0  # the ids never went to the host
        if region == experts:  # every expert fits: after the first touch, only hits
            assert stats["expert_misses"] <= 3 * experts


def test_a_region_keeps_recent_experts_across_steps():
    layers = random_layers(1, 8)
    with device_streamer(layers, 4) as s:
        x = torch.randn(1, 16)
        weights = torch.full((1, 2), 0.5)
        for ids in ([[0, 1]], [[2, 3]], [[0, 1]], [[4, 5]], [[0, 1]]):
            s.moe(0, x, weights, torch.tensor(ids, dtype=torch.int32))
        stats = s.stats()["layers"][0]
        # misses: 0,1 / 2,3 / - / 4,5 (evicting 2,3, the least recently used) / -
        assert (stats["expert_hits"], stats["expert_misses"], stats["evictions"]) == (4, 6, 2)
        assert sorted(s.cache_state()["device_regions"][0][1]) == [0, 1, 4, 5]


def test_wide_steps_take_the_host_path_and_give_the_same_output():
    layers = random_layers(2, 8)
    with device_streamer(layers, 2, policy="auto") as s:
        for tokens in (1, 16, 1):  # 2 ids fit the 2-slot region; 32 ids do not
            for layer, (w13, w2) in enumerate(layers):
                x = torch.randn(tokens, 16)
                weights, ids = route(tokens, 8, 2)
                torch.testing.assert_close(s.moe(layer, x, weights, ids), fused_moe(x, w13, w2, weights, ids))
        stats = s.stats()
        assert stats["device_steps"] == 4
        assert sum(l["acquires"] for l in stats["layers"]) == 2  # the host path's steps
        # the host path's room: two layers under auto (the prefill double buffering); regions the rest
        state = s.cache_state()
        assert state["capacity"] == 2 * 8 and [r[0] for r in state["device_regions"]] == [2, 2]


def test_a_budget_below_the_host_room_has_no_regions():
    layers = random_layers(2, 8)
    expert_bytes = (layers[0][0][0].numel() + layers[0][1][0].numel()) * 4
    with WeightStreamer("cpu", policy="on_demand", ids_path="device", cache_bytes=9 * expert_bytes) as s:
        for a, b in layers:
            s.add_layer(a, b)
        s.prepare_device_cache()  # 8 experts of room for the host path, 1 left: no region can hold one per layer
        assert s.cache_state()["capacity"] == 8 and s.cache_state()["device_regions"] == [None, None]


def test_zero_budget_has_no_regions_and_still_computes():
    layers = random_layers(2, 8)
    with WeightStreamer("cpu", policy="on_demand", ids_path="device") as s:
        for a, b in layers:
            s.add_layer(a, b)
        for layer, (w13, w2) in enumerate(layers):
            x = torch.randn(3, 16)
            weights, ids = route(3, 8, 2)
            torch.testing.assert_close(s.moe(layer, x, weights, ids), fused_moe(x, w13, w2, weights, ids))
        assert s.cache_state()["device_regions"] == [None, None]
        assert s.stats()["device_steps"] == 0


def test_a_prediction_pulls_into_the_region_and_its_recall_is_counted():
    layers = random_layers(2, 8)
    with device_streamer(layers, 4) as s:
        s.prepare_device_cache()
        x = torch.randn(1, 16)
        weights = torch.full((1, 2), 0.5)
        s.predict(1, torch.tensor([[3, 4]]))  # copied ahead into layer 1's region
        assert sorted(e for e in s.cache_state()["device_regions"][1][1] if e >= 0) == [3, 4]
        ids = torch.tensor([[4, 6]], dtype=torch.int32)  # one of the two guesses was right
        torch.testing.assert_close(s.moe(1, x, weights, ids), fused_moe(x, *layers[1], weights, ids))
        layer = s.stats()["layers"][1]
        assert (layer["predicted"], layer["predicted_used"], layer["routed_distinct"]) == (2, 1, 2)
        assert (layer["expert_hits"], layer["expert_misses"], layer["device_steps"]) == (1, 1, 1)
        assert layer["prediction_recall"] == 0.5 and layer["bytes_copied"] == 3 * s._regions[1].expert_bytes
        s.predict(1, torch.tensor([[0, 1, 2], [5, 6, 7]]))  # wider than the 4-slot region: dropped
        assert s.stats()["layers"][1]["predicted"] == 2


@pytest.mark.parametrize("device", DEVICES)
def test_predictions_never_change_the_output(device):
    # random guesses, right or wrong, before every step: outputs equal fused_moe on the whole layer
    experts, top_k = 16, 2
    layers = random_layers(3, experts)
    device_layers = [(a.to(device), b.to(device)) for a, b in layers]
    with device_streamer(layers, 4, device=device) as s:
        s.prepare_device_cache()
        for _ in range(12):
            x = torch.randn(2, 16, device=device)
            for layer in range(3):
                weights, ids = route(2, experts, top_k, device)
                out = s.moe(layer, x, weights, ids)
                torch.testing.assert_close(out, fused_moe(x, *device_layers[layer], weights, ids))
                if layer + 1 < 3:
                    s.predict(layer + 1, torch.randint(0, experts, (1, 3), device=device))
                x = out
        stats = s.stats()
        assert stats["predicted"] > 0 and 0 <= stats["prediction_recall"] <= 1
        assert stats["device_steps"] == 36


def test_device_path_traces_under_torch_compile():
    layers = random_layers(2, 8)
    with device_streamer(layers, 4) as s:
        s.prepare_device_cache()

        def step(x, weights, ids):
            return s.moe(1, s.moe(0, x, weights, ids), weights, ids)

        x = torch.randn(2, 16)
        weights, ids = route(2, 8, 2)
        expected = fused_moe(fused_moe(x, *layers[0], weights, ids), *layers[1], weights, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(step, fullgraph=True)
            torch.testing.assert_close(compiled(x, weights, ids), expected)
            weights, ids = route(2, 8, 2)  # new routing, same graph: the region's state is data
            expected = fused_moe(fused_moe(x, *layers[0], weights, ids), *layers[1], weights, ids)
            torch.testing.assert_close(compiled(x, weights, ids), expected)
        assert s.stats()["device_steps"] == 4


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="ids_path must be one of host, device, got 'gpu'"):
        WeightStreamer("cpu", policy="on_demand", ids_path="gpu")
    with pytest.raises(ValueError, match="ids_path='device' needs policy 'on_demand' or 'auto'"):
        WeightStreamer("cpu", ids_path="device")
    with WeightStreamer("cpu", policy="on_demand") as s:
        with pytest.raises(RuntimeError, match="is for ids_path='device'"):
            s.prepare_device_cache()
    with WeightStreamer("cpu", policy="on_demand", ids_path="device", cache_bytes=1 << 20) as s:
        with pytest.raises(RuntimeError, match="has no layers"):
            s.prepare_device_cache()
        s.add_layer(*random_layers(1, 4)[0])
        s.prepare_device_cache()
        with pytest.raises(RuntimeError, match="after prepare_device_cache"):
            s.add_layer(*random_layers(1, 4)[0])
        with pytest.raises(RuntimeError, match=r"write\(\) after prepare_device_cache"):
            s.write(0, "w2", torch.zeros(4, 16, 8))
        with pytest.raises(RuntimeError, match=r"expert ids in \[0, 4\), got 7"):
            s.moe(0, torch.randn(1, 16), torch.ones(1, 1), torch.tensor([[7]]))
        with pytest.raises(RuntimeError, match=r"layer must be in \[0, 1\), got 3"):
            s.moe(3, torch.randn(1, 16), torch.ones(1, 1), torch.tensor([[1]]))


def test_an_invalid_id_after_a_prediction_is_named_by_the_pull():
    layers = random_layers(1, 8)
    with device_streamer(layers, 4) as s:
        s.predict(0, torch.tensor([[1, 2]]))  # the step then counts its recall from the routed ids
        with pytest.raises(RuntimeError, match=r"expert ids in \[0, 8\), got 9 at flat position 1"):
            s.moe(0, torch.randn(1, 16), torch.full((1, 2), 0.5), torch.tensor([[1, 9]]))


# ---- CUDA: the point of the device path (no sync, capturable); these run where a GPU is present ----

@requires_cuda
def test_an_invalid_id_after_a_prediction_is_skipped_as_fused_moe_skips_it_cuda(debug_off):
    # the recall count must not index with it (a device-side assert would lose the CUDA context)
    layers = random_layers(1, 8)
    with device_streamer(layers, 4, device="cuda") as s:
        s.predict(0, torch.tensor([[1, 2]], device="cuda"))
        x = torch.randn(1, 16, device="cuda")
        weights = torch.full((1, 2), 0.5, device="cuda")
        ids = torch.tensor([[1, 9]], dtype=torch.int32, device="cuda")
        out = s.moe(0, x, weights, ids)
        torch.testing.assert_close(out, fused_moe(x, layers[0][0].cuda(), layers[0][1].cuda(), weights, ids))
        assert s.stats()["layers"][0]["predicted_used"] == 1


@requires_cuda
def test_ids_from_the_cpu_take_the_device_path_too_cuda():
    # as the host path takes them: the region moves them to the pool's device
    layers = random_layers(2, 8)
    with device_streamer(layers, 4, device="cuda") as s:
        s.prepare_device_cache()
        s.predict(1, torch.tensor([[3, 5]]))
        for layer, (w13, w2) in enumerate(layers):
            x = torch.randn(2, 16, device="cuda")
            weights, ids = route(2, 8, 2)
            out = s.moe(layer, x, weights.cuda(), ids)
            torch.testing.assert_close(out, fused_moe(x, w13.cuda(), w2.cuda(), weights.cuda(), ids.cuda()))
        assert s.stats()["device_steps"] == 2


@requires_cuda
def test_device_path_step_does_not_sync_cuda(debug_off):
    layers = random_layers(2, 16)
    with device_streamer(layers, 8, device="cuda") as s:
        s.prepare_device_cache()
        x = torch.randn(3, 16, device="cuda")
        weights, ids = route(3, 16, 2, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host<->device sync inside raises
        try:
            out = s.moe(1, s.moe(0, x, weights, ids), weights, ids)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        cuda_layers = [(a.cuda(), b.cuda()) for a, b in layers]
        expected = fused_moe(fused_moe(x, *cuda_layers[0], weights, ids), *cuda_layers[1], weights, ids)
        torch.testing.assert_close(out, expected)
        assert s.stats()["device_steps"] == 2


@requires_cuda
@pytest.mark.parametrize("predict", [False, True])
def test_device_path_steps_replay_in_a_cuda_graph_cuda(debug_off, predict):
    experts, tokens, top_k = 16, 3, 2
    layers = random_layers(2, experts)
    cuda_layers = [(a.cuda(), b.cuda()) for a, b in layers]
    with device_streamer(layers, tokens * top_k, device="cuda") as s:
        s.prepare_device_cache()
        x = torch.randn(tokens, 16, device="cuda")
        weights, ids = route(tokens, experts, top_k, "cuda")

        def forward():
            hidden = s.moe(0, x, weights, ids)
            if predict:  # layer 1's guess (layer 0's ids, shifted) pulled on the side stream under nothing
                s.predict(1, (ids + 1) % experts)
            return s.moe(1, hidden, weights, ids)

        side = torch.cuda.Stream()  # warm up on a side stream before capture (torch.cuda.graphs' rule)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the prediction's side stream forks from the capture and joins it
            out = forward()
        for _ in range(6):  # new routing each replay: the pull and the map follow the data
            new_weights, new_ids = route(tokens, experts, top_k, "cuda")
            weights.copy_(new_weights)
            ids.copy_(new_ids)
            x.copy_(torch.randn(tokens, 16, device="cuda"))
            graph.replay()
            expected = fused_moe(fused_moe(x, *cuda_layers[0], weights, ids), *cuda_layers[1], weights, ids)
            torch.testing.assert_close(out, expected)
        stats = s.stats()
        assert stats["device_steps"] == 2 * (1 + 6)  # warm-up and replays (capture runs nothing)
        assert (stats["predicted"] > 0) == predict


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["on_demand", "auto"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated_relu2", "gated_swiglu_clamp"])
def test_region_steps_pass_biases_and_gating_to_fused_moe(device, policy, gated):
    from moe_swap import reference
    from test_streamer import streamed_options_layer
    layers = [streamed_options_layer(gated, E=8) for _ in range(2)]
    with device_streamer([(a.to(device), b.to(device)) for a, b, _ in layers], 4, device=device, policy=policy) as s:
        s.prepare_device_cache()
        for step in range(6):
            for layer, (w13, w2, options) in enumerate(layers):
                x = torch.randn(2, 24, device=device)
                weights, ids = route(2, 8, 2, device)  # 4 pairs: fits the region of 4
                on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
                out = s.moe(layer, x, weights, ids, **on_device)
                expected = reference.fused_moe(x.cpu(), w13, w2, weights.cpu(), ids.cpu(), **options)
                torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
        assert s.stats()["device_steps"] == 12  # every step went through a region
