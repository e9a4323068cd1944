"""Model adapters: where each Hugging Face MoE family keeps its experts, and how it routes.

Two layouts of the same models exist:
- transformers 5.x: each sparse block holds one ``experts`` module with fused parameters
  ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]`` — already the
  ``w13``/``w2`` layout of :func:`moe_swap.fused_moe` — and dispatches its forward through
  ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``.
- transformers 4.x: ``experts`` is a ``ModuleList`` of per-expert MLPs (gate/up/down linears).
The layout is detected per block, not from the version string, so either works.

Checkpoints on disk use the per-expert names in both versions
(``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``; Mixtral: ``block_sparse_moe`` and
``w1``/``w3``/``w2``); fused names (``...experts.gate_up_proj``) are read too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into (weights, ids): the arguments of ``topk_route``."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_expert_group: int = 1
    topk_group: int = 1
    uses_correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    router_in_float32: bool = False  # DeepSeek computes the router matmul in float32


@dataclass(frozen=True)
class Family:
    """One supported architecture family."""

    name: str
    model_types: tuple[str, ...]
    checkpoint_block: str  # the sparse block's name in checkpoints ("mlp" or "block_sparse_moe")
    expert_weight_names: tuple[str, str, str]  # per-expert (gate, up, down) linear names
    # transformers 4.x block forwards return (hidden, router_logits); DeepSeek's return hidden only
    returns_router_logits: bool
    shared_expert: Optional[str] = None  # name of the always-on shared expert MLP, if any
    shared_expert_gate: Optional[str] = None  # Qwen2-MoE: sigmoid gate on the shared expert

    def routing(self, config) -> Routing:
        if self.name in ("mixtral",):
            return Routing(top_k=config.num_experts_per_tok, renormalize=True)
        if self.name in ("qwen2_moe", "qwen3_moe", "olmoe"):
            return Routing(top_k=config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))
        if self.name == "deepseek_v2":
            grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
            return Routing(
                top_k=config.num_experts_per_tok,
                num_expert_group=int(config.n_group) if grouped else 1,
                topk_group=int(config.topk_group) if grouped else 1,
                routed_scaling_factor=float(config.routed_scaling_factor),
                router_in_float32=True,
            )
        if self.name == "deepseek_v3":
            return Routing(
                top_k=config.num_experts_per_tok,
                scoring="sigmoid",
                renormalize=bool(config.norm_topk_prob),
                num_expert_group=int(config.n_group),
                topk_group=int(config.topk_group),
                uses_correction_bias=True,
                routed_scaling_factor=float(config.routed_scaling_factor),
                router_in_float32=True,
            )
        raise AssertionError(self.name)


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("mixtral",), "block_sparse_moe", ("w1", "w3", "w2"), True),
    Family("qwen2_moe", ("qwen2_moe",), "mlp", ("gate_proj", "up_proj", "down_proj"), True,
           shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    Family("qwen3_moe", ("qwen3_moe",), "mlp", ("gate_proj", "up_proj", "down_proj"), True),
    Family("olmoe", ("olmoe",), "mlp", ("gate_proj", "up_proj", "down_proj"), True),
    Family("deepseek_v2", ("deepseek_v2",), "mlp", ("gate_proj", "up_proj", "down_proj"), False,
           shared_expert="shared_experts"),
    Family("deepseek_v3", ("deepseek_v3",), "mlp", ("gate_proj", "up_proj", "down_proj"), False,
           shared_expert="shared_experts"),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)

# Hugging Face activation names -> fused_moe's activation argument.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def family_for_config(config) -> Family:
    """The family of a model config; an unsupported architecture raises, listing the supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = getattr(config, "architectures", None) or []
    raise ValueError(
        f"moe_swap does not support model_type={model_type!r} (architectures={list(architectures)}); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def expert_activation(config) -> str:
    act = getattr(config, "hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"config.hidden_act={act!r} is not supported by fused_moe; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


@dataclass
class MoELayer:
    """One decoder layer's sparse MoE block, as found in a model."""

    layer_index: int  # index of the decoder layer in model.model.layers
    block_name: str  # attribute of the decoder layer holding the block ("mlp" / "block_sparse_moe")
    block: nn.Module
    fused: bool  # transformers 5.x fused experts module (else a ModuleList of expert MLPs)
    num_experts: int
    hidden_size: int
    intermediate_size: int

    def expert_numel(self) -> int:
        """Elements of w13 [E, 2I, H] plus w2 [E, H, I]."""
        return 3 * self.num_experts * self.intermediate_size * self.hidden_size

    def checkpoint_prefix(self, family: Family) -> str:
        return f"model.layers.{self.layer_index}.{family.checkpoint_block}.experts."

    def checkpoint_expert_keys(self, family: Family, expert: int) -> tuple[str, str, str]:
        prefix = self.checkpoint_prefix(family)
        return tuple(f"{prefix}{expert}.{name}.weight" for name in family.expert_weight_names)  # type: ignore

    def checkpoint_fused_keys(self, family: Family) -> tuple[str, str]:
        prefix = self.checkpoint_prefix(family)
        return f"{prefix}gate_up_proj", f"{prefix}down_proj"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"expected a causal LM with model.model.layers, got {type(model).__name__}")
    return layers


def find_moe_layers(model: nn.Module, family: Family) -> list[MoELayer]:
    """Every decoder layer whose MLP is a sparse MoE block (dense layers are skipped)."""
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        for block_name in ("mlp", "block_sparse_moe"):
            block = getattr(layer, block_name, None)
            experts = getattr(block, "experts", None) if block is not None else None
            if experts is None:
                continue
            if isinstance(experts, nn.ModuleList):
                gate_name, _, down_name = family.expert_weight_names
                first = experts[0]
                gate = getattr(first, gate_name).weight
                found.append(MoELayer(index, block_name, block, False, len(experts),
                                      gate.shape[1], gate.shape[0]))
            elif hasattr(experts, "gate_up_proj"):
                if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
                        or not getattr(experts, "is_concatenated", True):
                    raise ValueError(f"layer {index}: experts with transposed, biased or interleaved "
                                     f"weights are not supported by moe_swap")
                e, two_i, h = experts.gate_up_proj.shape
                found.append(MoELayer(index, block_name, block, True, e, h, two_i // 2))
            break
    return found


def expert_parameters(layer: MoELayer, family: Family) -> list[torch.Tensor]:
    """The parameters that hold the layer's routed experts (what offload moves out)."""
    experts = layer.block.experts
    if layer.fused:
        return [experts.gate_up_proj, experts.down_proj]
    return [p for p in experts.parameters()]


def take_expert_weights(layer: MoELayer, family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's experts as ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (a copy for 4.x ModuleLists)."""
    experts = layer.block.experts
    if layer.fused:
        return experts.gate_up_proj.detach(), experts.down_proj.detach()
    gate_name, up_name, down_name = family.expert_weight_names
    w13 = torch.stack([torch.cat([getattr(e, gate_name).weight, getattr(e, up_name).weight], dim=0)
                       for e in experts]).detach()
    w2 = torch.stack([getattr(e, down_name).weight for e in experts]).detach()
    return w13, w2


def drop_expert_parameters(layer: MoELayer) -> None:
    """Remove the routed experts' parameters from the model, so nothing holds their memory."""
    experts = layer.block.experts
    if layer.fused:
        del experts.gate_up_proj
        del experts.down_proj
    else:
        # the replaced block forward no longer touches the expert MLPs
        del layer.block.experts


def router_module(layer: MoELayer, family: Family) -> nn.Module:
    """The block's router (``gate``): a module whose ``weight`` is ``[E, H]`` in every supported family
    and both transformers layouts (an ``nn.Linear`` in 4.x, a top-k router module in 5.x)."""
    gate = getattr(layer.block, "gate", None)
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (layer.num_experts, layer.hidden_size):
        raise ValueError(f"{family.name}: decoder layer {layer.layer_index}'s MoE block has no router 'gate' with a "
                         f"weight [{layer.num_experts}, {layer.hidden_size}] (found {type(gate).__name__})")
    return gate
