"""moe_swap::topk_route against the pure-torch reference and the transformers routers themselves."""

import itertools

import pytest
import torch
import transformers
from conftest import DEVICES, HAS_CUDA, requires_cuda

import moe_swap
from moe_swap import reference

LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF = float("inf")
NAN = float("nan")


def random_logits(num_tokens, num_experts, dtype=torch.float32, device="cpu"):
    return (torch.randn(num_tokens, num_experts) * 2).to(dtype).to(device)


def check_well_formed(weights, ids, num_tokens, top_k, num_experts, device):
    assert weights.shape == (num_tokens, top_k) and ids.shape == (num_tokens, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.device.type == ids.device.type == torch.device(device).type
    ids = ids.cpu()
    assert bool(((ids >= 0) & (ids < num_experts)).all()), "expert id out of range"
    for row in ids.tolist():
        assert len(set(row)) == len(row), f"duplicate expert in {row}"


def assert_matches_reference(logits, top_k, **kwargs):
    """Runs the op and the reference on the same input; ids must be identical, weights close."""
    weights, ids = moe_swap.topk_route(logits, top_k, **kwargs)
    check_well_formed(weights, ids, logits.shape[0], top_k, logits.shape[1], logits.device)
    ref_kwargs = dict(kwargs)
    if ref_kwargs.get("correction_bias") is not None:
        ref_kwargs["correction_bias"] = ref_kwargs["correction_bias"].cpu()
    ref_weights, ref_ids = reference.topk_route(logits.cpu(), top_k, **ref_kwargs)
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=2e-5, atol=1e-6, equal_nan=True)
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Grid against the reference

GRID = [
    (num_tokens, num_experts, top_k)
    for num_tokens, num_experts, top_k in itertools.product([0, 1, 7, 64, 333], [1, 8, 64], [1, 2, 6, 8])
    if top_k <= num_experts
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", GRID)
def test_matches_reference(device, dtype, scoring, renormalize, num_tokens, num_experts, top_k):
    logits = random_logits(num_tokens, num_experts, dtype, device)
    scale = float(torch.empty(()).uniform_(0.5, 3.0))
    assert_matches_reference(logits, top_k, scoring=scoring, renormalize=renormalize,
                             routed_scaling_factor=scale)


# (E, num_expert_group, topk_group, top_k): DeepSeek-V3's and V2's shapes, and small groups.
GROUP_CASES = [
    (256, 8, 4, 8),
    (256, 8, 3, 6),
    (256, 8, 1, 2),
    (64, 4, 2, 1),
    (64, 4, 2, 2),
    (64, 4, 2, 6),
    (64, 4, 2, 8),
    (64, 64, 8, 8),  # one expert per group
    (8, 8, 8, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64, 333])
@pytest.mark.parametrize("num_experts,num_expert_group,topk_group,top_k", GROUP_CASES)
def test_group_limited_matches_reference(device, dtype, scoring, with_bias, num_tokens, num_experts,
                                         num_expert_group, topk_group, top_k):
    logits = random_logits(num_tokens, num_experts, dtype, device)
    bias = (torch.randn(num_experts) * 0.1).to(device) if with_bias else None
    assert_matches_reference(logits, top_k, scoring=scoring, renormalize=with_bias,
                             num_expert_group=num_expert_group, topk_group=topk_group,
                             correction_bias=bias, routed_scaling_factor=2.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_dtype", LOGIT_DTYPES, ids=str)
def test_bias_dtypes_and_bias_without_groups(device, bias_dtype):
    logits = random_logits(33, 64, device=device)
    bias = (torch.randn(64) * 0.2).to(bias_dtype).to(device)
    assert_matches_reference(logits, 6, scoring="sigmoid", renormalize=True, correction_bias=bias)
    # the bias only selects: the weights are the unbiased scores
    weights, ids = moe_swap.topk_route(logits, 6, scoring="sigmoid", correction_bias=bias)
    torch.testing.assert_close(weights, torch.sigmoid(logits.float()).gather(1, ids.long()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "num_experts,top_k,num_expert_group,topk_group,scoring",
    [
        (512, 32, 1, 1, "softmax"),     # k at the CUDA kernel's limit
        (1000, 17, 1, 1, "sigmoid"),    # E not a multiple of the warp size
        (1000, 20, 250, 100, "sigmoid"),  # more groups than lanes in a warp
        (4096, 8, 64, 8, "softmax"),
    ],
)
def test_large_expert_counts(device, num_experts, top_k, num_expert_group, topk_group, scoring):
    logits = random_logits(19, num_experts, device=device)
    bias = (torch.randn(num_experts) * 0.05).to(device) if scoring == "sigmoid" else None
    assert_matches_reference(logits, top_k, scoring=scoring, renormalize=True, num_expert_group=num_expert_group,
                             topk_group=topk_group, correction_bias=bias)


def test_cpu_supports_top_k_beyond_32():
    logits = random_logits(5, 96)
    assert_matches_reference(logits, 40, renormalize=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits(device):
    wide = random_logits(64, 40, device=device)
    for logits in (wide.t(), wide[::3, 1:33], wide.t()[::2]):  # transposed, sliced, both
        assert not logits.is_contiguous()
        expected = moe_swap.topk_route(logits.contiguous(), 4, renormalize=True)
        got = assert_matches_reference(logits, 4, renormalize=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    weights, ids = moe_swap.topk_route(torch.empty(0, 64, device=device), 6, num_expert_group=8, topk_group=2)
    check_well_formed(weights, ids, 0, 6, 64, device)


# ---------------------------------------------------------------------------------------------
# NaN, infinities and ties


def special_rows(num_experts):
    """Rows mixing NaN and +-inf into random logits, and rows made only of them."""
    rows = []
    for fill in (NAN, INF, -INF):
        for count in (1, 3, num_experts):
            row = torch.randn(num_experts)
            row[torch.randperm(num_experts)[:count]] = fill
            rows.append(row)
    mixed = torch.randn(num_experts)
    mixed[:num_experts // 4] = NAN
    mixed[num_experts // 4: num_experts // 2] = -INF
    rows.append(mixed)
    rows.append(torch.full((num_experts,), NAN))
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_nan_and_inf_rows(device, dtype, scoring, grouped):
    logits = special_rows(32).to(dtype).to(device)
    kwargs = dict(scoring=scoring, renormalize=True)
    if grouped:
        bias = (torch.randn(32) * 0.1).to(device)
        kwargs.update(num_expert_group=4, topk_group=2, correction_bias=bias)
    assert_matches_reference(logits, 6, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_ranks_below_everything(device):
    logits = torch.tensor([[NAN, -INF, NAN, 0.5, -INF], [NAN, NAN, NAN, NAN, -INF]], device=device)
    _, ids = moe_swap.topk_route(logits, 5, scoring="sigmoid")
    # sigmoid: 0.5 first, then the two -inf (score 0) by id, then the NaN by id
    assert ids.tolist() == [[3, 1, 4, 0, 2], [4, 0, 1, 2, 3]]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_lower_expert_id(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [-0.0, 0.0, -0.0, 5.0, 0.0, -1.0]], device=device)
    weights, ids = moe_swap.topk_route(logits, 4, scoring="sigmoid")
    assert ids.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [3, 0, 1, 2]]
    torch.testing.assert_close(weights[1], torch.full((4,), 0.5, device=device))
    assert_matches_reference(logits, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_ties_take_the_lower_group(device, with_bias):
    # four groups of two with identical scores: groups 0 and 1 must win
    logits = torch.tensor([[0.3, 0.1] * 4, [0.1, 0.3] * 4], device=device)
    bias = torch.zeros(8, device=device) if with_bias else None
    _, ids = moe_swap.topk_route(logits, 3, scoring="sigmoid", num_expert_group=4, topk_group=2,
                                 correction_bias=bias)
    assert ids.tolist() == [[0, 2, 1], [1, 3, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_excluded_groups_are_never_chosen(device):
    # expert 0 is the best, but its group loses on the sum of its top two, so it must not be chosen
    logits = torch.tensor([[4.0, -9.0, 1.0, 1.0, -30.0, -30.0]], device=device)
    _, ids = moe_swap.topk_route(logits, 2, scoring="sigmoid", num_expert_group=3, topk_group=1,
                                 correction_bias=torch.zeros(6, device=device))
    # group sums: 0 -> 0.982+0.0001, 1 -> 0.731*2 = 1.46: group 1 wins, so expert 0 is excluded
    assert sorted(ids[0].tolist()) == [2, 3]


# ---------------------------------------------------------------------------------------------
# Against the transformers routers


def _tie_tolerant_same_sets(ids, hf_ids, selection_scores):
    """Same expert set per token; where they differ, the swapped experts must tie at the cut-off."""
    for t, (ours, theirs) in enumerate(zip(ids.tolist(), hf_ids.tolist())):
        if set(ours) == set(theirs):
            continue
        cutoff = min(float(selection_scores[t, e]) for e in ours)
        for e in set(ours) ^ set(theirs):
            assert float(selection_scores[t, e]) == cutoff, (t, sorted(ours), sorted(theirs))


def _by_expert(weights, ids):
    """Weights reordered by expert id, so results in different orders compare."""
    order = ids.long().argsort(dim=-1)
    return weights.gather(1, order), ids.long().gather(1, order)


def _router_class(module, name):
    # transformers 4.x routes inline in the sparse block (no router module): there, routing parity is
    # covered by the whole-block tests in test_hf_parity.py and the model tests in test_offload.py.
    cls = getattr(module, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name} (a 5.x router module)")
    return cls


def _hf_router(family, num_experts, top_k, dtype, **extra):
    hidden = 48
    extra = dict(extra, num_attention_heads=4, num_key_value_heads=4)
    if family == "mixtral":
        config = transformers.MixtralConfig(hidden_size=hidden, num_local_experts=num_experts, num_experts_per_tok=top_k,
                                            **extra)
        module = _router_class(transformers.models.mixtral.modeling_mixtral, "MixtralTopKRouter")(config)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k,
                                             **extra)
        module = _router_class(transformers.models.qwen2_moe.modeling_qwen2_moe, "Qwen2MoeTopKRouter")(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k,
                                             **extra)
        module = _router_class(transformers.models.qwen3_moe.modeling_qwen3_moe, "Qwen3MoeTopKRouter")(config)
    elif family == "olmoe":
        config = transformers.OlmoeConfig(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k, **extra)
        module = _router_class(transformers.models.olmoe.modeling_olmoe, "OlmoeTopKRouter")(config)
    elif family == "deepseek_v2":
        config = transformers.DeepseekV2Config(hidden_size=hidden, n_routed_experts=num_experts,
                                               num_experts_per_tok=top_k, **extra)
        module = _router_class(transformers.models.deepseek_v2.modeling_deepseek_v2, "DeepseekV2TopkRouter")(config)
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(hidden_size=hidden, n_routed_experts=num_experts,
                                               num_experts_per_tok=top_k, **extra)
        module = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
        with torch.no_grad():
            module.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.1)
    else:
        raise ValueError(family)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
    return module.to(dtype), hidden


# (family, E, top_k, config extras, topk_route arguments)
HF_FAMILIES = [
    ("mixtral", 8, 2, {}, dict(renormalize=True)),
    ("qwen2_moe", 60, 4, dict(norm_topk_prob=False), {}),
    ("qwen3_moe", 128, 8, dict(norm_topk_prob=True), dict(renormalize=True)),
    ("olmoe", 64, 8, {}, {}),
    ("deepseek_v2", 64, 6, dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0), {}),
    ("deepseek_v2", 160, 6,
     dict(topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0),
     dict(num_expert_group=8, topk_group=3, routed_scaling_factor=16.0)),
    ("deepseek_v3", 256, 8, dict(n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5),
     dict(scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family,num_experts,top_k,config_extra,route_kwargs", HF_FAMILIES,
                         ids=[f"{f[0]}-E{f[1]}" for f in HF_FAMILIES])
def test_matches_transformers_router(device, dtype, family, num_experts, top_k, config_extra, route_kwargs):
    router, hidden = _hf_router(family, num_experts, top_k, dtype, **config_extra)
    hidden_states = torch.randn(2, 37, hidden).to(dtype)
    with torch.no_grad():
        routed = router(hidden_states)
        if len(routed) == 3:
            router_logits, hf_weights, hf_ids = routed
        else:  # transformers 4.x DeepSeek-V3 router: (ids, weights); its logits are a float32 linear
            hf_ids, hf_weights = routed
            router_logits = torch.nn.functional.linear(hidden_states.reshape(-1, hidden).float(),
                                                       router.weight.float())
    kwargs = dict(route_kwargs)
    if family == "deepseek_v3":
        kwargs["correction_bias"] = router.e_score_correction_bias.to(device)
    weights, ids = moe_swap.topk_route(router_logits.to(device), top_k, **kwargs)
    weights, ids = weights.cpu(), ids.cpu()
    check_well_formed(weights, ids, router_logits.shape[0], top_k, num_experts, "cpu")

    scores = (router_logits.float().sigmoid() if family == "deepseek_v3"
              else router_logits.float().softmax(dim=-1))
    selection = scores + kwargs["correction_bias"].cpu().float() if family == "deepseek_v3" else scores
    _tie_tolerant_same_sets(ids, hf_ids, selection)
    same_set = torch.tensor([set(a) == set(b) for a, b in zip(ids.tolist(), hf_ids.tolist())])
    assert bool(same_set.float().mean() > 0.9), "sets differ beyond exact ties"
    ours, _ = _by_expert(weights[same_set], ids[same_set])
    theirs, _ = _by_expert(hf_weights[same_set].float(), hf_ids[same_set])
    if hf_weights.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    else:  # Qwen and OLMoE round their weights to the model dtype; ours stay float32
        torch.testing.assert_close(ours.to(hf_weights.dtype).float(), theirs, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The op as torch sees it: opcheck, compile, CUDA graphs, registration


def opcheck_samples(device):
    logits = random_logits(13, 64, device=device)
    bias = (torch.randn(64) * 0.1).to(device)
    yield (logits, 6), {}
    yield (logits.to(torch.bfloat16), 8), dict(scoring="sigmoid", renormalize=True, num_expert_group=8,
                                                topk_group=4, correction_bias=bias, routed_scaling_factor=2.5)
    yield (logits.to(torch.float16).t().contiguous().t(), 2), dict(renormalize=True)  # non-contiguous
    yield (random_logits(0, 8, device=device), 2), {}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args, kwargs in opcheck_samples(device):
        torch.library.opcheck(torch.ops.moe_swap.topk_route.default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def route(logits, bias):
        return moe_swap.topk_route(logits, 8, scoring="sigmoid", renormalize=True, num_expert_group=8,
                                   topk_group=4, correction_bias=bias, routed_scaling_factor=2.5)

    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    bias = (torch.randn(64) * 0.1).to(device)
    for num_tokens in (5, 17):
        logits = random_logits(num_tokens, 64, device=device)
        torch.testing.assert_close(compiled(logits, bias), route(logits, bias), rtol=0, atol=0)


@requires_cuda
def test_cuda_graph_capture():
    logits = random_logits(64, 256, device="cuda")
    bias = (torch.randn(256) * 0.1).cuda()
    kwargs = dict(scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4, correction_bias=bias)
    moe_swap.topk_route(logits, 8, **kwargs)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = moe_swap.topk_route(logits, 8, **kwargs)
    fresh = random_logits(64, 256, device="cuda")
    logits.copy_(fresh)
    graph.replay()
    expected = moe_swap.topk_route(fresh, 8, **kwargs)
    torch.testing.assert_close((weights, ids), expected, rtol=0, atol=0)


@requires_cuda
def test_cuda_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_swap::topk_route", "CUDA")


@requires_cuda
def test_cuda_matches_cpu_kernel_and_respects_the_current_device():
    logits = random_logits(333, 256)
    bias = torch.randn(256) * 0.1
    kwargs = dict(scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)
    cpu = moe_swap.topk_route(logits, 8, correction_bias=bias, **kwargs)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    gpu = moe_swap.topk_route(logits.to(device), 8, correction_bias=bias.to(device), **kwargs)
    assert gpu[0].device == device
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=0)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: every check, and the message names the argument


def _bad_inputs(device):
    logits = random_logits(4, 8, device=device)
    return [
        ("1-D logits", (logits[0], 2), {}, "router_logits must be a 2-D"),
        ("3-D logits", (logits[None], 2), {}, "router_logits must be a 2-D"),
        ("int logits", (logits.to(torch.int32), 2), {}, "router_logits must be float32, bfloat16 or float16"),
        ("double logits", (logits.double(), 2), {}, "router_logits must be float32, bfloat16 or float16"),
        ("top_k 0", (logits, 0), {}, r"top_k must be in \[1, E\]"),
        ("top_k > E", (logits, 9), {}, r"top_k must be in \[1, E\].*got 9"),
        ("scoring", (logits, 2), dict(scoring="relu"), "scoring must be .*got \"relu\""),
        ("num_expert_group 0", (logits, 2), dict(num_expert_group=0), "num_expert_group must be >= 1"),
        ("num_expert_group not dividing E", (logits, 2), dict(num_expert_group=3),
         "num_expert_group must .*divide E.*got 3"),
        ("topk_group 0", (logits, 2), dict(num_expert_group=4, topk_group=0), r"topk_group must be in \[1, "),
        ("topk_group > groups", (logits, 2), dict(num_expert_group=4, topk_group=5),
         r"topk_group must be in \[1, num_expert_group = 4\], got 5"),
        ("top_k beyond kept groups", (logits, 5), dict(num_expert_group=4, topk_group=2),
         "top_k must be <= topk_group \\* E / num_expert_group = 2 \\* 8 / 4 = 4.*got 5"),
        ("bias shape", (logits, 2), dict(correction_bias=torch.randn(9, device=device)),
         r"correction_bias must be a 1-D tensor of shape \[E\] = \[8\], got shape \[9\]"),
        ("bias 2-D", (logits, 2), dict(correction_bias=torch.randn(1, 8, device=device)),
         "correction_bias must be a 1-D tensor"),
        ("bias dtype", (logits, 2), dict(correction_bias=torch.ones(8, dtype=torch.int64, device=device)),
         "correction_bias must be float32, bfloat16 or float16"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(15))
def test_bad_input_names_the_argument(device, case):
    name, args, kwargs, message = _bad_inputs(device)[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        moe_swap.topk_route(*args, **kwargs)


def test_bad_input_cases_are_all_run():
    assert len(_bad_inputs("cpu")) == 15


@pytest.mark.parametrize("device", DEVICES)
def test_bias_on_another_device(device):
    logits = random_logits(4, 8, device=device)
    # on a CPU-only machine the meta device stands in for "another device" (the fake kernel checks it)
    other = "cpu" if device == "cuda" else "meta"
    with pytest.raises((RuntimeError, ValueError), match="correction_bias must be on the same device"):
        moe_swap.topk_route(logits, 2, correction_bias=torch.randn(8, device=other))


@requires_cuda
def test_cuda_top_k_limit():
    with pytest.raises(RuntimeError, match="top_k must be <= 32 on CUDA"):
        moe_swap.topk_route(random_logits(3, 64, device="cuda"), 33)
    with pytest.raises(RuntimeError, match="num_expert_group must be <= 6144 on CUDA"):
        moe_swap.topk_route(random_logits(3, 8192, device="cuda"), 2, num_expert_group=8192, topk_group=2)


@pytest.mark.skipif(HAS_CUDA, reason="checks that CPU-only machines still run everything above")
def test_devices_is_cpu_only_here():
    assert DEVICES == ["cpu"]
