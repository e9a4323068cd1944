"""The weight streamer: round trips against the original tensors, the schedule (prefetch, wrap-around,
on-demand), every bad-input and fault case, lifetime and leaks, and the ops under torch.compile.

CPU backend always; CUDA cases where a GPU is present.
"""

import gc
import os
import random
import threading
import time
import zlib

import pytest
import torch

import moe_swap
from moe_swap import WeightStreamer, fused_moe, reference, topk_route
from moe_swap.testing import host_tensors, live_counts, set_hooks

from conftest import DEVICES, requires_cuda

MODES = ["full", "sync", "uva"]


def make_layer(E, I, H, dtype=torch.float32, device="cpu"):
    w13 = torch.randn(E, 2 * I, H, dtype=torch.float32).to(dtype=dtype, device=device)
    w2 = torch.randn(E, H, I, dtype=torch.float32).to(dtype=dtype, device=device)
    return w13, w2


def random_layers(n, rng, dtype=torch.float32):
    return [make_layer(rng.randint(1, 6), rng.randint(1, 24), rng.randint(1, 40), dtype) for _ in range(n)]


def crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# ---------------------------------------------------------------- round trips and the schedule

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("slots,depth", [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (4, 3)])
@pytest.mark.parametrize("num_layers", [1, 3, 7])
def test_round_trip_matches_originals(device, mode, slots, depth, num_layers):
    rng = random.Random(slots * 100 + depth * 10 + num_layers)
    layers = random_layers(num_layers, rng, dtype=torch.bfloat16 if num_layers == 3 else torch.float32)
    with WeightStreamer(device, slots=slots, prefetch_depth=depth, mode=mode) as s:
        for w13, w2 in layers:
            s.add_layer(w13, w2)
        assert s.host_bytes == sum(a.nbytes + b.nbytes for a, b in layers)  # exact, no rounding
        passes = 3
        for _ in range(passes):
            for i, (w13, w2) in enumerate(layers):
                v13, v2 = s.acquire(i)
                assert v13.device.type == torch.device(device).type
                assert v13.shape == w13.shape and v2.shape == w2.shape and v13.dtype == w13.dtype
                assert torch.equal(v13.cpu(), w13) and torch.equal(v2.cpu(), w2)
                s.release(i)
        st = s.stats()
        assert [l["acquires"] for l in st["layers"]] == [passes] * num_layers
        if mode == "uva":
            assert st["bytes_copied"] == 0 and s.device_bytes == 0
        else:
            max13 = max(a.nbytes for a, _ in layers)
            max2 = max(b.nbytes for _, b in layers)
            assert s.device_bytes == slots * (max13 + max2)
        if mode == "sync":  # the legacy baseline copies every layer on every acquire
            assert st["copies_issued"] == passes * num_layers
        for i, (w13, w2) in enumerate(layers):
            h13, h2 = host_tensors(s, i)
            assert torch.equal(h13, w13) and torch.equal(h2, w2)


def test_add_layer_copies_so_caller_may_free_or_change_its_tensors():
    w13, w2 = make_layer(3, 8, 16)
    keep13, keep2 = w13.clone(), w2.clone()
    with WeightStreamer("cpu") as s:
        s.add_layer(w13, w2)
        w13.zero_()
        w2.fill_(7)
        del w13, w2
        gc.collect()
        a, b = s.acquire(0)
        assert torch.equal(a, keep13) and torch.equal(b, keep2)
        s.release(0)


def test_full_mode_wraps_around_without_draining():
    # L=4 layers, 2 slots, depth 1: only the very first acquire copies on demand; every other acquire
    # (including layer 0 of the next passes) finds its layer prefetched during the previous layer.
    layers = [make_layer(2, 8, 16) for _ in range(4)]
    with WeightStreamer("cpu", slots=2, prefetch_depth=1) as s:
        for w in layers:
            s.add_layer(*w)
        for _ in range(5):
            for i in range(4):
                s.acquire(i)
                s.release(i)
        st = s.stats()
        assert sum(l["demand_copies"] for l in st["layers"]) == 1
        assert sum(l["hits"] for l in st["layers"]) == 19
        # 20 acquires + the prefetch of the next pass's layer 0, each a whole layer
        assert st["copies_issued"] == 21
        assert st["bytes_copied"] == 21 * (layers[0][0].nbytes + layers[0][1].nbytes)


def test_layers_fitting_the_ring_stay_resident():
    layers = [make_layer(2, 4, 8) for _ in range(3)]
    with WeightStreamer("cpu", slots=3, prefetch_depth=2) as s:
        for w in layers:
            s.add_layer(*w)
        for _ in range(4):
            for i in range(3):
                s.acquire(i)
                s.release(i)
        assert s.stats()["copies_issued"] == 3


@pytest.mark.parametrize("mode", ["full", "sync"])
def test_acquire_without_prefetch_and_out_of_order(mode):
    rng = random.Random(5)
    layers = random_layers(6, rng)
    with WeightStreamer("cpu", slots=2, prefetch_depth=0 if mode == "full" else 1, mode=mode) as s:
        for w in layers:
            s.add_layer(*w)
        order = [rng.randrange(6) for _ in range(40)]
        for i in order:
            a, b = s.acquire(i)
            assert torch.equal(a, layers[i][0]) and torch.equal(b, layers[i][1])
            s.release(i)
        st = s.stats()
        assert sum(l["acquires"] for l in st["layers"]) == 40
        if mode == "full":  # depth 0: nothing was prefetched, every miss copied on demand
            assert all(l["hits"] + l["demand_copies"] == l["acquires"] for l in st["layers"])


def test_explicit_prefetch_is_a_hit():
    layers = [make_layer(2, 8, 8) for _ in range(5)]
    with WeightStreamer("cpu", slots=2, prefetch_depth=0) as s:
        for w in layers:
            s.add_layer(*w)
        s.prefetch(3)
        s.synchronize()
        a, _ = s.acquire(3)
        assert torch.equal(a, layers[3][0])
        assert s.stats()["layers"][3]["hits"] == 1
        s.release(3)


def test_two_layers_held_at_once_and_ring_recovers():
    layers = [make_layer(2, 8, 8) for _ in range(4)]
    with WeightStreamer("cpu", slots=3, prefetch_depth=1) as s:
        for w in layers:
            s.add_layer(*w)
        for _ in range(3):
            for i in range(4):
                a, _ = s.acquire(i)
                b, _ = s.acquire((i + 1) % 4)
                assert torch.equal(a, layers[i][0]) and torch.equal(b, layers[(i + 1) % 4][0])
                s.release(i)
                s.release((i + 1) % 4)


def test_layers_of_different_shapes_and_a_larger_layer_added_later():
    small = make_layer(4, 8, 16)
    big = make_layer(8, 16, 32)
    with WeightStreamer("cpu", slots=2) as s:
        s.add_layer(*small)
        s.acquire(0)
        before = s.device_bytes
        i = s.add_layer(*big)
        with pytest.raises(RuntimeError, match="release every layer"):
            s.acquire(i)  # the ring must grow, but layer 0 is still held
        s.release(0)
        a, b = s.acquire(i)
        assert torch.equal(a, big[0]) and torch.equal(b, big[1])
        s.release(i)
        assert s.device_bytes == 2 * (big[0].nbytes + big[1].nbytes) > before
        a, _ = s.acquire(0)
        assert torch.equal(a, small[0])
        s.release(0)


def test_stats_trace_has_copy_wait_and_hold_spans():
    layers = [make_layer(2, 8, 8) for _ in range(3)]
    with WeightStreamer("cpu", slots=2, trace=True) as s:
        for w in layers:
            s.add_layer(*w)
        for i in range(3):
            s.acquire(i)
            time.sleep(0.002)
            s.release(i)
        st = s.stats()
        kinds = {(sp["kind"], sp["layer"]) for sp in st["trace"]}
        for i in range(3):
            assert ("copy", i) in kinds and ("wait", i) in kinds and ("hold", i) in kinds
        for sp in st["trace"]:
            assert sp["end_us"] >= sp["start_us"] >= 0
            if sp["kind"] == "hold":
                assert sp["end_us"] - sp["start_us"] >= 1500
        assert all(l["waits_timed"] == 1 for l in st["layers"])


# ---------------------------------------------------------------- bad input (each a test)

@pytest.fixture
def streamer3():
    s = WeightStreamer("cpu", slots=2, prefetch_depth=1)
    layers = [make_layer(2, 4, 8) for _ in range(3)]
    for w in layers:
        s.add_layer(*w)
    yield s
    s.close()


@pytest.mark.parametrize("layer", [-1, 3, 1 << 40])
def test_layer_out_of_range(streamer3, layer):
    for op in (streamer3.acquire, streamer3.release, streamer3.prefetch, lambda l: host_tensors(streamer3, l)):
        with pytest.raises(RuntimeError, match=r"layer must be in \[0, 3\)"):
            op(layer)
    with pytest.raises(RuntimeError, match=r"layer must be in \[0, 3\)"):
        streamer3.write(layer, "w13", torch.zeros(4, 8))


def test_release_without_acquire(streamer3):
    with pytest.raises(RuntimeError, match="not acquired"):
        streamer3.release(1)


def test_release_twice(streamer3):
    streamer3.acquire(0)
    streamer3.release(0)
    with pytest.raises(RuntimeError, match="released twice"):
        streamer3.release(0)


def test_acquire_twice(streamer3):
    streamer3.acquire(0)
    with pytest.raises(RuntimeError, match="already acquired"):
        streamer3.acquire(0)
    streamer3.release(0)


def test_ring_exhausted_is_an_error_not_a_deadlock(streamer3):
    streamer3.acquire(0)
    streamer3.acquire(1)
    result = {}

    def try_third():
        try:
            streamer3.acquire(2)
            result["ok"] = True
        except RuntimeError as e:
            result["error"] = str(e)

    t = threading.Thread(target=try_third)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "acquire on an exhausted ring blocked"
    assert "exhausted" in result["error"] and "[0, 1]" in result["error"]
    streamer3.release(0)
    a, _ = streamer3.acquire(2)  # recovers once a slot is released
    streamer3.release(2)
    streamer3.release(1)


@pytest.mark.parametrize("mode", MODES)
def test_uva_and_sync_have_the_same_contract_errors(mode):
    with WeightStreamer("cpu", slots=1, prefetch_depth=0, mode=mode) as s:
        s.add_layer(*make_layer(2, 4, 4))
        s.add_layer(*make_layer(2, 4, 4))
        with pytest.raises(RuntimeError, match="not acquired"):
            s.release(0)
        s.acquire(0)
        with pytest.raises(RuntimeError, match="already acquired"):
            s.acquire(0)
        if mode != "uva":
            with pytest.raises(RuntimeError, match="exhausted"):
                s.acquire(1)
        s.release(0)


@pytest.mark.parametrize("w13_shape,w2_shape,match", [
    ((2, 7, 8), (2, 8, 3), r"w13.size\(1\) must be 2\*I .* or I .* I = w2.size\(2\) = 3, got 7"),
    ((2, 8, 8), (3, 8, 4), r"w2 must be \[E, H, I\]"),
    ((2, 8, 8), (2, 8, 5), r"w13.size\(1\) must be 2\*I"),  # neither 2 * 5 nor 5
    ((2, 8, 8), (2, 6, 4), r"w2 must be \[E, H, I\]"),
    ((2, 0, 8), (2, 8, 0), "positive"),
])
def test_add_layer_bad_shapes(w13_shape, w2_shape, match):
    with WeightStreamer("cpu") as s:
        with pytest.raises(RuntimeError, match=match):
            s.add_layer(torch.randn(w13_shape), torch.randn(w2_shape))
        assert s.num_layers == 0


def test_add_layer_bad_dims_and_dtypes():
    with WeightStreamer("cpu") as s:
        with pytest.raises(ValueError, match="w13 must be"):
            s.add_layer(torch.randn(8, 8), torch.randn(2, 8, 4))
        with pytest.raises(RuntimeError, match="same dtype"):
            torch.ops.moe_swap.streamer_add_layer(s.handle, torch.randn(2, 8, 8), torch.randn(2, 8, 4).half())
        with pytest.raises(TypeError):
            s.add_layer([1, 2], torch.randn(2, 8, 4))


def test_write_checks_bounds_and_dtype():
    with WeightStreamer("cpu") as s:
        i = s.reserve_layer((2, 8, 4), (2, 4, 4), torch.float32)
        with pytest.raises(RuntimeError, match="dtype"):
            s.write(i, "w13", torch.zeros(4, 4, dtype=torch.float16))
        with pytest.raises(RuntimeError, match=r"rows \[6, 6 \+ 4\)"):
            s.write(i, "w13", torch.zeros(4, 4), expert=0, row=6)
        with pytest.raises(RuntimeError, match=r"experts \[2, 2 \+ 1\)"):
            s.write(i, "w13", torch.zeros(8, 4), expert=2)
        with pytest.raises(RuntimeError, match="size\\(2\\)"):
            s.write(i, "w2", torch.zeros(4, 5))
        with pytest.raises(ValueError, match="which"):
            s.write(i, "w3", torch.zeros(4, 4))
        with pytest.raises(RuntimeError, match="bytes written"):
            s.acquire(i)  # nothing written yet


def test_write_while_acquired_is_an_error_and_write_after_invalidates_the_slot():
    w13, w2 = make_layer(2, 4, 4)
    with WeightStreamer("cpu", slots=2) as s:
        s.add_layer(w13, w2)
        s.acquire(0)
        with pytest.raises(RuntimeError, match="is acquired"):
            s.write(0, "w2", torch.zeros(2, 4, 4))
        s.release(0)
        new2 = torch.randn(2, 4, 4)
        s.write(0, "w2", new2)
        _, b = s.acquire(0)  # the slot's old copy must not be served
        assert torch.equal(b, new2)
        s.release(0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(slots=0), RuntimeError, "slots must be in"),
    (dict(slots=2, prefetch_depth=2), RuntimeError, "prefetch_depth must be in"),
    (dict(slots=2, prefetch_depth=-1), RuntimeError, "prefetch_depth must be in"),
    (dict(mode="fast"), ValueError, "mode must be"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        WeightStreamer("cpu", **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(copy_delay_us=-5), ValueError, r"test_copy_delay_us must be in \[0, 1000000\]"),
    (dict(copy_delay_us=10**6 + 1), ValueError, r"test_copy_delay_us must be in \[0, 1000000\]"),
    (dict(fail_copy_at=1.5), TypeError, "fail_copy_at must be an int"),
])
def test_bad_test_hooks(kwargs, exc, match):
    with WeightStreamer("cpu") as s, pytest.raises(exc, match=match):
        set_hooks(s, **kwargs)
    # and the op itself checks what the Python face would have refused
    with WeightStreamer("cpu") as s, pytest.raises(RuntimeError, match=r"test_copy_delay_us must be in \[0, 1000000\]"):
        torch.ops.moe_swap_testing.streamer_set_hooks(s.handle, -1, -1)


def test_bad_device():
    with pytest.raises(ValueError, match="device must be"):
        WeightStreamer("meta")
    with pytest.raises(RuntimeError, match="device must be"):
        torch.ops.moe_swap.streamer_create("tpu:0", 2, 1, "full", False, True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            WeightStreamer("cuda")


def test_use_after_close_is_an_error():
    s = WeightStreamer("cpu")
    s.add_layer(*make_layer(2, 4, 4))
    handle = s.handle
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.acquire(0)
    with pytest.raises(RuntimeError, match="unknown or was destroyed"):
        torch.ops.moe_swap.streamer_acquire(handle, 0, [])
    with pytest.raises(RuntimeError, match="unknown or was already destroyed"):
        torch.ops.moe_swap.streamer_destroy(handle)


def test_host_allocation_failure_names_bytes_and_available_memory():
    with WeightStreamer("cpu") as s:
        s.add_layer(*make_layer(2, 4, 4))
        # 2**46 float32 elements = 256 TiB for w13 alone: more than any host has.
        with pytest.raises(RuntimeError, match=r"could not allocate 281474976710656 bytes .*MemAvailable: \d+ bytes"):
            s.reserve_layer((1, 2, 1 << 45), (1, 1 << 45, 1), torch.float32)
        with pytest.raises(RuntimeError, match="too large to address"):
            s.reserve_layer((1 << 40, 2, 1 << 40), (1 << 40, 1 << 40, 1), torch.float32)
        assert s.num_layers == 1  # the streamer is intact
        s.acquire(0)
        s.release(0)


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize("mode", ["full", "sync"])
@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_copy_error_surfaces_at_the_next_acquire(mode, fail_at):
    layers = [make_layer(2, 8, 8) for _ in range(4)]
    with set_hooks(WeightStreamer("cpu", slots=2, prefetch_depth=1, mode=mode), fail_copy_at=fail_at) as s:
        for w in layers:
            s.add_layer(*w)
        # full: copy k is layer k (0 on demand, then each prefetch); sync: copy k is acquire k
        for i in range(4):
            if i == fail_at:
                with pytest.raises(RuntimeError, match=f"layer {i}.*injected copy fault"):
                    s.acquire(i)
            a, b = s.acquire(i)  # the failed layer is copied again
            assert torch.equal(a, layers[i][0]) and torch.equal(b, layers[i][1])
            s.release(i)


def test_destroy_with_copies_in_flight_waits_for_them():
    layers = [make_layer(16, 64, 256) for _ in range(4)]  # 3 MiB per layer: 2-3 delayed chunks each
    s = set_hooks(WeightStreamer("cpu", slots=4, prefetch_depth=3), copy_delay_us=20000)
    for w in layers:
        s.add_layer(*w)
    threads_with_engine = proc_status("Threads")
    a, b = s.acquire(0)  # starts prefetching layers 1..3, each several delayed chunks
    s.release(0)
    t0 = time.perf_counter()
    s.close()
    waited = time.perf_counter() - t0
    assert live_counts()["streamers"] == 0 and live_counts()["host_bytes"] == 0
    assert proc_status("Threads") == threads_with_engine - 1  # the copy engine joined
    assert waited > 0.005  # it did wait for the copies in flight
    # views taken before close keep their memory: reading them is not a use after free
    assert torch.equal(a, layers[0][0]) and torch.equal(b, layers[0][1])


def test_200_create_destroy_cycles_leave_memory_where_it_started():
    def cycle():
        with WeightStreamer("cpu", slots=2, prefetch_depth=1) as s:
            for _ in range(3):
                s.add_layer(torch.randn(4, 64, 256), torch.randn(4, 256, 32))  # ~0.4 MiB per layer
            for i in range(3):
                s.acquire(i)
                s.release(i)
    for _ in range(10):  # warm up allocator caches
        cycle()
    gc.collect()
    rss0, threads0 = proc_status("VmRSS"), proc_status("Threads")
    for _ in range(200):
        cycle()
    gc.collect()
    rss1 = proc_status("VmRSS")
    assert live_counts() == {"streamers": 0, "host_bytes": 0, "host_blocks": 0}
    assert proc_status("Threads") == threads0
    assert rss1 - rss0 < 16 * 1024, f"RSS grew by {rss1 - rss0} KiB over 200 cycles"


# ---------------------------------------------------------------- stress

@pytest.mark.parametrize("slots,depth,max_held", [(2, 1, 1), (3, 2, 2), (2, 1, 2)])
def test_stress_random_delays_tiny_ring_checksums(slots, depth, max_held):
    rng = random.Random(slots * 7 + max_held)
    num_layers = 5
    layers = random_layers(num_layers, rng)
    with set_hooks(WeightStreamer("cpu", slots=slots, prefetch_depth=depth), copy_delay_us=300) as s:
        for w in layers:
            s.add_layer(*w)
        # Checksums of the HostStore's contents, the ground truth of every slot.
        expected = [tuple(crc(t) for t in host_tensors(s, i)) for i in range(num_layers)]
        held = []  # (layer, views, checksum at acquire)
        step = 0
        for _ in range(300):
            if len(held) < max_held and (not held or rng.random() < 0.6):
                layer = (held[-1][0] + 1) % num_layers if held else step % num_layers
                if rng.random() < 0.1:
                    s.prefetch(rng.randrange(num_layers))
                if rng.random() < 0.1:
                    layer = rng.randrange(num_layers)  # off-schedule acquire: copied on demand
                if any(h[0] == layer for h in held):
                    continue
                v13, v2 = s.acquire(layer)
                got = (crc(v13), crc(v2))
                assert got == expected[layer], f"layer {layer}: slot contents differ from the HostStore at acquire"
                held.append((layer, (v13, v2)))
                step = layer + 1
            else:
                layer, (v13, v2) = held.pop(0)
                time.sleep(rng.random() * 0.0005)  # "compute"
                # the slot must not have been overwritten while its layer was held
                assert (crc(v13), crc(v2)) == expected[layer], f"layer {layer}: slot overwritten while held"
                s.release(layer)
        for layer, _ in held:
            s.release(layer)
        st = s.stats()
        assert sum(l["acquires"] for l in st["layers"]) > 100


# ---------------------------------------------------------------- safetensors

def test_load_safetensors_per_expert_and_fused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    E, I, H = 3, 8, 16
    tensors = {}
    for layer in range(2):
        for e in range(E):
            tensors[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"] = torch.randn(I, H, dtype=torch.bfloat16)
            tensors[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"] = torch.randn(I, H, dtype=torch.bfloat16)
            tensors[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] = torch.randn(H, I, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({"fused.w13": torch.randn(E, 2 * I, H, dtype=torch.bfloat16),
               "fused.w2": torch.randn(E, H, I, dtype=torch.bfloat16)}, tmp_path / "b.safetensors")
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    specs = [dict(gate=f"model.layers.{l}.mlp.experts.{{e}}.gate_proj.weight",
                  up=f"model.layers.{l}.mlp.experts.{{e}}.up_proj.weight",
                  down=f"model.layers.{l}.mlp.experts.{{e}}.down_proj.weight", num_experts=E) for l in range(2)]
    specs.append(dict(w13="fused.w13", w2="fused.w2"))
    with WeightStreamer("cpu", slots=2) as s:
        assert s.load_safetensors(files, specs, progress=False) == [0, 1, 2]
        # oracle: the safetensors package's own reader
        with safe_open(files[0], framework="pt") as f:
            for l in range(2):
                want13 = torch.stack([torch.cat([f.get_tensor(specs[l]["gate"].format(e=e)),
                                                 f.get_tensor(specs[l]["up"].format(e=e))]) for e in range(E)])
                want2 = torch.stack([f.get_tensor(specs[l]["down"].format(e=e)) for e in range(E)])
                a, b = s.acquire(l)
                assert torch.equal(a, want13) and torch.equal(b, want2)
                s.release(l)
        with safe_open(files[1], framework="pt") as f:
            a, b = s.acquire(2)
            assert torch.equal(a, f.get_tensor("fused.w13")) and torch.equal(b, f.get_tensor("fused.w2"))
            s.release(2)
        with pytest.raises(KeyError, match="not in the safetensors"):
            s.load_safetensors(files, [dict(w13="nope", w2="fused.w2")])
        with pytest.raises(ValueError, match="must have shape"):
            s.load_safetensors(files, [dict(gate=specs[0]["gate"], up=specs[0]["down"], down=specs[0]["down"],
                                            num_experts=E)])
        assert s.num_layers == 3


def test_load_safetensors_peak_rss_stays_near_store_plus_one_tensor(tmp_path):
    from safetensors.torch import save_file

    E, I, H, L = 8, 256, 1024, 6  # 16 MiB w13 + 8 MiB w2 per layer: a 144 MiB checkpoint
    names = []
    for l in range(L):
        save_file({f"l{l}.w13": torch.randn(E, 2 * I, H), f"l{l}.w2": torch.randn(E, H, I)},
                  tmp_path / f"part{l}.safetensors")
        names.append(dict(w13=f"l{l}.w13", w2=f"l{l}.w2"))
    gc.collect()
    files = [tmp_path / f"part{l}.safetensors" for l in range(L)]
    file_bytes = sum(os.path.getsize(f) for f in files)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss0 = proc_status("VmRSS") * 1024
    with WeightStreamer("cpu") as s:
        s.load_safetensors(files, names, progress=False)
        peak = proc_status("VmHWM") * 1024
        largest_tensor = E * 2 * I * H * 4
        growth = peak - rss0
        assert s.host_bytes == L * (E * 2 * I * H + E * H * I) * 4
        # near the store plus one tensor; mapping without dropping pages would add the whole file
        assert growth < s.host_bytes + largest_tensor + (24 << 20), (growth, s.host_bytes, file_bytes)
        for l in range(L):
            a, _ = s.acquire(l)
            s.release(l)


# ---------------------------------------------------------------- torch.compile and opcheck

def _moe_ish(x, w13, w2):
    inter = w13.shape[1] // 2
    h = torch.einsum("th,eih->tei", x, w13)
    h = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    return x + 0.01 * torch.einsum("tei,ehi->th", h, w2)


@pytest.mark.parametrize("mode", MODES)
def test_ops_under_torch_compile_fullgraph(mode):
    layers = [make_layer(3, 8, 16) for _ in range(4)]
    s = WeightStreamer("cpu", slots=2, prefetch_depth=1, mode=mode)
    for w in layers:
        s.add_layer(*w)

    def forward(x):
        for i in range(4):
            w13, w2 = s.acquire(i, after=[x])
            x = _moe_ish(x, w13, w2)
            s.release(i, after=[x])
        return x

    def reference(x):
        for w13, w2 in layers:
            x = _moe_ish(x, w13, w2)
        return x

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True)
    x = torch.randn(5, 16)
    for n in range(1, 4):
        torch.testing.assert_close(compiled(x), reference(x))
        st = s.stats()
        assert [l["acquires"] for l in st["layers"]] == [n] * 4  # the ops ran, none was dropped
    for i in range(4):  # every layer was released by the compiled graph
        s.acquire(i)
        s.release(i)
    s.close()


def test_prefetch_with_unused_result_is_kept_under_compile():
    layers = [make_layer(2, 4, 8) for _ in range(3)]
    with WeightStreamer("cpu", slots=3, prefetch_depth=0) as s:
        for w in layers:
            s.add_layer(*w)

        def f(x):
            s.prefetch(2)
            return x * 2

        torch._dynamo.reset()
        torch.compile(f, fullgraph=True)(torch.randn(3))
        assert s.stats()["layers"][2]["copies_issued"] == 1


def test_opcheck_streamer_ops():
    layers = [make_layer(2, 4, 8) for _ in range(2)]
    with WeightStreamer("cpu", slots=2) as s:
        for w in layers:
            s.add_layer(*w)
        torch.library.opcheck(torch.ops.moe_swap_testing.streamer_host_copy.default, (s.handle, 1))
        # acquire/release change the streamer's state, so each check gets a fresh acquire/release pair;
        # opcheck's schema check: outputs alias no input and no other output, nothing is mutated.
        for util in ("test_schema", "test_faketensor"):
            torch.library.opcheck(torch.ops.moe_swap.streamer_acquire.default, (s.handle, 0, []), test_utils=util)
            torch.ops.moe_swap.streamer_release(s.handle, 0, [])


# ---------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_round_trip_and_views_live_on_the_gpu(mode):
    layers = [make_layer(4, 32, 64, torch.bfloat16) for _ in range(5)]
    with WeightStreamer("cuda", slots=2, prefetch_depth=1, mode=mode, trace=True) as s:
        for w in layers:
            s.add_layer(*w)
        for _ in range(3):
            for i, (w13, w2) in enumerate(layers):
                a, b = s.acquire(i)
                assert a.is_cuda and b.is_cuda
                out = (a.float().sum() + b.float().sum()).item()
                assert out == pytest.approx(w13.float().sum().item() + w2.float().sum().item(), rel=1e-3)
                assert torch.equal(a.cpu(), w13) and torch.equal(b.cpu(), w2)
                s.release(i)
        st = s.stats()
        assert st["untimed_spans"] == 0
        assert all(l["waits_timed"] == (3 if mode != "uva" else 0) for l in st["layers"])


@requires_cuda
def test_cuda_200_cycles_leave_pinned_device_and_resident_memory():
    def cycle():
        with WeightStreamer("cuda", slots=2) as s:
            for _ in range(3):
                s.add_layer(torch.randn(4, 64, 256), torch.randn(4, 256, 32))
            for i in range(3):
                s.acquire(i)
                s.release(i)
    for _ in range(5):
        cycle()
    torch.cuda.synchronize()
    gc.collect()
    dev0, rss0 = torch.cuda.memory_allocated(), proc_status("VmRSS")
    for _ in range(200):
        cycle()
    torch.cuda.synchronize()
    gc.collect()
    assert torch.cuda.memory_allocated() == dev0
    assert live_counts() == {"streamers": 0, "host_bytes": 0, "host_blocks": 0}
    assert proc_status("VmRSS") - rss0 < 32 * 1024


@requires_cuda
def test_cuda_copy_fault_and_exhaustion():
    layers = [make_layer(2, 16, 32) for _ in range(3)]
    with set_hooks(WeightStreamer("cuda", slots=2), fail_copy_at=1) as s:
        for w in layers:
            s.add_layer(*w)
        s.acquire(0)
        s.release(0)
        with pytest.raises(RuntimeError, match="injected copy fault"):
            s.acquire(1)
        a, _ = s.acquire(1)
        assert torch.equal(a.cpu(), layers[1][0])
        s.acquire(2)
        with pytest.raises(RuntimeError, match="exhausted"):
            s.acquire(0)
        s.release(1)
        s.release(2)


# ---- layers with biases and ungated experts: the biases stay with the caller, whole ----

def streamed_options_layer(gated, E=6, I=20, H=24, dtype=torch.float32):
    """A layer of nemotron_h-like (ungated relu2) or gpt-oss-like (gated swiglu_clamp) experts with biases."""
    w13 = (torch.randn(E, (2 if gated else 1) * I, H) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I) / I**0.5).to(dtype)
    b13 = (torch.randn(E, w13.shape[1]) / 2).to(dtype)
    b2 = (torch.randn(E, H) / 2).to(dtype)
    options = dict(activation="relu2" if not gated else "swiglu_clamp", w13_bias=b13, w2_bias=b2, gated=gated,
                   swiglu_alpha=1.702, swiglu_limit=1.2)
    return w13, w2, options


@pytest.mark.parametrize("policy", ["full", "on_demand", "auto"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated_relu2", "gated_swiglu_clamp"])
def test_streamed_layers_with_biases_equal_the_reference(policy, gated):
    layers = [streamed_options_layer(gated) for _ in range(3)]
    w13, w2, _ = layers[0]
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    kwargs = {} if policy == "full" else dict(policy=policy, cache_bytes=8 * expert_bytes)  # fewer than 3 layers' 18
    with WeightStreamer("cpu", slots=2, **kwargs) as s:
        for a, b, _ in layers:
            s.add_layer(a, b)
        assert s.host_bytes == sum(a.nbytes + b.nbytes for a, b, _ in layers)  # no bias in the store
        for step in range(4):
            for layer, (a, b, options) in enumerate(layers):
                tokens = (1, 5, 33, 2)[step]
                x = torch.randn(tokens, 24)
                weights, ids = topk_route(torch.randn(tokens, 6), 2, renormalize=True)
                if policy == "full":
                    held13, held2 = s.acquire(layer)
                    assert held13.shape == a.shape
                    out = fused_moe(x, held13, held2, weights, ids, **options)
                    s.release(layer, [out])
                else:
                    out = s.moe(layer, x, weights, ids, **{k: v for k, v in options.items() if k != "activation"},
                                activation=options["activation"])
                expected = reference.fused_moe(x, a, b, weights, ids, **options)
                torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_streamed_moe_checks_the_biases_it_passes_on():
    w13, w2, options = streamed_options_layer(False)
    with WeightStreamer("cpu", slots=2, policy="on_demand") as s:
        s.add_layer(w13, w2)
        weights, ids = topk_route(torch.randn(3, 6), 2)
        with pytest.raises(RuntimeError, match=r"w2_bias must have shape \[6, 24\]"):
            s.moe(0, torch.randn(3, 24), weights, ids, activation="relu2", gated=False, w2_bias=torch.zeros(6, 23))
        with pytest.raises(RuntimeError, match=r"w2.size\(2\) must equal I = w13.size\(1\) / 2 \(gated=True\) = 10"):
            s.moe(0, torch.randn(3, 24), weights, ids)  # an ungated layer called as a gated one
        # the step was released: the next one works
        out = s.moe(0, torch.randn(3, 24), weights, ids, activation="relu2", gated=False)
        assert out.shape == (3, 24)


@pytest.mark.parametrize("mode", ["full", "sync", "uva"])
def test_moe_is_one_op_per_step_under_policy_full(mode):
    """moe() under policy full: acquire, fused_moe on the layer's views, release, in one op (eager and
    compiled); a guess at the next layer's experts is refused (the ring prefetches by its own schedule)."""
    layers = [make_layer(4, 8, 16) for _ in range(3)]
    with WeightStreamer("cpu", slots=2, prefetch_depth=1, mode=mode) as s:
        for w in layers:
            s.add_layer(*w)

        def forward(x, weights, ids):
            for i in range(3):
                x = torch.tanh(s.moe(i, x, weights, ids))
            return x

        x = torch.randn(5, 16)
        weights, ids = topk_route(torch.randn(5, 4), 2, renormalize=True)
        expected = x
        for w13, w2 in layers:
            expected = torch.tanh(fused_moe(expected, w13, w2, weights, ids))
        for _ in range(2):  # the second pass finds its first layer prefetched by the first's wrap-around
            torch.testing.assert_close(forward(x, weights, ids), expected)
        torch.testing.assert_close(torch.compile(forward, fullgraph=True)(x, weights, ids), expected)
        assert all(l["acquires"] >= 3 for l in s.stats()["layers"])
        with pytest.raises(RuntimeError, match="only policies on_demand and auto predict"):
            s.moe(0, x, weights, ids, next_layer=1, next_ids=ids)
        a, _ = s.acquire(0)  # the refused step left nothing held
        s.release(0)
