"""The same random weights in a real transformers MoE block and in topk_route + fused_moe give the same
output: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE (its shared expert and sigmoid gate done outside fused_moe).

Works with transformers 5.x (experts stored fused: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
and 4.x (experts as a ModuleList of MLPs with w1/w3/w2 or gate_proj/up_proj/down_proj).
"""

import pytest
import torch

import moe_swap
from conftest import DEVICES

transformers = pytest.importorskip("transformers")


def _mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=72, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)
    # Mixtral: softmax over all experts, top-2, renormalised.
    return MixtralSparseMoeBlock(config), config, dict(renormalize=True)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=52, num_experts=16, num_experts_per_tok=4,
                            norm_topk_prob=True)
    return Qwen3MoeSparseMoeBlock(config), config, dict(renormalize=True)


def _olmoe():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    config = OlmoeConfig(hidden_size=48, intermediate_size=24, num_experts=16, num_experts_per_tok=8,
                         norm_topk_prob=False)
    return OlmoeSparseMoeBlock(config), config, dict(renormalize=False)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    config = Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=36, num_experts=8, num_experts_per_tok=2,
                            shared_expert_intermediate_size=56, norm_topk_prob=False)
    return Qwen2MoeSparseMoeBlock(config), config, dict(renormalize=False)


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "qwen2_moe": _qwen2_moe}


def randomize_(module):
    """Fresh random weights, scaled by 1/sqrt(fan-in) (the last dim of every weight here); never zeros."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)


def _pick(module, *names):
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"{type(module).__name__} has none of {names}")


def expert_weights(experts, hidden_size):
    """(w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]) from a transformers experts module."""
    if hasattr(experts, "gate_up_proj"):  # transformers 5.x: fused 3-D parameters
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.shape[-1] != hidden_size:  # stored transposed: [E, H, 2I] and [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if not getattr(experts, "is_concatenated", True):  # interleaved gate0, up0, gate1, up1, ...
            gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        return gate_up.contiguous(), down.contiguous()
    # transformers 4.x: a ModuleList of per-expert MLPs (Mixtral: w1 gate, w3 up, w2 down).
    gate = [_pick(e, "w1", "gate_proj").weight for e in experts]
    up = [_pick(e, "w3", "up_proj").weight for e in experts]
    down = [_pick(e, "w2", "down_proj").weight for e in experts]
    return torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)]), torch.stack(down)


def router_weight(block):
    gate = block.gate
    return gate.weight  # both 4.x (nn.Linear) and 5.x (TopKRouter) keep it as `weight` [E, H]


def moe_swap_forward(block, config, routing, hidden):
    """The block's forward, with routing by topk_route and experts by fused_moe."""
    batch, seq, hidden_size = hidden.shape
    x = hidden.reshape(-1, hidden_size)
    logits = torch.nn.functional.linear(x, router_weight(block))
    top_k = config.num_experts_per_tok
    weights, ids = moe_swap.topk_route(logits, top_k, "softmax", **routing)
    w13, w2 = expert_weights(block.experts, hidden_size)
    out = moe_swap.fused_moe(x, w13, w2, weights, ids, activation=_activation(config))
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: a dense shared expert behind a sigmoid gate
        shared = block.shared_expert(x) * torch.sigmoid(block.shared_expert_gate(x))
        out = out + shared
    return out.reshape(batch, seq, hidden_size), ids


def _activation(config):
    return {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}[config.hidden_act]


def hf_routing_ids(block, x):
    """The expert ids transformers' own router picks, as a set per token."""
    gate_out = block.gate(x)
    if isinstance(gate_out, tuple):  # 5.x TopKRouter: (logits, weights, indices)
        return gate_out[2]
    # 4.x: the gate is a plain Linear returning logits; the block picks top-k of the softmax.
    return torch.topk(torch.softmax(gate_out.float(), dim=-1), block.top_k, dim=-1).indices


def boundary_tie(block, x, top_k):
    """Per token: whether the k-th best router score equals the (k+1)-th."""
    scores = torch.softmax(torch.nn.functional.linear(x, router_weight(block)).float(), dim=-1)
    if top_k >= scores.shape[-1]:
        return torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    best = scores.topk(top_k + 1, dim=-1).values
    return best[:, top_k - 1] == best[:, top_k]


def _block_output(out):
    """transformers 4.x sparse blocks return (hidden_states, router_logits); 5.x the hidden states."""
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_matches_transformers(model, dtype, device):
    block, config, routing = MODELS[model]()
    config._experts_implementation = "eager"  # 5.x: the model's own per-expert loop (4.x ignores it)
    randomize_(block)
    block = block.to(device)
    block.eval()
    hidden = torch.randn(3, 11, config.hidden_size, device=device)
    with torch.no_grad():
        expected_f32 = _block_output(block(hidden))
        block_dt = block.to(dtype)
        hidden_dt = hidden.to(dtype)
        expected = _block_output(block_dt(hidden_dt))
        ours, ids = moe_swap_forward(block_dt, config, routing, hidden_dt)
        hf_ids = hf_routing_ids(block_dt, hidden_dt.reshape(-1, config.hidden_size))
    assert ours.dtype == dtype and ours.shape == hidden.shape
    # In bfloat16 two router logits can be equal; where the k-th and (k+1)-th scores tie, either pick is
    # right and the two may differ, so those tokens are left out (and must be few).
    decided = ~boundary_tie(block_dt, hidden_dt.reshape(-1, config.hidden_size), config.num_experts_per_tok)
    assert decided.float().mean() >= 0.8
    # Same experts picked as the model's own router.
    assert torch.equal(ids[decided].long().sort(-1).values.cpu(), hf_ids[decided].long().sort(-1).values.cpu())
    ours, expected = ours.reshape(-1, config.hidden_size)[decided], expected.reshape(-1, config.hidden_size)[decided]
    expected_f32 = expected_f32.reshape(-1, config.hidden_size)[decided]
    if dtype == torch.float32:
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    else:
        # transformers rounds to bfloat16 after every step (and sums experts in bfloat16); fused_moe
        # accumulates in float32. Both must be close to the float32 result, and ours no further from it.
        scale = expected_f32.abs().max().item()
        torch.testing.assert_close(ours.float(), expected.float(), atol=3e-2 * scale, rtol=3e-2)
        err_ours = (ours.float() - expected_f32).abs().mean().item()
        err_hf = (expected.float() - expected_f32).abs().mean().item()
        assert err_ours <= 1.25 * err_hf, (err_ours, err_hf)


def test_weight_extraction_of_a_module_list_layout():
    """The transformers 4.x layout: per-expert MLPs, w1 = gate, w3 = up, w2 = down."""
    hidden, inter, num_experts = 24, 16, 3

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(hidden, inter, bias=False)
            self.w3 = torch.nn.Linear(hidden, inter, bias=False)
            self.w2 = torch.nn.Linear(inter, hidden, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    experts = torch.nn.ModuleList(Expert() for _ in range(num_experts))
    randomize_(experts)
    w13, w2 = expert_weights(experts, hidden)
    assert w13.shape == (num_experts, 2 * inter, hidden) and w2.shape == (num_experts, hidden, inter)
    x = torch.randn(5, hidden)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0], [1, 2]], dtype=torch.int32)
    weights = torch.rand(5, 2)
    with torch.no_grad():
        expected = torch.stack([sum(weights[t, j] * experts[int(ids[t, j])](x[t]) for j in range(2))
                                for t in range(5)])
    torch.testing.assert_close(moe_swap.fused_moe(x, w13, w2, weights, ids), expected, atol=1e-5, rtol=1e-5)


# ---- expert layouts beyond gated, bias-free experts: gpt-oss (interleaved gate/up rows, stored
# transposed, biases, clamped SwiGLU) and nemotron_h (ungated relu2), against the modules themselves ----

def _routing(num_tokens, num_experts, top_k, device):
    ids = torch.rand(num_tokens, num_experts).argsort(dim=1)[:, :top_k].to(device)
    weights = torch.softmax(torch.randn(num_tokens, top_k), dim=-1).to(device)
    return weights, ids


def _gpt_oss_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    if not hasattr(GptOssExperts, "_apply_gate"):
        pytest.skip("this transformers' GptOssExperts has no _apply_gate (the layout this test de-interleaves)")
    config = GptOssConfig(hidden_size=72, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)
    experts = GptOssExperts(config)
    randomize_(experts)
    with torch.no_grad():  # biases as large as the projections, so that they matter
        experts.gate_up_proj_bias.mul_(3.0)
        experts.down_proj_bias.mul_(3.0)
    return experts, config


def gpt_oss_to_fused(experts):
    """gpt-oss stores gate_up_proj [E, H, 2I] with gate and up rows interleaved (g0, u0, g1, u1, ...)
    and down_proj [E, I, H]; fused_moe takes [E, 2I, H] gate rows then up rows and [E, H, I]."""
    gate_up = experts.gate_up_proj.transpose(1, 2)
    w13 = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1).contiguous()
    bias = experts.gate_up_proj_bias
    w13_bias = torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1).contiguous()
    w2 = experts.down_proj.transpose(1, 2).contiguous()
    return w13, w2, w13_bias, experts.down_proj_bias.contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [7.0, 0.5], ids=["limit7", "limit0.5"])  # 0.5: most values clamped
@pytest.mark.parametrize("num_tokens", [1, 9, 150])
def test_gpt_oss_experts_match_transformers(device, dtype, limit, num_tokens):
    experts, config = _gpt_oss_experts()
    experts.limit = limit
    experts = experts.to(device=device, dtype=dtype)
    x = (3 * torch.randn(num_tokens, config.hidden_size)).to(device=device, dtype=dtype)
    weights, ids = _routing(num_tokens, config.num_local_experts, config.num_experts_per_tok, device)
    with torch.no_grad():
        expected = experts(x, ids, weights)
        w13, w2, w13_bias, w2_bias = gpt_oss_to_fused(experts)
        out = moe_swap.fused_moe(x, w13, w2, weights.float(), ids.int(), activation="swiglu_clamp",
                                 w13_bias=w13_bias, w2_bias=w2_bias, swiglu_alpha=experts.alpha,
                                 swiglu_limit=experts.limit)
    # bf16: transformers rounds the projection, the bias sum, the sigmoid and each product to bf16
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=8e-2, rtol=5e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 9, 150])
def test_nemotron_h_ungated_relu2_experts_match_transformers(device, dtype, num_tokens):
    try:
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    except ImportError:
        pytest.skip("this transformers has no nemotron_h")
    config = NemotronHConfig(hidden_size=72, moe_intermediate_size=44, n_routed_experts=8, num_experts_per_tok=2,
                             mlp_hidden_act="relu2")
    experts = NemotronHExperts(config)
    randomize_(experts)
    experts = experts.to(device=device, dtype=dtype)
    assert experts.up_proj.shape == (8, 44, 72) and experts.down_proj.shape == (8, 72, 44)
    x = torch.randn(num_tokens, config.hidden_size).to(device=device, dtype=dtype)
    weights, ids = _routing(num_tokens, 8, 2, device)
    with torch.no_grad():
        expected = experts(x, ids, weights)
        out = moe_swap.fused_moe(x, experts.up_proj, experts.down_proj, weights.float(), ids.int(),
                                 activation="relu2", gated=False)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tol)
