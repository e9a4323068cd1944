"""moe_swap.offload on every supported family: same tokens as the unmodified model, experts freed.

Runs under transformers 5.x (fused experts, the "moe_swap" experts implementation) and 4.57 (per-expert
ModuleLists, replaced block forward): `/work/venv-tf457/bin/python -m pytest tests/test_offload.py`.
"""

import copy
import gc
import warnings
import weakref

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import moe_swap
from moe_swap import models
from moe_swap.offload import OffloadReport

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

_COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08,
               tie_word_embeddings=False)
_DEEPSEEK = dict(moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                 first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, intermediate_size=96, num_key_value_heads=4)
TINY = {
    "mixtral": dict(intermediate_size=96, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      head_dim=16, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        q_lora_rank=None, routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK, n_group=4, topk_group=2, q_lora_rank=32, norm_topk_prob=True,
                        routed_scaling_factor=2.0),
}
FAMILIES = [f for f in TINY if f in transformers.models.auto.configuration_auto.CONFIG_MAPPING]


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, dtype=torch.float32, **overrides):
    """A seeded random model of the family; DeepSeek-V3 also gets a random routing bias."""
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.uniform_(0.0, 0.05)  # selection-only bias, kept positive (4.57 masks groups with 0)
    return model.to(dtype).eval()


def prompt(vocab=160, batch=2, length=7):
    return torch.randint(0, vocab, (batch, length))


def greedy(model, ids, new_tokens=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_tokens_identical_float32(model_type):
    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    ids = prompt()
    expected_logits = logits(reference, ids)
    expected = greedy(reference, ids)

    report = moe_swap.offload(model, device="cpu")

    assert report.streamed_layers == report.moe_layers and report.moe_layers
    torch.testing.assert_close(logits(model, ids), expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, ids), expected)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_close_bfloat16(model_type):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    ids = prompt(length=12)
    expected = logits(reference, ids)
    moe_swap.offload(model, device="cpu")
    got = logits(model, ids)
    # bf16 rounding differs with summation order, and a near-tie in the router can then pick another
    # expert for a token: most positions must agree to bf16 resolution, all of them on average
    scale = expected.abs().max()
    per_position = (got - expected).abs().amax(dim=-1)
    assert (per_position <= 0.03 * scale).float().mean() >= 0.85, per_position / scale
    assert (got - expected).abs().mean() <= 0.01 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.85


def test_dense_first_layers_are_untouched():
    model = tiny_model("deepseek_v3")
    report = moe_swap.offload(model, device="cpu")
    assert report.moe_layers == [1, 2]  # first_k_dense_replace=1: layer 0 is a dense MLP


def test_deepseek_v2_greedy_routing():
    model = tiny_model("deepseek_v2", topk_method="greedy")
    reference = copy.deepcopy(model)
    ids = prompt()
    expected = greedy(reference, ids)
    moe_swap.offload(model, device="cpu")
    assert torch.equal(greedy(model, ids), expected)


def test_expert_parameters_are_freed_not_copied():
    model = tiny_model("qwen3_moe")
    family = models.family_for_config(model.config)
    layers = models.find_moe_layers(model, family)
    originals = [weakref.ref(p) for layer in layers for p in models.expert_parameters(layer, family)]
    expert_bytes = sum(p.numel() * p.element_size()
                       for layer in layers for p in models.expert_parameters(layer, family))
    total_before = sum(p.numel() * p.element_size() for p in model.parameters())
    del layers

    report = moe_swap.offload(model, device="cpu")
    gc.collect()

    assert all(ref() is None for ref in originals), "an original expert tensor is still alive"
    assert not any(".experts." in name for name, _ in model.named_parameters())
    total_after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total_before - total_after == expert_bytes
    assert report.expert_bytes == expert_bytes
    assert report.pinned_bytes >= expert_bytes  # the HostStore holds them now
    assert report.streamed_bytes_per_forward == expert_bytes


def test_budget_keeps_some_layers_resident_and_tokens_still_match():
    model = tiny_model("mixtral", num_hidden_layers=4)
    reference = copy.deepcopy(model)
    family = models.family_for_config(model.config)
    layers = models.find_moe_layers(model, family)
    layer_bytes = layers[0].expert_numel() * 4
    weights = list(model.parameters()) + list(model.buffers())
    base = sum(t.numel() * t.element_size() for t in weights) - len(layers) * layer_bytes
    ids = prompt()
    expected = greedy(reference, ids)

    report = moe_swap.offload(model, device="cpu", gpu_budget=base + 2 * layer_bytes + 1 * layer_bytes)

    assert len(report.resident_layers) == 1 and len(report.streamed_layers) == 3
    assert report.streamed_bytes_per_forward == 3 * layer_bytes
    assert report.device_bytes <= report.gpu_budget
    assert torch.equal(greedy(model, ids), expected)


def test_budget_holding_everything_warns_and_offloads_nothing():
    model = tiny_model("olmoe")
    reference = copy.deepcopy(model)
    ids = prompt()
    expected = greedy(reference, ids)
    with pytest.warns(UserWarning, match="nothing was offloaded"):
        report = moe_swap.offload(model, device="cpu", gpu_budget="1GiB")
    assert not report.offloaded and report.pinned_bytes == 0
    assert "nothing was offloaded" in str(report)
    assert torch.equal(greedy(model, ids), expected)


def test_budget_too_small_says_the_minimum():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="too small.*need at least"):
        moe_swap.offload(model, device="cpu", gpu_budget=1000)


def test_unsupported_architecture_lists_the_supported_ones():
    config = AutoConfig.for_model("llama", **{k: v for k, v in _COMMON.items()}, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError) as info:
        moe_swap.offload(model, device="cpu")
    assert "llama" in str(info.value)
    for supported in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert supported in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="on_demand", mode="sync"), "needs mode='full'"),
    (dict(policy="on_demand", eviction="fifo"), "eviction must be one of lru, lfu, flru"),
    (dict(policy="auto", mode="uva"), "needs mode='full'"),
    (dict(policy="greedy"), "policy must be one of"),
    (dict(mode="async"), "mode must be one of"),
    (dict(device="tpu"), "device must be"),
    (dict(slots=1), "slots must be"),
    (dict(gpu_budget="lots"), "gpu_budget"),
])
def test_bad_arguments_raise_clearly(kwargs, match):
    model = tiny_model("qwen3_moe")
    kwargs.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=match):
        moe_swap.offload(model, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_says_so():
    with pytest.raises(ValueError, match="cuda.is_available"):
        moe_swap.offload(tiny_model("qwen3_moe"), device="cuda")


def test_offloading_twice_is_an_error():
    model = tiny_model("qwen3_moe")
    moe_swap.offload(model, device="cpu")
    with pytest.raises(ValueError, match="already been offloaded"):
        moe_swap.offload(model, device="cpu")


def test_report_is_readable():
    model = tiny_model("mixtral", num_hidden_layers=4)
    report = moe_swap.offload(model, device="cpu")
    assert isinstance(report, OffloadReport) and model.moe_swap_report is report
    text = str(report)
    for piece in ("mixtral", "streamed layers", "0-3", "ring slots", "streamed per forward", "host store"):
        assert piece in text, text


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the experts-implementation registry is transformers 5.x")
def test_registers_in_the_transformers_experts_registry_without_touching_the_shared_config():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    model = tiny_model("qwen3_moe")
    user_choice = model.config._experts_implementation
    moe_swap.offload(model, device="cpu")
    assert "moe_swap" in ALL_EXPERTS_FUNCTIONS
    experts = model.model.layers[0].mlp.experts
    assert experts.config._experts_implementation == "moe_swap"
    assert model.config._experts_implementation == user_choice
    # an unprepared module asked to use moe_swap says what to do
    other = tiny_model("qwen3_moe")
    other.set_experts_implementation("moe_swap")
    with pytest.raises(RuntimeError, match="moe_swap.offload"):
        other(prompt())


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_model("qwen3_moe", num_hidden_layers=2)
    moe_swap.offload(model, device="cpu")
    ids = prompt()
    expected = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)  # the streamer ops and fused_moe trace: no graph break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = logits(compiled, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
