"""The layout moe_swap reads from a transformers 5.x experts module: gate functions it cannot compute exactly
are refused naming the module and the attribute; what it does compute equals the module's own forward."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import families  # noqa: E402
import moe_swap  # noqa: E402
from moe_swap import models  # noqa: E402

FAMILIES = {f.name: f for f in families.discover()}
pytestmark = [pytest.mark.hf, pytest.mark.skipif(not FAMILIES, reason="transformers 4.x has no experts interface")]


def _experts(model):
    name, module = next((n, m) for n, m in model.named_modules() if models.is_interface_experts(m))
    return name, module


def test_unknown_activation_is_refused_naming_module_and_act_fn():
    model = families.build(FAMILIES["mixtral"])
    name, experts = _experts(model)
    experts.act_fn = torch.nn.Tanh()
    with pytest.raises(ValueError, match=rf"{name}.*_apply_gate.*act_fn.*Tanh"):
        moe_swap.offload(model, device="cpu")


def test_unknown_gate_override_is_refused():
    model = families.build(FAMILIES["qwen3_moe"])
    name, experts = _experts(model)
    # deepseek_v4's clamped SiLU gate, but with a limit that is no attribute of the module: moe_swap cannot know it
    experts._apply_gate = lambda gate_up: torch.nn.functional.silu(gate_up.chunk(2, -1)[0].clamp(max=6.5)) * \
        gate_up.chunk(2, -1)[1].clamp(-6.5, 6.5)
    with pytest.raises(ValueError, match=rf"{name}.*_apply_gate"):
        moe_swap.offload(model, device="cpu")


@pytest.mark.parametrize("family, limit_attribute", [("deepseek_v4", "limit"), ("hy_v4", "swiglu_limit")])
def test_clamped_silu_gate_is_read_with_the_modules_limit(family, limit_attribute):
    if family not in FAMILIES:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    _, experts = _experts(families.build(FAMILIES[family]))
    layout = models.read_experts_layout(experts, "experts")
    assert (layout.activation, layout.swiglu_limit) == ("silu_clamp", getattr(experts, limit_attribute))


def test_gate_written_differently_but_equal_is_taken():
    model = families.build(FAMILIES["qwen3_moe"])
    _, experts = _experts(model)
    experts._apply_gate = lambda gate_up: gate_up[..., :gate_up.shape[-1] // 2] * \
        torch.sigmoid(gate_up[..., :gate_up.shape[-1] // 2]) * gate_up[..., gate_up.shape[-1] // 2:]
    assert models.read_experts_layout(experts, "experts").activation == "silu"


def test_gpt_oss_layout_and_forward_by_keyword():
    model = families.build(FAMILIES["gpt_oss"])
    name, experts = _experts(model)
    layout = models.read_experts_layout(experts, name)
    assert (layout.activation, layout.swiglu_alpha, layout.swiglu_limit) == ("swiglu_clamp", experts.alpha, experts.limit)
    assert layout.transposed and layout.has_bias and not layout.concatenated
    x = torch.randn(5, experts.hidden_size)
    ids = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    expected = experts(x, ids, weights)
    moe_swap.offload(model, device="cpu")
    # the module's own argument names (router_indices, routing_weights), as the model may pass them
    got = experts(x, router_indices=ids, routing_weights=weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="router_indices"):
        experts(x, ids, top_k_weights=weights)
