"""Model adapters: where a Hugging Face MoE model keeps its experts, and how they compute.

Two layouts of the same models exist:
- transformers 5.x: an experts module decorated with ``transformers.integrations.moe.use_experts_implementation``
  holds fused 3-D parameters and dispatches its forward through ``ALL_EXPERTS_FUNCTIONS``. Any such module is
  taken, whatever the model_type: its layout is read from the module itself (:func:`read_experts_layout`:
  ``has_gate``, ``is_transposed``, ``is_concatenated``, ``has_bias``, ``act_fn`` and ``_apply_gate``, checked
  by evaluating them) and converted once into :func:`moe_swap.fused_moe`'s ``w13 [E, 2I, H]`` (gate rows,
  then up rows; ``[E, I, H]`` without a gate) and ``w2 [E, H, I]``.
- transformers 4.x: ``experts`` is a ``ModuleList`` of per-expert MLPs (gate/up/down linears), in the
  six :data:`FAMILIES` below, whose routing moe_swap reproduces.
The layout is detected per block, not from the version string, so either works.

Checkpoints on disk use the per-expert names in both versions
(``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``; Mixtral: ``block_sparse_moe`` and
``w1``/``w3``/``w2``); fused names (``...experts.gate_up_proj``) are read too.
"""

from __future__ import annotations

import inspect
import math
import re
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
        f"moe_swap does not support model_type={model_type!r} (architectures={list(architectures)}): it has no "
        f"experts module dispatched through transformers' experts interface (transformers 5.x: any family "
        f"whose experts use `use_experts_implementation`), and with transformers 4.x the supported model "
        f"types are {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def expert_activation(config) -> str:
    act = getattr(config, "hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"config.hidden_act={act!r} is not supported by fused_moe; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


@dataclass(frozen=True)
class ExpertsLayout:
    """How a transformers 5.x experts module stores and computes its experts (read from the module)."""

    gated: bool  # gate and up projections (False: up only, ``h = act(up x + b)``)
    transposed: bool  # stored [E, H, 2I] / [E, I, H] (x @ W) instead of [E, 2I, H] / [E, H, I]
    concatenated: bool  # gate rows then up rows (False: interleaved gate0, up0, gate1, up1, ...)
    has_bias: bool
    activation: str  # fused_moe's activation
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    forward_args: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights")

    @property
    def w13_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    @property
    def bias_names(self) -> tuple[str, str]:
        return f"{self.w13_name}_bias", "down_proj_bias"

    def op_kwargs(self) -> dict:
        """fused_moe's arguments for this layout beyond the activation (only those not at their default, so
        plain gated experts call fused_moe exactly as before)."""
        kwargs = {}
        if not self.gated:
            kwargs["gated"] = False
        if self.activation == "swiglu_clamp":
            kwargs.update(swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit)
        if self.activation == "silu_clamp":
            kwargs.update(swiglu_limit=self.swiglu_limit)
        return kwargs


# what moe_swap computes for each activation, written plainly (float64 probes compare against these)
_ACTIVATION_FUNCTIONS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu2": lambda x: torch.relu(x) ** 2,
}


def _swiglu_clamp(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def _silu_clamp(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return _ACTIVATION_FUNCTIONS["silu"](gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def _probe_input(*shape: int) -> torch.Tensor:
    """Probe values over [-30, 30] (past every clamp limit and activation knee), fixed seed, float64."""
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 60 - 30)


def _same(a, b: torch.Tensor) -> bool:
    # float32's precision, not float64's: fused_moe computes the gate in float32, so a gate a module computes
    # in float32 (beam: act(gate.float()) * up.float()) is the same function; a different one (a missing +1,
    # another clamp) differs by far more on probes over [-30, 30]
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.double(), b, rtol=1e-6, atol=1e-6)


def _identify_activation(act_fn) -> Optional[str]:
    x = _probe_input(4096)
    try:
        y = act_fn(x)
    except Exception:  # noqa: BLE001  (an activation that cannot run on float64 is not one moe_swap knows)
        return None
    for name, reference in _ACTIVATION_FUNCTIONS.items():
        if _same(y, reference(x)):
            return name
    return None


def _float_attributes(module: nn.Module) -> dict[str, float]:
    return {k: float(v) for k, v in vars(module).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}


def read_experts_layout(module: nn.Module, name: str) -> ExpertsLayout:
    """The layout of a 5.x experts module, from the attributes ``use_experts_implementation`` set and its
    gate function, evaluated on probe values: what moe_swap cannot compute exactly raises, naming the module
    and the attribute."""
    where = f"{name} ({type(module).__name__})"
    gated, transposed = bool(module.has_gate), bool(module.is_transposed)
    concatenated, has_bias = bool(module.is_concatenated), bool(module.has_bias)
    for attr in (("gate_up_proj" if gated else "up_proj"), "down_proj") + \
            ((("gate_up_proj_bias" if gated else "up_proj_bias"), "down_proj_bias") if has_bias else ()):
        value = getattr(module, attr, None)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: expected a tensor attribute {attr!r} (has_gate={gated}, has_bias={has_bias}), "
                             f"found {type(value).__name__}")
    act_fn = getattr(module, "act_fn", None)
    activation = _identify_activation(act_fn) if act_fn is not None else None
    alpha, limit = 1.702, 7.0
    if not gated:
        if activation is None:
            raise ValueError(f"{where}: its act_fn {act_fn!r} is not an activation moe_swap computes "
                             f"(silu, gelu, gelu_tanh, relu2)")
    else:
        # _apply_gate on [S, 2I] in the module's own row order; moe_swap's candidates on gate/up split by it
        probe = _probe_input(64, 16)
        gate, up = (probe[:, :8], probe[:, 8:]) if concatenated else (probe[:, 0::2], probe[:, 1::2])
        try:
            out = module._apply_gate(probe)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where}: its _apply_gate cannot be evaluated on probe values ({e}); moe_swap "
                             f"cannot tell what it computes") from e
        if activation is not None and _same(out, _ACTIVATION_FUNCTIONS[activation](gate) * up):
            pass
        else:
            numbers = _float_attributes(module)
            found = [("swiglu_clamp", a, lim) for a_name, a in numbers.items() for l_name, lim in numbers.items()
                     if a_name != l_name and _same(out, _swiglu_clamp(gate, up, a, lim))]
            found += [("silu_clamp", 1.702, lim) for lim in numbers.values()
                      if lim > 0 and _same(out, _silu_clamp(gate, up, lim))]
            if not found:
                raise ValueError(
                    f"{where}: its _apply_gate ({type(module)._apply_gate.__qualname__}) computes a gate moe_swap does "
                    f"not know: neither act(gate) * up with its act_fn ({act_fn!r}, recognised as {activation}) "
                    f"nor the clamped SwiGLU (up + 1) * g * sigmoid(alpha * g) nor silu(g) * clamp(up) with "
                    f"g = min(gate, limit) for any of its attributes "
                    f"{sorted(numbers)} (is_concatenated={concatenated})")
            activation, alpha, limit = found[0]
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    params = [p for p in inspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if len(params) != 3:
        raise ValueError(f"{where}: its forward takes ({', '.join(p.name for p in params)}); moe_swap expects "
                         f"(hidden_states, top-k expert ids, top-k weights) as transformers' experts interface does")
    return ExpertsLayout(gated, transposed, concatenated, has_bias, activation, alpha, limit,
                         tuple(p.name for p in params))  # type: ignore[arg-type]


def convert_to_fused(layout: ExpertsLayout, which: str, experts: torch.Tensor) -> torch.Tensor:
    """Experts ``[E, ...]`` of ``which`` ("w13" or "w2") in the module's own layout -> fused_moe's layout
    (transposed back; interleaved gate/up rows -> gate rows then up rows). Works on any run of experts."""
    if layout.transposed:
        experts = experts.transpose(1, 2)
    if which == "w13" and layout.gated and not layout.concatenated:
        experts = torch.cat([experts[:, 0::2], experts[:, 1::2]], dim=1)
    return experts.contiguous()


def to_fused_layout(layout: ExpertsLayout, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's experts in the module's own layout -> ``w13 [E, 2I, H]`` (``[E, I, H]`` ungated), ``w2 [E, H, I]``."""
    return convert_to_fused(layout, "w13", w13), convert_to_fused(layout, "w2", w2)


def bias_to_fused_layout(layout: ExpertsLayout, w13_bias: torch.Tensor) -> torch.Tensor:
    """``[E, 2I]`` gate/up bias in the module's row order -> gate entries then up entries."""
    if layout.gated and not layout.concatenated:
        w13_bias = torch.cat([w13_bias[:, 0::2], w13_bias[:, 1::2]], dim=1)
    return w13_bias.contiguous()


@dataclass
class MoELayer:
    """One sparse MoE block's experts, as found in a model."""

    layer_index: int  # index of the decoder layer (from the module's name; the order found where it has none)
    block_name: str  # attribute of the decoder layer holding the block ("mlp" / "block_sparse_moe"...)
    block: nn.Module
    fused: bool  # transformers 5.x fused experts module (else a ModuleList of expert MLPs)
    num_experts: int
    hidden_size: int
    intermediate_size: int
    layout: Optional[ExpertsLayout] = None  # 5.x experts module (None: 4.x ModuleList)
    experts_name: str = ""  # 5.x: the experts module's name in the model ("model.layers.3.mlp.experts")

    @property
    def gated(self) -> bool:
        return self.layout is None or self.layout.gated

    def expert_numel(self) -> int:
        """Elements of w13 [E, 2I, H] (or [E, I, H] ungated) plus w2 [E, H, I]."""
        return (3 if self.gated else 2) * self.num_experts * self.intermediate_size * self.hidden_size

    def w13_shape(self) -> tuple[int, int, int]:
        return self.num_experts, (2 if self.gated else 1) * self.intermediate_size, self.hidden_size

    def w2_shape(self) -> tuple[int, int, int]:
        return self.num_experts, self.hidden_size, self.intermediate_size

    @property
    def experts(self) -> nn.Module:
        return self.block.experts if self.layout is None else self.block

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


_INTERFACE_ATTRIBUTES = ("has_gate", "is_transposed", "is_concatenated", "has_bias")


def is_interface_experts(module: nn.Module) -> bool:
    """An experts module decorated with transformers' ``use_experts_implementation`` (it sets these attributes)."""
    return all(hasattr(module, a) for a in _INTERFACE_ATTRIBUTES) and hasattr(module, "config")


def find_interface_experts(model: nn.Module) -> list[MoELayer]:
    """Every experts module of the model dispatched through transformers' experts interface, in model order."""
    found = []
    for name, module in model.named_modules():
        if not is_interface_experts(module):
            continue
        layout = read_experts_layout(module, name)
        w13 = getattr(module, layout.w13_name)
        w2 = module.down_proj
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"{name}: expected 3-D {layout.w13_name} and down_proj, got shapes {list(w13.shape)} "
                             f"and {list(w2.shape)}")
        e = w13.shape[0]
        h, i = (w2.shape[2], w2.shape[1]) if layout.transposed else (w2.shape[1], w2.shape[2])
        expected = (e, h, (2 if layout.gated else 1) * i) if layout.transposed else \
            (e, (2 if layout.gated else 1) * i, h)
        if tuple(w13.shape) != expected:
            raise ValueError(f"{name}: {layout.w13_name} has shape {list(w13.shape)}, expected {list(expected)} from "
                             f"down_proj {list(w2.shape)} (is_transposed={layout.transposed}, has_gate={layout.gated})")
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        index = int(match.group(1)) if match else len(found)
        parent = name.rpartition(".")[0]
        found.append(MoELayer(index, parent.rpartition(".")[2], module, True, e, h, i, layout, name))
    return found


def find_moe_layers(model: nn.Module, family: Optional[Family] = None) -> list[MoELayer]:
    """The model's sparse experts: transformers 5.x interface experts anywhere in the model, else (4.x) every
    decoder layer whose MLP is a ModuleList of the family's expert MLPs (dense layers are skipped)."""
    found = find_interface_experts(model)
    if found or family is None:
        return found
    for index, layer in enumerate(decoder_layers(model)):
        for block_name in ("mlp", "block_sparse_moe"):
            block = getattr(layer, block_name, None)
            experts = getattr(block, "experts", None) if block is not None else None
            if isinstance(experts, nn.ModuleList):
                gate_name, _, down_name = family.expert_weight_names
                gate = getattr(experts[0], gate_name).weight
                found.append(MoELayer(index, block_name, block, False, len(experts), gate.shape[1], gate.shape[0]))
                break
    return found


def model_experts(model: nn.Module) -> tuple[Optional[Family], list[MoELayer]]:
    """``(family, layers)``: family None for 5.x interface experts (any model_type), else the 4.x family of the
    config (an unsupported one raises)."""
    layers = find_interface_experts(model)
    if layers:
        return None, layers
    family = family_for_config(model.config)
    return family, find_moe_layers(model, family)


def expert_parameters(layer: MoELayer, family: Optional[Family] = None) -> list[torch.Tensor]:
    """The parameters that hold the layer's routed experts (what offload moves out; 5.x biases stay)."""
    if layer.layout is not None:
        return [getattr(layer.block, layer.layout.w13_name), layer.block.down_proj]
    return [p for p in layer.block.experts.parameters()]


def take_expert_weights(layer: MoELayer, family: Optional[Family] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's experts as ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (a copy unless the layout is already that)."""
    if layer.layout is not None:
        return to_fused_layout(layer.layout, getattr(layer.block, layer.layout.w13_name).detach(),
                               layer.block.down_proj.detach())
    experts = layer.block.experts
    gate_name, up_name, down_name = family.expert_weight_names
    w13 = torch.stack([torch.cat([getattr(e, gate_name).weight, getattr(e, up_name).weight], dim=0)
                       for e in experts]).detach()
    w2 = torch.stack([getattr(e, down_name).weight for e in experts]).detach()
    return w13, w2


def drop_expert_parameters(layer: MoELayer) -> None:
    """Remove the routed experts' parameters from the model, so nothing holds their memory."""
    if layer.layout is not None:
        delattr(layer.block, layer.layout.w13_name)
        del layer.block.down_proj
    else:
        # the replaced block forward no longer touches the expert MLPs
        del layer.block.experts


def _parent(model: nn.Module, layer: MoELayer) -> Optional[nn.Module]:
    parent_name = layer.experts_name.rpartition(".")[0]
    try:
        return model.get_submodule(parent_name) if parent_name else None
    except AttributeError:
        return None


def router_module(layer: MoELayer, family: Optional[Family] = None, model: Optional[nn.Module] = None) -> nn.Module:
    """The block's router (``gate``): a module whose ``weight`` is ``[E, H]`` (an ``nn.Linear`` in 4.x, a top-k
    router module in 5.x); for 5.x experts, the ``gate`` of the module holding them (``model`` needed)."""
    block = layer.block if layer.layout is None else (_parent(model, layer) if model is not None else None)
    gate = getattr(block, "gate", None)
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (layer.num_experts, layer.hidden_size):
        what = family.name if family is not None else (layer.experts_name or "model")
        raise ValueError(f"{what}: decoder layer {layer.layer_index}'s MoE block has no router 'gate' with a "
                         f"weight [{layer.num_experts}, {layer.hidden_size}] (found {type(gate).__name__})")
    return gate


def routed_top_k(layer: MoELayer, config, family: Optional[Family] = None, model: Optional[nn.Module] = None) -> int:
    """Experts per token of the layer's router (its ``top_k``, else the config's ``num_experts_per_tok``)."""
    if family is not None:
        return family.routing(config).top_k
    gate = router_module(layer, family, model)
    for value in (getattr(gate, "top_k", None), getattr(_parent(model, layer), "top_k", None),
                  getattr(config, "num_experts_per_tok", None), getattr(getattr(config, "text_config", None),
                                                                        "num_experts_per_tok", None)):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= layer.num_experts:
            return value
    raise ValueError(f"{layer.experts_name}: cannot tell its router's top_k (no gate.top_k nor "
                     f"config.num_experts_per_tok); pass predict=False")
