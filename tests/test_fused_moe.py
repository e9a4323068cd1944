"""fused_moe against the pure-torch oracle (moe_swap.reference), opcheck, torch.compile, bad inputs."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_swap
from moe_swap import reference
from conftest import DEVICES, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
# Every activation fused_moe has, and the (activation, gated) pairs it accepts (the clamped ones are gated only).
ALL_ACTIVATIONS = list(moe_swap.ops.FUSED_MOE_ACTIVATIONS)
GATED_ONLY = ("swiglu_clamp", "silu_clamp")
ACTIVATION_GATING = [(a, g) for a in ALL_ACTIVATIONS for g in (True, False) if g or a not in GATED_ONLY]
# (H, I), including sizes that are not multiples of 8 (and not of the 16-lane vector width).
SHAPES = [(16, 24), (72, 40), (100, 52)]
EXPERTS_AND_TOPK = [(e, k) for e in (1, 8, 64) for k in (1, 2, 6, 8) if k <= e]
# Outputs are O(1); bfloat16/float16 differ from the oracle by an ulp of the rounded intermediate.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def make_moe(num_tokens, hidden, inter, num_experts, top_k, dtype, device, *, num_global=None, id_dtype=torch.int32,
             gated=True):
    """Random inputs; with num_global, ids are global and an expert_map holds a random subset of them."""
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(num_experts, (2 if gated else 1) * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    id_space = num_global or num_experts
    ids = torch.stack([torch.randperm(id_space)[:top_k] for _ in range(num_tokens)]) if num_tokens else \
        torch.zeros(0, top_k, dtype=torch.long)
    ids = ids.to(device=device, dtype=id_dtype)
    weights = torch.rand(num_tokens, top_k, device=device)
    expert_map = None
    if num_global is not None:
        expert_map = torch.full((num_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(num_global)[:num_experts]] = torch.randperm(num_experts, dtype=torch.int32)
        expert_map = expert_map.to(device)
    return x, w13, w2, weights, ids, expert_map


def make_biases(w13, w2, expert_map, device):
    """Random w13_bias [E_global, w13 rows] and w2_bias [E_global, H], in the weights' dtype."""
    num_global = expert_map.numel() if expert_map is not None else w13.shape[0]
    w13_bias = (0.5 * torch.randn(num_global, w13.shape[1], device=device)).to(w13.dtype)
    w2_bias = (0.5 * torch.randn(num_global, w2.shape[1], device=device)).to(w2.dtype)
    return w13_bias, w2_bias


def assert_matches_reference(args, activation="silu", **options):
    x = args[0]
    out = moe_swap.fused_moe(*args, activation=activation, **options)
    on_cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    expected = reference.fused_moe(*(a.cpu() if a is not None else None for a in args), activation=activation,
                                   **on_cpu)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    atol, rtol = TOLERANCE[x.dtype]
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=atol, rtol=rtol)
    return out


def _grid():
    # Every T x (E, k) x dtype; the shape, map, activation and id dtype cycle so each value occurs.
    cases = []
    for i, (t, (e, k), dtype) in enumerate(itertools.product((0, 1, 7, 64, 333), EXPERTS_AND_TOPK, DTYPES)):
        hidden, inter = SHAPES[i % len(SHAPES)]
        mapped = (i // 3) % 2 == 1
        activation = ACTIVATIONS[(i // 2) % len(ACTIVATIONS)]
        id_dtype = torch.int32 if i % 4 else torch.int64
        cases.append(pytest.param(t, hidden, inter, e, k, dtype, mapped, activation, id_dtype,
                                  id=f"T{t}-H{hidden}-I{inter}-E{e}-k{k}-{str(dtype)[6:]}-{'map' if mapped else 'nomap'}"
                                     f"-{activation}-{str(id_dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,hidden,inter,e,k,dtype,mapped,activation,id_dtype", _grid())
def test_grid_against_reference(device, t, hidden, inter, e, k, dtype, mapped, activation, id_dtype):
    # With a map, ids range over twice as many global experts, about half of them not held here.
    num_global = 2 * e + 1 if mapped else None
    args = make_moe(t, hidden, inter, e, k, dtype, device, num_global=num_global, id_dtype=id_dtype)
    assert_matches_reference(args, activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mapped", [False, True], ids=["nomap", "map"])
def test_each_activation_and_dtype(device, dtype, activation, mapped):
    # A skewed batch: experts with few tokens (tiled path) and one with more than the CPU's
    # small-batch limit of 128 (GEMM path).
    args = list(make_moe(160, 72, 52, 8, 2, dtype, device, num_global=12 if mapped else None))
    ids = args[4]
    ids[:140, 0] = ids[0, 0]  # one hot expert in slot 0 for most tokens
    ids[:140, 1] = torch.where(ids[:140, 1] == ids[0, 0], ids[0, 1], ids[:140, 1])
    assert (ids[:, 0] != ids[:, 1]).all()
    assert_matches_reference(args, activation)


def _options_grid():
    # Every activation x gated/ungated x bias/no bias x expert_map x dtype x T; the shape cycles.
    cases = []
    products = itertools.product(ACTIVATION_GATING, (False, True), (False, True), DTYPES, (0, 1, 7, 64, 333))
    for i, ((activation, gated), bias, mapped, dtype, t) in enumerate(products):
        hidden, inter = SHAPES[i % len(SHAPES)]
        cases.append(pytest.param(t, hidden, inter, dtype, mapped, activation, gated, bias,
                                  id=f"{activation}-{'gated' if gated else 'ungated'}-{'bias' if bias else 'nobias'}"
                                     f"-{'map' if mapped else 'nomap'}-{str(dtype)[6:]}-T{t}-H{hidden}-I{inter}"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,hidden,inter,dtype,mapped,activation,gated,bias", _options_grid())
def test_activations_gating_biases_against_reference(device, t, hidden, inter, dtype, mapped, activation, gated, bias):
    e, k = 8, 3
    args = make_moe(t, hidden, inter, e, k, dtype, device, num_global=2 * e + 1 if mapped else None, gated=gated)
    options = dict(gated=gated)
    if bias:
        options["w13_bias"], options["w2_bias"] = make_biases(args[1], args[2], args[5], device)
    if activation in GATED_ONLY:
        # gpt-oss's constants, with a limit the random gate/up values cross
        options.update(swiglu_alpha=1.702, swiglu_limit=0.9)
    assert_matches_reference(args, activation, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["w13_bias", "w2_bias"])
def test_one_bias_alone(device, which):
    args = make_moe(70, 40, 36, 6, 2, torch.float32, device, num_global=9)
    biases = dict(zip(["w13_bias", "w2_bias"], make_biases(args[1], args[2], args[5], device)))
    out = assert_matches_reference(args, "gelu", **{which: biases[which]})
    assert not torch.allclose(out, moe_swap.fused_moe(*args, activation="gelu"), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_biases_follow_the_global_id_not_the_slot(device, gated):
    """A cache holding some experts' weights in other slots (with a map) gives what all the weights
    give without one: the biases stay whole and global, indexed by topk_ids before the map."""
    num_global, held = 10, [7, 2, 5]
    x, w13, w2, w, ids, _ = make_moe(40, 48, 20, num_global, 2, torch.float32, device, gated=gated)
    ids = torch.stack([torch.tensor(held)[torch.randperm(3)[:2]] for _ in range(40)]).int().to(device)
    w13_bias, w2_bias = make_biases(w13, w2, None, device)
    full = moe_swap.fused_moe(x, w13, w2, w, ids, activation="relu2", w13_bias=w13_bias, w2_bias=w2_bias, gated=gated)
    slots = torch.tensor([2, 0, 1])  # held[i] lives in slot slots[i]
    pool13, pool2 = torch.empty_like(w13[:3]), torch.empty_like(w2[:3])
    pool13[slots], pool2[slots] = w13[held], w2[held]
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    expert_map[held] = slots.int()
    cached = moe_swap.fused_moe(x, pool13, pool2, w, ids, expert_map.to(device), "relu2", w13_bias, w2_bias, gated)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_two_global_ids_in_one_slot_take_their_own_biases(device):
    x, w13, w2, w, ids, _ = make_moe(12, 24, 16, 1, 2, torch.float32, device, num_global=2)
    expert_map = torch.zeros(2, dtype=torch.int32, device=device)  # both global experts share slot 0
    ids = torch.tensor([[0, 1]] * 12, dtype=torch.int32, device=device)
    w13_bias, w2_bias = make_biases(w13, w2, expert_map, device)
    assert_matches_reference((x, w13, w2, w, ids, expert_map), "silu", w13_bias=w13_bias, w2_bias=w2_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_large_values_go_through_like_the_reference(device, dtype):
    # A NaN in expert 0's bias reaches the outputs of exactly the tokens routed to it (clamp, relu
    # and min/max must not drop it); +-30 in the others' biases lie beyond the clamp limit.
    for activation, gated in ACTIVATION_GATING:
        x, w13, w2, w, ids, _ = make_moe(24, 16, 16, 4, 2, dtype, device, gated=gated)
        w13_bias, w2_bias = make_biases(w13, w2, None, device)
        w13_bias[0, 0] = float("nan")
        if gated:
            w13_bias[0, 16] = float("nan")  # the up part too
        w13_bias[1:, 1], w13_bias[1:, -1] = 30.0, -30.0
        out = moe_swap.fused_moe(x, w13, w2, w, ids, None, activation, w13_bias, w2_bias, gated)
        expected = reference.fused_moe(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu(), None, activation,
                                       w13_bias.cpu(), w2_bias.cpu(), gated)
        routed_to_0 = (ids == 0).any(1).cpu()
        assert routed_to_0.any() and not routed_to_0.all()
        assert torch.equal(expected.isnan().all(1), routed_to_0)
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(out.cpu().float(), expected.float(), atol=atol * 30, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"{activation} gated={gated}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_ungated_with_zero_intermediate_is_the_routed_w2_bias(device):
    x, w13, w2, w, ids, _ = make_moe(5, 16, 0, 3, 2, torch.float32, device, gated=False)
    _, w2_bias = make_biases(w13, w2, None, device)
    out = moe_swap.fused_moe(x, w13, w2, w, ids, None, "relu2", None, w2_bias, False)
    torch.testing.assert_close(out, (w[..., None] * w2_bias[ids.long()]).sum(1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_expert_in_a_row_counts_twice(device):
    x, w13, w2, w, ids, _ = make_moe(5, 40, 24, 4, 3, torch.float32, device)
    ids[:] = 2
    out = assert_matches_reference((x, w13, w2, w, ids, None))
    single = moe_swap.fused_moe(x, w13, w2, w.sum(1, keepdim=True), ids[:, :1])
    torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_map_with_no_expert_held_gives_zeros(device):
    x, w13, w2, w, ids, _ = make_moe(9, 32, 16, 3, 2, torch.bfloat16, device, num_global=6)
    expert_map = torch.full((6,), -1, dtype=torch.int32, device=device)
    out = moe_swap.fused_moe(x, w13, w2, w, ids, expert_map)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, w13, w2, w, ids, _ = make_moe(0, 24, 16, 4, 2, torch.float16, device)
    out = moe_swap.fused_moe(x, w13, w2, w, ids)
    assert out.shape == (0, 24) and out.dtype == torch.float16 and out.device == x.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    t, hidden, inter, e, k = 21, 48, 40, 6, 2
    x, w13, w2, w, ids, expert_map = make_moe(t, hidden, inter, e, k, dtype, device, num_global=9)
    # Same values, stored transposed, strided or sliced.
    x_nc = torch.empty(hidden, t, dtype=dtype, device=device).t().copy_(x)
    w13_nc = w13.transpose(1, 2).contiguous().transpose(1, 2)
    w2_nc = torch.empty(e, hidden, 2 * inter, dtype=dtype, device=device)[:, :, ::2].copy_(w2)
    w_nc = torch.empty(k, t, device=device).t().copy_(w)
    ids_nc = torch.empty(t, 2 * k, dtype=ids.dtype, device=device)[:, ::2].copy_(ids)
    map_nc = torch.empty(2 * 9, dtype=torch.int32, device=device)[::2].copy_(expert_map)
    for a in (x_nc, w13_nc, w2_nc, w_nc, ids_nc, map_nc):
        assert not a.is_contiguous()
    out = assert_matches_reference((x_nc, w13_nc, w2_nc, w_nc, ids_nc, map_nc))
    torch.testing.assert_close(out, moe_swap.fused_moe(x, w13, w2, w, ids, expert_map), atol=0, rtol=0)


# ---- opcheck and torch.compile ----

def _opcheck_samples(device):
    yield make_moe(7, 24, 20, 4, 2, torch.float32, device)
    yield make_moe(3, 40, 16, 8, 8, torch.bfloat16, device, id_dtype=torch.int64)
    yield make_moe(33, 16, 24, 4, 2, torch.float16, device, num_global=7)
    yield make_moe(0, 16, 8, 2, 1, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        # All of opcheck's checks: schema, autograd registration, fake tensor, AOT dispatch.
        torch.library.opcheck(torch.ops.moe_swap.fused_moe.default, args, {"activation": "gelu"})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,gated", ACTIVATION_GATING)
def test_opcheck_biases_and_gating(device, activation, gated):
    args = make_moe(9, 24, 20, 4, 2, torch.bfloat16, device, num_global=7, gated=gated)
    w13_bias, w2_bias = make_biases(args[1], args[2], args[5], device)
    torch.library.opcheck(torch.ops.moe_swap.fused_moe.default, args,
                          dict(activation=activation, w13_bias=w13_bias, w2_bias=w2_bias, gated=gated,
                               swiglu_alpha=1.5, swiglu_limit=0.8))


class TinyMoE(torch.nn.Module):
    """A small MoE block: a router picking top-k with softmax, then the experts through fused_moe."""

    def __init__(self, hidden=32, inter=48, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Linear(hidden, num_experts, bias=False)
        self.w13 = torch.nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, hidden, inter) / inter**0.5)

    def forward(self, x):
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        return moe_swap.fused_moe(x, self.w13, self.w2, weights / weights.sum(-1, keepdim=True), ids.int())


class TinyBiasedMoE(TinyMoE):
    """TinyMoE with gpt-oss's expert options (biases, clamped SwiGLU) or ungated relu2 experts."""

    def __init__(self, gated, hidden=32, inter=48, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.gated = gated
        if not gated:
            self.w13 = torch.nn.Parameter(self.w13.data[:, :inter].clone())
        self.w13_bias = torch.nn.Parameter(torch.randn(num_experts, self.w13.shape[1]) / 4)
        self.w2_bias = torch.nn.Parameter(torch.randn(num_experts, hidden) / 4)

    def forward(self, x):
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        return moe_swap.fused_moe(x, self.w13, self.w2, weights, ids.int(),
                                  activation="swiglu_clamp" if self.gated else "relu2",
                                  w13_bias=self.w13_bias, w2_bias=self.w2_bias, gated=self.gated, swiglu_limit=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu_clamp", "relu2_ungated"])
def test_torch_compile_fullgraph_with_biases(device, gated):
    torch._dynamo.reset()
    model = TinyBiasedMoE(gated).to(device)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for t in (5, 17):
            x = torch.randn(t, 32, device=device)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyMoE().to(device)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for t in (5, 17):
            x = torch.randn(t, 32, device=device)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# ---- the other CPU code paths, in a fresh process (the choices are read once per process) ----

def _run_in_subprocess(script, env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


_MIXED_EXPERTS_SCRIPT = """
    import torch, moe_swap
    from moe_swap import reference
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for act in ("silu", "gelu", "gelu_tanh"):
            t, h, i, e, k = 40, 37, 29, 8, 3
            x = torch.randn(t, h).to(dtype)
            w13 = (torch.randn(e, 2 * i, h) / h ** 0.5).to(dtype)
            w2 = (torch.randn(e, h, i) / i ** 0.5).to(dtype)
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int()
            w = torch.rand(t, k)
            ids[:30, 0] = 5  # one expert with many tokens, the rest with few
            ids[:30, 1:] = torch.where(ids[:30, 1:] == 5, 6, ids[:30, 1:])
            ids[:30, 2] = torch.where(ids[:30, 2] == 6, 7, ids[:30, 2])
            ids[:30, 1] = torch.where(ids[:30, 1] == ids[:30, 2], 4, ids[:30, 1])
            out = moe_swap.fused_moe(x, w13, w2, w, ids, activation=act)
            ref = reference.fused_moe(x, w13, w2, w, ids, activation=act)
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for act, gated in [(a, g) for a in moe_swap.ops.FUSED_MOE_ACTIVATIONS for g in (True, False)
                           if g or a not in ("swiglu_clamp", "silu_clamp")]:
            for t in (1, 7, 150):
                h, i, e, k, e_global = 37, 29, 6, 2, 9
                x = torch.randn(t, h).to(dtype)
                w13 = (torch.randn(e, (2 if gated else 1) * i, h) / h ** 0.5).to(dtype)
                w2 = (torch.randn(e, h, i) / i ** 0.5).to(dtype)
                b13 = (torch.randn(e_global, w13.shape[1]) / 2).to(dtype)
                b2 = (torch.randn(e_global, h) / 2).to(dtype)
                expert_map = torch.full((e_global,), -1, dtype=torch.int32)
                expert_map[torch.randperm(e_global)[:e]] = torch.randperm(e, dtype=torch.int32)
                ids = torch.stack([torch.randperm(e_global)[:k] for _ in range(t)]).int()
                ids[: t * 4 // 5, 0] = int((expert_map >= 0).nonzero()[0])  # one expert with most tokens
                ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % e_global, ids[:, 1])
                w = torch.rand(t, k)
                options = dict(activation=act, w13_bias=b13, w2_bias=b2, gated=gated, swiglu_limit=1.1)
                out = moe_swap.fused_moe(x, w13, w2, w, ids, expert_map, **options)
                ref = reference.fused_moe(x, w13, w2, w, ids, expert_map, **options)
                torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    print("ok")
"""


@pytest.mark.parametrize("env", [{"MOE_SWAP_CPU_SMALL_BATCH": "0"}, {"MOE_SWAP_CPU_SMALL_BATCH": "100000"}],
                         ids=["all-experts-gemm", "all-experts-tiled"])
def test_cpu_paths_in_subprocess(env):
    result = _run_in_subprocess(_MIXED_EXPERTS_SCRIPT, env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# Every build of the CPU inner loops (csrc/moe/fused_moe_cpu_kernels.h), best first.
CPU_KERNEL_BUILDS = ["avx512_bf16", "avx512", "avx2", "generic"]

# Tiles of every size: depths that are not multiples of 8/16/32 lanes (and shorter than one vector),
# row counts that leave 1-3 rows after the 4-row blocks, token counts that leave each remainder of the
# token groups (1-6), up to the expert sizes where the tiles stop and the GEMM starts.
_EVERY_TILE_SCRIPT = """
    import torch, moe_swap
    from moe_swap import reference
    assert moe_swap.ops.cpu_kernel_build() == {build!r}, moe_swap.ops.cpu_kernel_build()
    torch.manual_seed(0)
    tolerance = {{torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}}
    cases = [(1, 5, 3, 4, 2), (2, 37, 29, 8, 3), (3, 64, 48, 4, 2), (5, 100, 52, 8, 3), (6, 33, 70, 3, 3),
             (7, 8, 16, 2, 1), (13, 130, 41, 4, 4), (40, 1030, 29, 8, 3), (200, 72, 40, 2, 2)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, (t, h, i, e, k) in enumerate(cases):
            act = moe_swap.ops.FUSED_MOE_ACTIVATIONS[n % len(moe_swap.ops.FUSED_MOE_ACTIVATIONS)]
            gated = act in ("swiglu_clamp", "silu_clamp") or n % 2 == 0  # odd cases: ungated (w13 holds up only)
            x = torch.randn(t, h).to(dtype)
            w13 = (torch.randn(e, (2 if gated else 1) * i, h) / h ** 0.5).to(dtype)
            w2 = (torch.randn(e, h, i) / i ** 0.5).to(dtype)
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int()
            w = torch.rand(t, k)
            options = dict(activation=act, gated=gated)
            if n % 3 == 0:
                options.update(w13_bias=torch.randn(e, w13.shape[1]).to(dtype), w2_bias=torch.randn(e, h).to(dtype))
            out = moe_swap.fused_moe(x, w13, w2, w, ids, **options)
            ref = reference.fused_moe(x, w13, w2, w, ids, **options)
            tol = tolerance[dtype]
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"{{dtype}} T={{t}} H={{h}} I={{i}} E={{e}} k={{k}} {{act}} "
                                                     f"gated={{gated}}: {{m}}")
    print("ok")
"""


@pytest.mark.parametrize("build", CPU_KERNEL_BUILDS)
def test_cpu_kernel_build_matches_reference(build):
    # Each build this CPU runs, forced, against the oracle on every tile shape and through both paths.
    if build not in moe_swap.ops.cpu_kernel_builds():
        pytest.skip(f"this CPU does not run the {build} build (it runs {moe_swap.ops.cpu_kernel_builds()})")
    env = {"MOE_SWAP_CPU_KERNELS": build}
    result = _run_in_subprocess(_EVERY_TILE_SCRIPT.format(build=build), env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    for path in ({}, {"MOE_SWAP_CPU_SMALL_BATCH": "0"}):  # the build's tiles and activations; its GEMM path
        result = _run_in_subprocess(_MIXED_EXPERTS_SCRIPT, {**env, **path})
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (path, result.stderr[-3000:])


def test_cpu_kernel_builds_known_and_best_first():
    runnable = moe_swap.ops.cpu_kernel_builds()
    assert runnable and runnable[-1] == "generic" and set(runnable) <= set(CPU_KERNEL_BUILDS)
    assert runnable == [b for b in CPU_KERNEL_BUILDS if b in runnable]
    if not os.environ.get("MOE_SWAP_CPU_KERNELS"):
        assert moe_swap.ops.cpu_kernel_build() == runnable[0]


@pytest.mark.parametrize("build", CPU_KERNEL_BUILDS[:-1] + ["sse9"])
def test_forcing_a_build_the_cpu_lacks_raises(build):
    if build in moe_swap.ops.cpu_kernel_builds():
        pytest.skip(f"this CPU runs the {build} build")
    script = """
        import torch, moe_swap
        x = torch.randn(2, 8)
        args = (x, torch.randn(2, 8, 8), torch.randn(2, 8, 4), torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32))
        for _ in range(2):  # the second call raises too: a failed choice is not remembered as made
            try:
                moe_swap.fused_moe(*args)
            except ValueError as e:
                print("raised:", e)
            else:
                print("no error")
    """
    result = _run_in_subprocess(script, {"MOE_SWAP_CPU_KERNELS": build})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith(f"raised: MOE_SWAP_CPU_KERNELS={build}") for line in lines), lines
    expected = "this CPU lacks the instructions" if build in CPU_KERNEL_BUILDS else "is not a kernel build"
    assert all(expected in line for line in lines), lines


# ---- bad inputs: every check names the argument ----

def _good(device="cpu", mapped=True):
    return dict(zip(["hidden_states", "w13", "w2", "topk_weights", "topk_ids", "expert_map"],
                    make_moe(4, 16, 8, 3, 2, torch.float32, device, num_global=5 if mapped else None)))


BAD_INPUTS = [
    ("hidden_3d", lambda a: a.update(hidden_states=a["hidden_states"][None]), "hidden_states must be 2-D"),
    ("hidden_int", lambda a: a.update(hidden_states=a["hidden_states"].int()), "hidden_states must be float32"),
    ("w13_2d", lambda a: a.update(w13=a["w13"][0]), "w13 must be 3-D"),
    ("w2_2d", lambda a: a.update(w2=a["w2"][0]), "w2 must be 3-D"),
    ("w13_H", lambda a: a.update(w13=a["w13"][:, :, :-1]), r"w13.size\(2\) must equal H"),
    ("w13_odd", lambda a: a.update(w13=a["w13"][:, :-1]), r"w13.size\(1\) must be even"),
    ("w2_E", lambda a: a.update(w2=a["w2"][:-1]), r"w2.size\(0\) must equal E"),
    ("w2_H", lambda a: a.update(w2=a["w2"][:, :-1]), r"w2.size\(1\) must equal H"),
    ("w2_I", lambda a: a.update(w2=a["w2"][:, :, :-1]), r"w2.size\(2\) must equal I"),
    ("w13_dtype", lambda a: a.update(w13=a["w13"].half()), "w13 must have the dtype of hidden_states"),
    ("w2_dtype", lambda a: a.update(w2=a["w2"].bfloat16()), "w2 must have the dtype of hidden_states"),
    ("weights_1d", lambda a: a.update(topk_weights=a["topk_weights"][0]), "topk_weights must be 2-D"),
    ("weights_T", lambda a: a.update(topk_weights=a["topk_weights"][:-1]), r"topk_weights.size\(0\) must equal T"),
    ("weights_dtype", lambda a: a.update(topk_weights=a["topk_weights"].half()), "topk_weights must be float32"),
    ("ids_1d", lambda a: a.update(topk_ids=a["topk_ids"][0]), "topk_ids must be 2-D"),
    ("ids_shape", lambda a: a.update(topk_ids=a["topk_ids"][:, :1]), "topk_ids must have the shape of topk_weights"),
    ("ids_dtype", lambda a: a.update(topk_ids=a["topk_ids"].float()), "topk_ids must be int32 or int64"),
    ("map_2d", lambda a: a.update(expert_map=a["expert_map"][None]), "expert_map must be 1-D"),
    ("map_dtype", lambda a: a.update(expert_map=a["expert_map"].long()), "expert_map must be int32"),
    # the biases are [E_global, ...]: here expert_map has 5 entries, w13 holds 3 experts of I = 8
    ("w13_bias_1d", lambda a: a.update(w13_bias=torch.zeros(16, device=a["w13"].device)),
     r"w13_bias must be 2-D \[E_global, 2I\], got 1-D"),
    ("w13_bias_local_rows", lambda a: a.update(w13_bias=torch.zeros(3, 16, device=a["w13"].device)),
     r"w13_bias must have shape \[5, 16\] \(\[E_global, 2I\]; E_global = expert_map.size\(0\).*got \[3, 16\]"),
    ("w13_bias_cols", lambda a: a.update(w13_bias=torch.zeros(5, 8, device=a["w13"].device)),
     r"w13_bias must have shape \[5, 16\]"),
    ("w13_bias_dtype", lambda a: a.update(w13_bias=torch.zeros(5, 16, dtype=torch.half, device=a["w13"].device)),
     "w13_bias must have the dtype of hidden_states"),
    ("w2_bias_cols", lambda a: a.update(w2_bias=torch.zeros(5, 15, device=a["w13"].device)),
     r"w2_bias must have shape \[5, 16\] \(\[E_global, H\]"),
    ("w2_bias_3d", lambda a: a.update(w2_bias=torch.zeros(5, 16, 1, device=a["w13"].device)),
     r"w2_bias must be 2-D \[E_global, H\]"),
    ("w2_bias_dtype", lambda a: a.update(w2_bias=torch.zeros(5, 16, dtype=torch.bfloat16, device=a["w13"].device)),
     "w2_bias must have the dtype of hidden_states"),
    ("ungated_w2_I", lambda a: a.update(gated=False), r"w2.size\(2\) must equal I = w13.size\(1\) \(gated=False\) = 16"),
]

BAD_OPTIONS = [
    # (name, options, message): errors in the values of the non-tensor options are ValueErrors
    ("swiglu_ungated", dict(activation="swiglu_clamp", gated=False),
     r"activation 'swiglu_clamp' needs gate rows: it requires gated=True, got gated=False"),
    ("silu_clamp_ungated", dict(activation="silu_clamp", gated=False),
     r"activation 'silu_clamp' needs gate rows: it requires gated=True, got gated=False"),
    ("alpha_nan", dict(activation="swiglu_clamp", swiglu_alpha=float("nan")), "swiglu_alpha must be finite, got nan"),
    ("alpha_inf", dict(swiglu_alpha=float("inf")), "swiglu_alpha must be finite, got inf"),
    ("limit_zero", dict(activation="swiglu_clamp", swiglu_limit=0.0), r"swiglu_limit must be finite and > 0, got 0"),
    ("limit_negative", dict(swiglu_limit=-1.0), r"swiglu_limit must be finite and > 0, got -1"),
    ("limit_inf", dict(activation="swiglu_clamp", swiglu_limit=float("inf")),
     "swiglu_limit must be finite and > 0, got inf"),
    ("relu_is_not_relu2", dict(activation="relu"),
     "activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', got 'relu'"),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("name,options,message", BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_bad_options_are_value_errors(device, name, options, message):
    # on "meta" the fake kernel answers: it must refuse what the kernels refuse
    args = {key: value.to(device) for key, value in _good("cpu").items()}
    if not options.get("gated", True):
        args["w13"] = args["w13"][:, :8]  # up rows only: the layout is right, the activation is not
    with pytest.raises(ValueError, match=message):
        moe_swap.fused_moe(**args, **options)


@pytest.mark.parametrize("name", ["w13_bias_local_rows", "w2_bias_cols", "w13_bias_dtype", "ungated_w2_I",
                                  "w13_odd"])
def test_bad_layouts_raise_on_meta_too(name):
    mutate = {b[0]: b[1] for b in BAD_INPUTS}[name]
    args = {key: value.to("meta") for key, value in _good("cpu").items()}
    mutate(args)
    args = {key: value.to("meta") if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(RuntimeError):
        moe_swap.fused_moe(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(device, name, mutate, message):
    args = _good(device)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        moe_swap.fused_moe(**args)


def test_an_empty_expert_map_maps_no_id():
    """An expert_map with no entries is a map that holds no global id, not "no map": every id is out of
    range (the CPU kernel took the empty tensor's null data pointer for "no map" and used the ids as
    direct indices into w13, computing what the CUDA kernel skips)."""
    args = _good("cpu", mapped=False)
    args["expert_map"] = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"topk_ids\[0, 0\] = \d+ is out of range: expected a global expert id "
                                           r"in \[0, 0\) \(expert_map has 0 entries\)"):
        moe_swap.fused_moe(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_activation_is_a_value_error(device):
    with pytest.raises(ValueError, match="activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', "
                                         "got 'relu'"):
        moe_swap.fused_moe(**_good(device), activation="relu")


@requires_cuda
@pytest.mark.parametrize("name", ["hidden_states", "w13", "w2", "topk_weights", "topk_ids", "expert_map"])
def test_mixed_devices_name_the_argument(name):
    args = _good("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} must be on the device of hidden_states|"
                                           f"hidden_states must be on the device"):
        moe_swap.fused_moe(**args)


OUT_OF_RANGE = [
    # (name, set up the bad value, message on CPU)
    ("id_eq_E", lambda a: a["topk_ids"].__setitem__((2, 1), 3),
     r"topk_ids\[2, 1\] = 3 is out of range: expected an expert id in \[0, 3\)"),
    ("id_negative", lambda a: a["topk_ids"].__setitem__((0, 0), -1),
     r"topk_ids\[0, 0\] = -1 is out of range"),
    ("global_id_eq_E_global", lambda a: a["topk_ids"].__setitem__((3, 0), 5),
     r"topk_ids\[3, 0\] = 5 is out of range: expected a global expert id in \[0, 5\)"),
    ("map_entry_eq_E", lambda a: a["expert_map"].__setitem__(int(a["topk_ids"][1, 1]), 3),
     r"expert_map\[\d\] = 3 is out of range: expected -1 \(not held here\) or an index in \[0, 3\)"),
    ("map_entry_below_minus_one", lambda a: a["expert_map"].__setitem__(int(a["topk_ids"][0, 0]), -2),
     r"expert_map\[\d\] = -2 is out of range"),
]


@pytest.mark.parametrize("name,corrupt,message", OUT_OF_RANGE, ids=[o[0] for o in OUT_OF_RANGE])
def test_out_of_range_ids_raise_on_cpu(name, corrupt, message):
    args = _good("cpu", mapped=name.startswith(("global", "map")))
    corrupt(args)
    with pytest.raises(RuntimeError, match=message):
        moe_swap.fused_moe(**args)


@requires_cuda
@pytest.mark.parametrize("name,corrupt,message", OUT_OF_RANGE, ids=[o[0] for o in OUT_OF_RANGE])
def test_out_of_range_ids_on_cuda_skip_or_raise_in_debug(name, corrupt, message, debug_off):
    args = _good("cpu", mapped=name.startswith(("global", "map")))
    corrupt(args)
    cuda_args = {key: None if value is None else value.cuda() for key, value in args.items()}
    # Without debug: an invalid pair is skipped (contributes nothing), never read out of bounds.
    out = moe_swap.fused_moe(**cuda_args)
    torch.cuda.synchronize()
    ids, expert_map, num_local = args["topk_ids"].long(), args["expert_map"], args["w13"].shape[0]
    if expert_map is None:
        valid = (ids >= 0) & (ids < num_local)
    else:
        valid = (ids >= 0) & (ids < expert_map.numel())
        local = expert_map[ids.clamp(0, expert_map.numel() - 1)].long()
        valid &= (local >= -1) & (local < num_local)
        expert_map = torch.where((expert_map >= -1) & (expert_map < num_local), expert_map, -1).int()
    # The oracle on the valid pairs only: invalid ones get weight 0 on a valid id.
    expected = reference.fused_moe(args["hidden_states"], args["w13"], args["w2"], args["topk_weights"] * valid,
                                   torch.where(valid, ids, 0).int(), expert_map)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    moe_swap.set_debug(True)
    try:
        with pytest.raises(RuntimeError):
            moe_swap.fused_moe(**cuda_args)
            torch.cuda.synchronize()
    finally:
        moe_swap.set_debug(False)
