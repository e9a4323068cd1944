"""fused_moe's CUDA kernels against the pure-torch reference (skipped without a GPU).

Covers both paths (decode for T*k <= 64 pairs, grouped GEMM above, with and without the bf16
at::_grouped_mm path), every dtype and activation, odd H/I, expert_map with -1 entries, invalid ids
(skipped, or an error in debug mode), CUDA graph capture and replay, a non-default stream, and the
absence of host-device synchronisation.
"""

import pytest
import torch

from conftest import requires_cuda
from moe_swap import ops, reference

pytestmark = requires_cuda

DECODE_MAX_PAIRS = 64  # kDecodeMaxPairs in csrc/moe/moe_decode.cuh

# max |out - ref| allowed, relative to max |ref|: bf16 keeps 8 bits, and the intermediate is rounded to
# the dtype on both sides, so a one-ulp difference there moves the output by about 2^-8 of a term.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_problem(T, H, I, E, k, dtype, num_global=None, device="cuda"):
    """Random inputs scaled so that gate/up and the output are O(1); ids distinct per token."""
    x = torch.randn(T, H, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
    pool = num_global or E
    ids = torch.rand(T, pool, device=device).argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.softmax(torch.randn(T, k, device=device), dim=-1)
    return x, w13, w2, weights, ids


def expected(x, w13, w2, weights, ids, expert_map=None, activation="silu"):
    # ids/weights/map on the CPU: the reference indexes with Python ints, so no sync per pair.
    return reference.fused_moe(x, w13, w2, weights.cpu(), ids.cpu(), None if expert_map is None else expert_map.cpu(),
                               activation)


def assert_close_rel(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = (out.float() - ref.float()).abs().max() / scale
    assert torch.isfinite(out.float()).all()
    assert err <= REL_TOL[dtype], f"max relative error {err:.3g} > {REL_TOL[dtype]:.3g}"


SHAPES = [
    # (T, H, I, E, k): decode path (T*k <= 64) ...
    (1, 256, 128, 8, 2),
    (7, 512, 256, 64, 8),     # 56 pairs, many experts with one token each
    (3, 129, 77, 4, 2),       # H, I not multiples of 8: scalar loads
    (64, 128, 96, 1, 1),      # 64 pairs on a single expert: several token groups per weight row
    # ... and grouped GEMM path
    (64, 256, 128, 8, 2),
    (333, 100, 36, 8, 2),     # odd sizes, partial tiles everywhere
    (333, 1024, 704, 64, 6),
    (512, 2048, 1408, 8, 2),  # a prefill-sized layer
    (40, 72, 24, 16, 4),      # 160 pairs, some experts empty
    (65, 64, 32, 4, 1),       # one pair past the decode limit
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
@pytest.mark.parametrize("vendor", ["vendor_on", "vendor_off"])
def test_matches_reference(shape, dtype, vendor, monkeypatch):
    if vendor == "vendor_off" and dtype != torch.bfloat16:
        pytest.skip("the vendor switch only matters for bf16")
    if vendor == "vendor_off":
        monkeypatch.setenv("MOE_SWAP_VENDOR_GEMM", "0")
    T, H, I, E, k = shape
    x, w13, w2, weights, ids = make_problem(T, H, I, E, k, dtype)
    out = ops.fused_moe(x, w13, w2, weights, ids)
    assert_close_rel(out, expected(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("T", [5, 200])  # decode, grouped
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations(activation, T, dtype):
    x, w13, w2, weights, ids = make_problem(T, 192, 80, 8, 2, dtype)
    out = ops.fused_moe(x, w13, w2, weights, ids, activation=activation)
    assert_close_rel(out, expected(x, w13, w2, weights, ids, activation=activation), dtype)


@pytest.mark.parametrize("T", [3, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_map_with_unheld_experts(T, dtype):
    num_global, E = 16, 6
    x, w13, w2, weights, ids = make_problem(T, 256, 128, E, 4, dtype, num_global=num_global)
    held = torch.randperm(num_global)[:E]
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    expert_map[held] = torch.arange(E, dtype=torch.int32)
    expert_map = expert_map.cuda()
    out = ops.fused_moe(x, w13, w2, weights, ids, expert_map)
    assert_close_rel(out, expected(x, w13, w2, weights, ids, expert_map), dtype)


def test_all_pairs_unheld_gives_zeros():
    x, w13, w2, weights, ids = make_problem(100, 64, 32, 4, 2, torch.float32, num_global=8)
    expert_map = torch.full((8,), -1, dtype=torch.int32, device=x.device)
    out = ops.fused_moe(x, w13, w2, weights, ids, expert_map)
    assert torch.equal(out, torch.zeros_like(out))


def _with_invalid_ids(T, use_map):
    """A problem where a few pairs have ids that are out of range (or map outside [-1, E))."""
    E = 8
    x, w13, w2, weights, ids = make_problem(T, 128, 64, E, 2, torch.float32, num_global=12 if use_map else None)
    expert_map = None
    if use_map:
        expert_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, -1, 99, -5], dtype=torch.int32, device=x.device)
    bad = ids.clone()
    bad[0, 0] = 1000 if not use_map else 10  # out of range, or mapped to 99
    bad[-1, 1] = -3 if not use_map else 11   # negative, or mapped to -5
    # What skipping means: those pairs contribute nothing.
    kept_weights = weights.clone()
    kept_weights[0, 0] = 0.0
    kept_weights[-1, 1] = 0.0
    kept_ids = bad.clone()
    kept_ids[0, 0] = 0
    kept_ids[-1, 1] = 0
    if use_map:  # random ids may also hit the invalid entries 10 and 11
        kept_weights = torch.where(bad >= 10, torch.zeros_like(weights), weights)
        kept_ids = torch.where(bad >= 10, torch.zeros_like(bad), bad)
    return x, w13, w2, weights, bad, expert_map, kept_weights, kept_ids


@pytest.mark.parametrize("use_map", [False, True], ids=["no_map", "map"])
@pytest.mark.parametrize("T", [4, 150])
def test_invalid_ids_are_skipped(T, use_map, debug_off):
    x, w13, w2, weights, bad, expert_map, kept_weights, kept_ids = _with_invalid_ids(T, use_map)
    out = ops.fused_moe(x, w13, w2, weights, bad, expert_map)
    torch.cuda.synchronize()  # a fault would surface here
    assert_close_rel(out, expected(x, w13, w2, kept_weights, kept_ids, expert_map), torch.float32)


@pytest.mark.parametrize("use_map", [False, True], ids=["no_map", "map"])
@pytest.mark.parametrize("T", [4, 150])
def test_invalid_ids_raise_in_debug_mode(T, use_map, debug_off):
    x, w13, w2, weights, bad, expert_map, _, _ = _with_invalid_ids(T, use_map)
    pattern = r"expert_map\[10\] = 99" if use_map else r"topk_ids\[0, 0\] = 1000"
    ops.set_debug(True)
    try:
        with pytest.raises(RuntimeError, match=pattern):
            ops.fused_moe(x, w13, w2, weights, bad, expert_map)
    finally:
        ops.set_debug(False)
    assert not ops.debug_enabled()


@pytest.mark.parametrize("T", [2, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay(T, dtype):
    x, w13, w2, weights, ids = make_problem(T, 256, 128, 8, 2, dtype)
    eager = ops.fused_moe(x, w13, w2, weights, ids)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as torch.cuda.graphs recommends
        ops.fused_moe(x, w13, w2, weights, ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.fused_moe(x, w13, w2, weights, ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # New routing and activations in the same buffers: the replay follows them.
    x2, _, _, weights2, ids2 = make_problem(T, 256, 128, 8, 2, dtype)
    x.copy_(x2)
    weights.copy_(weights2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.fused_moe(x, w13, w2, weights, ids))


@pytest.mark.parametrize("T", [3, 200])
def test_non_default_stream(T):
    x, w13, w2, weights, ids = make_problem(T, 256, 128, 8, 2, torch.bfloat16)
    on_default = ops.fused_moe(x, w13, w2, weights, ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_side = ops.fused_moe(x, w13, w2, weights, ids)
    stream.synchronize()
    assert torch.equal(on_side, on_default)


@pytest.mark.parametrize("T", [1, 64, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_device_sync(T, dtype):
    x, w13, w2, weights, ids = make_problem(T, 256, 128, 8, 2, dtype)
    expert_map = torch.arange(8, dtype=torch.int32, device=x.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.fused_moe(x, w13, w2, weights, ids, expert_map)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_close_rel(out, expected(x, w13, w2, weights, ids, expert_map), dtype)


@pytest.mark.parametrize("T", [5, 120])
def test_non_contiguous_inputs_and_int64_ids(T):
    x, w13, w2, weights, ids = make_problem(T, 96, 40, 8, 3, torch.float16)
    x_nc = x.t().contiguous().t()                                  # column-major [T, H]
    w13_nc = torch.cat([w13, w13], dim=2)[:, :, ::2]               # strided along H ...
    w13_nc.copy_(w13)                                              # ... holding w13's values
    w2_nc = w2.transpose(1, 2).contiguous().transpose(1, 2)
    weights_nc = weights.t().contiguous().t()
    ids_nc = ids.long().t().contiguous().t()
    assert not (x_nc.is_contiguous() or w13_nc.is_contiguous() or w2_nc.is_contiguous() or ids_nc.is_contiguous())
    out = ops.fused_moe(x_nc, w13_nc, w2_nc, weights_nc, ids_nc)
    assert out.is_contiguous()
    assert_close_rel(out, expected(x, w13, w2, weights, ids), torch.float16)


@pytest.mark.parametrize("T", [7, 300])
def test_deterministic(T):
    x, w13, w2, weights, ids = make_problem(T, 512, 256, 16, 4, torch.bfloat16)
    first = ops.fused_moe(x, w13, w2, weights, ids)
    for _ in range(3):
        assert torch.equal(ops.fused_moe(x, w13, w2, weights, ids), first)


def test_empty_batch():
    x, w13, w2, weights, ids = make_problem(0, 64, 32, 4, 2, torch.bfloat16)
    out = ops.fused_moe(x, w13, w2, weights, ids)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16 and out.is_cuda


def test_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_swap::fused_moe", "CUDA")


def test_mismatched_devices_rejected():
    x, w13, w2, weights, ids = make_problem(4, 64, 32, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="on the device of hidden_states"):
        ops.fused_moe(x, w13, w2, weights.cpu(), ids)


def test_opcheck():
    for T in (3, 100):
        x, w13, w2, weights, ids = make_problem(T, 64, 32, 4, 2, torch.float32)
        torch.library.opcheck(torch.ops.moe_swap.fused_moe.default, (x, w13, w2, weights, ids, None, "silu"))


# ---- biases, ungated experts, relu2 and swiglu_clamp: every path (decode, grouped GEMM with and
# without tensor cores' bf16 vendor GEMM), against the reference ----

OPTION_SHAPES = [
    (1, 256, 128, 8, 2),   # decode
    (3, 129, 77, 4, 2),    # decode, scalar loads
    (200, 128, 96, 8, 2),  # grouped GEMM; bf16: the vendor path (H, I multiples of 8)
    (333, 100, 36, 8, 2),  # grouped GEMM, partial tiles, never the vendor path (H % 8 != 0)
]
OPTION_ACTIVATIONS = [(a, g) for a in ops.FUSED_MOE_ACTIVATIONS for g in (True, False)
                      if g or a not in ("swiglu_clamp", "silu_clamp")]


def make_options(w13, w2, num_global, dtype, bias):
    if not bias:
        return {}
    return dict(w13_bias=(torch.randn(num_global, w13.shape[1], device="cuda") / 2).to(dtype),
                w2_bias=(torch.randn(num_global, w2.shape[1], device="cuda") / 2).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
@pytest.mark.parametrize("activation,gated", OPTION_ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mapped", [False, True], ids=["nomap", "map"])
@pytest.mark.parametrize("vendor", ["vendor_on", "vendor_off"])
def test_options_match_reference(shape, dtype, activation, gated, bias, mapped, vendor, monkeypatch):
    if vendor == "vendor_off" and dtype != torch.bfloat16:
        pytest.skip("the vendor switch only matters for bf16")
    if vendor == "vendor_off":
        monkeypatch.setenv("MOE_SWAP_VENDOR_GEMM", "0")
    T, H, I, E, k = shape
    num_global = 2 * E + 1 if mapped else E
    x, w13, w2, weights, ids = make_problem(T, H, I, E, k, dtype, num_global=num_global)
    if not gated:
        w13 = w13[:, :I].contiguous()
    expert_map = None
    if mapped:
        expert_map = torch.full((num_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(num_global)[:E]] = torch.randperm(E, dtype=torch.int32)
        expert_map = expert_map.cuda()
    options = dict(activation=activation, gated=gated, swiglu_alpha=1.702, swiglu_limit=0.9,
                   **make_options(w13, w2, num_global, dtype, bias))
    out = ops.fused_moe(x, w13, w2, weights, ids, expert_map, **options)
    cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    ref = reference.fused_moe(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(),
                              None if expert_map is None else expert_map.cpu(), **cpu)
    assert_close_rel(out.cpu(), ref, dtype)


@pytest.mark.parametrize("T", [3, 200])
def test_options_with_int64_ids_and_graph_capture(T):
    # the biases read the int32 copy of int64 ids; the whole op stays capturable
    x, w13, w2, weights, ids = make_problem(T, 128, 64, 8, 2, torch.bfloat16)
    options = dict(activation="swiglu_clamp", **make_options(w13, w2, 8, torch.bfloat16, True))
    ids64 = ids.long()
    eager = ops.fused_moe(x, w13, w2, weights, ids64, **options)
    graph = torch.cuda.CUDAGraph()
    ops.fused_moe(x, w13, w2, weights, ids64, **options)  # warm up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = ops.fused_moe(x, w13, w2, weights, ids64, **options)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def test_ungated_zero_intermediate_is_the_routed_w2_bias():
    x, _, _, weights, ids = make_problem(6, 32, 8, 4, 2, torch.float32)
    w13, w2 = torch.randn(4, 0, 32, device="cuda"), torch.randn(4, 32, 0, device="cuda")
    w2_bias = torch.randn(4, 32, device="cuda")
    out = ops.fused_moe(x, w13, w2, weights, ids, None, "relu2", None, w2_bias, False)
    torch.testing.assert_close(out, (weights[..., None] * w2_bias[ids.long()]).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options,message", [
    ("w13_bias_on_cpu", dict(w13_bias=torch.zeros(4, 16)), "w13_bias must be on the device of hidden_states"),
    ("w2_bias_on_cpu", dict(w2_bias=torch.zeros(4, 16)), "w2_bias must be on the device of hidden_states"),
])
def test_biases_on_another_device_are_rejected(name, options, message):
    x, w13, w2, weights, ids = make_problem(3, 16, 8, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        ops.fused_moe(x, w13, w2, weights, ids, **options)


def test_opcheck_options():
    for gated, activation in ((True, "swiglu_clamp"), (False, "relu2")):
        x, w13, w2, weights, ids = make_problem(70, 64, 32, 4, 2, torch.bfloat16)
        if not gated:
            w13 = w13[:, :32].contiguous()
        options = dict(activation=activation, gated=gated, **make_options(w13, w2, 4, torch.bfloat16, True))
        torch.library.opcheck(torch.ops.moe_swap.fused_moe.default, (x, w13, w2, weights, ids), options)
