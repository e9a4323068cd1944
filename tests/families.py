"""The MoE families of the installed transformers whose experts go through its experts interface, and a tiny
random model of each (used by test_families.py and scripts/families_table.py).

Discovery walks ``transformers/models/*/modeling_*.py`` for classes decorated with
``transformers.integrations.moe.use_experts_implementation`` (recognised by the decorator's own forward), so a
family added to transformers later is picked up without a change here. Tiny configs start from each family's
default config and shrink every size it has (hidden 64, 3 layers, 8 experts, vocab 128...).
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch

HIDDEN = 64
LAYERS = 3
EXPERTS = 8
VOCAB = 128

# config attribute -> tiny value (applied where the default config has the attribute)
_TINY = {
    "hidden_size": HIDDEN, "intermediate_size": 64, "moe_intermediate_size": 32, "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "ffn_hidden_size": 64,
    "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "top_k_experts": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2,
    "vocab_size": VOCAB, "max_position_embeddings": 512, "sliding_window": 32,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "chunk_size": 16,
    "mamba_d_state": 8, "mamba_dt_rank": 8, "mamba_d_conv": 4,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "num_dense_layers": 1, "n_group": 2, "topk_group": 1,
    "expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1,
    "num_nextn_predict_layers": 0, "decoder_sparse_step": 1, "moe_layer_freq": 1,
}


@dataclass
class Family:
    """One experts class of transformers and the causal LM that uses it."""

    name: str  # the transformers.models subpackage
    experts_class: str
    model_type: Optional[str]  # the causal LM's config model_type (None: no causal LM of its own)
    skip_reason: str = ""  # why its tiny model cannot be built here ("" when it builds)


def _interface_forward_code():
    """The code of the forward that use_experts_implementation installs (the same for every class it decorates);
    None where transformers has no experts interface (4.x)."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None

    class _Probe(torch.nn.Module):
        def __init__(self, config):
            super().__init__()

        def forward(self, x):
            return x

    return use_experts_implementation(_Probe).forward.__code__


def discover() -> list[Family]:
    """Every experts class of the installed transformers dispatched through its experts interface."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    interface_code = _interface_forward_code()
    if interface_code is None:
        return []
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, f"modeling_{name}.py")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            if "use_experts_implementation" not in f.read():
                continue
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__
                   and getattr(getattr(c, "forward", None), "__code__", None) is interface_code]
        causal = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                  if getattr(getattr(module, cls, None), "__module__", None) == module.__name__]
        # the text-only causal LM when a family has several (qwen3_5_moe_text before qwen3_5_moe)
        causal.sort(key=lambda t: (not t.endswith("_text"), t))
        for cls in classes:
            family = Family(name, cls.__name__, causal[0] if causal else None)
            if not causal:
                family.skip_reason = "no causal LM of its own in transformers (a multimodal or encoder model)"
            found.append(family)
    return found


_SIZES_SET_WHEN_NONE = ("head_dim", "n_shared_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                        "top_k_experts")


def _tiny_layer_list(values: list, layers: int) -> list:
    """A per-layer list cut to ``layers`` entries keeping every kind it had (dense and sparse, linear and
    full attention), in their order, padded with the most common kind."""
    names = [str(v) for v in values]
    kinds = sorted(set(names), key=names.index)
    firsts = [values[names.index(k)] for k in kinds][:layers]
    common = max(values, key=values.count)
    return firsts + [common] * (layers - len(firsts))


def _tiny_overrides(defaults: dict, layers: int) -> dict:
    overrides = {}
    for key, value in _TINY.items():
        if key not in defaults:
            continue
        current = defaults[key]
        if key in ("n_group", "topk_group") and defaults.get("n_group") in (None, 1):
            continue  # a family without grouped routing keeps it off
        if (isinstance(current, int) and not isinstance(current, bool)) or \
                (current is None and key in _SIZES_SET_WHEN_NONE):
            overrides[key] = layers if key == "num_hidden_layers" else value
    heads, kv_heads = defaults.get("num_attention_heads"), defaults.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads and heads % kv_heads == 0:
        overrides["num_key_value_heads"] = max(1, _TINY["num_attention_heads"] // (heads // kv_heads))  # same ratio
    top_k = defaults.get("num_experts_per_tok")
    if isinstance(top_k, int) and top_k < _TINY["num_experts_per_tok"]:
        overrides["num_experts_per_tok"] = top_k  # a family that routes to one expert keeps it
    if "qk_rope_head_dim" in defaults and "head_dim" in defaults:
        overrides["head_dim"] = overrides["qk_rope_head_dim"]  # MLA: rotary on the rope part only
    default_layers = defaults.get("num_hidden_layers")
    for key, value in defaults.items():
        if isinstance(value, list) and value and default_layers and len(value) == default_layers:
            overrides[key] = _tiny_layer_list(value, layers)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = defaults.get(key)
        if isinstance(value, int) and value >= VOCAB:
            overrides[key] = VOCAB - 1
        elif isinstance(value, list):
            overrides[key] = [min(v, VOCAB - 1) for v in value]
    for key, value in defaults.items():
        if key.startswith("enable_moe") and value is False:
            overrides[key] = True  # a family whose default config has its MoE block off (gemma4)
    if defaults.get("per_layer_config"):
        overrides["per_layer_config"] = {}  # per-layer sizes of the full model
    return overrides


def tiny_config(family: Family):
    """The family's default config with every size shrunk (built through the config's own __init__, so
    the values it derives from the sizes follow)."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(family.model_type).to_dict()
    config = AutoConfig.for_model(family.model_type, **_tiny_overrides(defaults, LAYERS))
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "model_type", None):
        config.text_config = AutoConfig.for_model(text.model_type, **_tiny_overrides(text.to_dict(), LAYERS))
    return config


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights scaled by 1/sqrt(fan-in) (norm weights around 1), so greedy tokens vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() == 1 and "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(noise / max(param.shape[-1], 1) ** 0.5)


def build(family: Family, dtype=torch.float32, seed: int = 0):
    """The family's tiny causal LM with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_(model, seed)
    return model.eval()


def prompt(seed: int = 0, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, VOCAB, (1, length), generator=generator)


def greedy(model, input_ids: torch.Tensor, new_tokens: int = 3) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, input_ids.shape[1]:].tolist()


POLICIES = ("full", "on_demand", "auto")
BF16_PROMPTS = 3


@dataclass
class Result:
    """What moe_swap does with one family's tiny model (the rows of the README's table)."""

    family: Family
    status: str  # "same" (every check gave the untouched model's tokens), "differs", "refused", "not built"
    detail: str = ""  # the refusal, the build error, or which checks differed
    checks: dict = None  # check name ("offload full", "load auto", ...) -> tokens equal (bool)
    # bfloat16, offload full, per prompt of BF16_PROMPTS: mean |logits - untouched| / max |untouched|; the median
    # (checked) and the largest (a prompt whose routing flips at a near-tie shows there)
    bf16_error: float = float("nan")
    bf16_max_error: float = float("nan")
    layout: str = ""  # how its experts store and compute (as moe_swap reads them)


def describe_layout(model) -> str:
    from moe_swap import models

    layouts = {models.read_experts_layout(m, n) for n, m in model.named_modules() if models.is_interface_experts(m)}
    parts = []
    for layout in sorted(layouts, key=repr):
        words = [f"swiglu_clamp(alpha={layout.swiglu_alpha:g}, limit={layout.swiglu_limit:g})"
                 if layout.activation == "swiglu_clamp" else
                 f"silu_clamp(limit={layout.swiglu_limit:g})" if layout.activation == "silu_clamp" else layout.activation]
        words += [w for w, on in (("ungated", not layout.gated), ("bias", layout.has_bias),
                                  ("transposed", layout.transposed),
                                  ("interleaved", layout.gated and not layout.concatenated)) if on]
        parts.append(", ".join(words))
    return "; ".join(parts)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


def check_family(family: Family, workdir: str, policies=POLICIES) -> Result:
    """Greedy tokens of the family's tiny float32 model through ``offload`` and through ``load`` (from its
    ``save_pretrained`` checkpoint in ``workdir``) under each policy on the CPU, against the untouched model;
    bfloat16 logits against the untouched bfloat16 model. A refusal must name the experts module."""
    import moe_swap

    if family.skip_reason:
        return Result(family, "not built", family.skip_reason)
    input_ids = prompt()
    try:
        model = build(family)
        expected = greedy(model, input_ids)
    except Exception as e:  # noqa: BLE001  (transformers' own failure: listed with the reason)
        return Result(family, "not built", f"with transformers alone: {type(e).__name__}: {str(e).splitlines()[0]}")
    checks = {}
    try:
        layout = describe_layout(model)
    except ValueError:
        layout = ""  # refused below, by offload itself
    for policy in policies:
        offloaded = build(family)
        try:
            moe_swap.offload(offloaded, device="cpu", policy=policy)
        except ValueError as e:
            if ".experts" not in str(e):
                raise
            return Result(family, "refused", str(e), layout=layout)
        checks[f"offload {policy}"] = greedy(offloaded, input_ids) == expected
        del offloaded
    model.save_pretrained(workdir)
    for policy in policies:
        loaded = moe_swap.load(workdir, device="cpu", policy=policy)
        checks[f"load {policy}"] = greedy(loaded, input_ids) == expected
        del loaded
    untouched = build(family, dtype=torch.bfloat16)
    offloaded = build(family, dtype=torch.bfloat16)
    moe_swap.offload(offloaded, device="cpu")
    ids = torch.cat([prompt(seed) for seed in range(BF16_PROMPTS)])  # one batch: a row per prompt
    reference = _logits(untouched, ids)
    difference = (_logits(offloaded, ids) - reference).abs()
    errors = [float(difference[row].mean() / reference[row].abs().max()) for row in range(BF16_PROMPTS)]
    differing = [name for name, same in checks.items() if not same]
    return Result(family, "differs" if differing else "same", ", ".join(differing), checks,
                  sorted(errors)[len(errors) // 2], max(errors), layout)
