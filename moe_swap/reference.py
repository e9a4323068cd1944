"""Pure-torch reference implementations: the test oracle.

Written plainly, for clarity over speed, and sharing no code with the kernels. Tests compare every
op against these (and against the Hugging Face modules themselves), never the other way round.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_route(
    router_logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int = 1,
    topk_group: int = 1,
    correction_bias: Optional[Tensor] = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Reference routing. See :func:`moe_swap.ops.topk_route` for the contract."""
    logits = router_logits.float()
    num_tokens, num_experts = logits.shape
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")

    choice = scores.clone()
    if correction_bias is not None:
        choice = choice + correction_bias.float().to(choice.device)
    # NaN ranks lowest: below every real score, even -inf.
    nan_rank = torch.isnan(choice)
    choice_key = torch.where(nan_rank, torch.full_like(choice, -float("inf")), choice)

    allowed = torch.ones(num_tokens, num_experts, dtype=torch.bool)
    if num_expert_group > 1:
        per_group = num_experts // num_expert_group
        for t in range(num_tokens):
            group_scores = []
            for g in range(num_expert_group):
                members = choice_key[t, g * per_group:(g + 1) * per_group]
                if correction_bias is not None:
                    # summed in float32, as DeepSeek-V3 and vLLM do
                    best_two = torch.sort(members, descending=True).values[: min(2, per_group)]
                    group_scores.append(float(best_two.sum()))
                else:
                    group_scores.append(float(members.max()))
            # best groups first; ties: lower group index first
            order = sorted(range(num_expert_group), key=lambda g: (-_nan_low(group_scores[g]), g))
            allowed[t] = False
            for g in order[:topk_group]:
                allowed[t, g * per_group:(g + 1) * per_group] = True

    topk_weights = torch.zeros(num_tokens, top_k, dtype=torch.float32)
    topk_ids = torch.zeros(num_tokens, top_k, dtype=torch.int32)
    for t in range(num_tokens):
        row_key = choice_key[t].tolist()
        row_nan = nan_rank[t].tolist()
        row_allowed = allowed[t].tolist()
        candidates = [e for e in range(num_experts) if row_allowed[e]]
        # rank: not NaN first, then by decreasing selection score, ties by lower id
        candidates.sort(key=lambda e: (row_nan[e], -row_key[e], e))
        chosen = candidates[:top_k]
        topk_ids[t] = torch.tensor(chosen, dtype=torch.int32)
        topk_weights[t] = scores[t, chosen].cpu()
    if renormalize:
        # + 1e-20 as DeepSeek-V3 does: a no-op in float32 for softmax scores (their sum is >= 1/E),
        # and all-zero sigmoid weights stay 0 instead of becoming NaN
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids


def _nan_low(x: float) -> float:
    return -float("inf") if x != x else x


def activation_fn(name: str):
    """act(x) of the activations applied alone (ungated) or times up (gated); not swiglu_clamp."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu2":
        return lambda x: torch.square(torch.relu(x))
    raise ValueError(f"activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', "
                     f"got {name!r}")


def swiglu_clamp(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's clamped SwiGLU, as transformers' GptOssExperts._apply_gate writes it."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def silu_clamp(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """DeepSeek-V4's and HY-V4's clamped SiLU gate, as their experts' _apply_gate writes it."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def fused_moe(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    expert_map: Optional[Tensor] = None,
    activation: str = "silu",
    w13_bias: Optional[Tensor] = None,
    w2_bias: Optional[Tensor] = None,
    gated: bool = True,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """Reference MoE layer, token by token. See :func:`moe_swap.ops.fused_moe` for the contract.

    Matmuls accumulate in float32 and the biases (indexed by the global expert id) are added in
    float32; the activated intermediate is rounded to the input dtype before the down projection,
    as a model running in that dtype does.
    """
    if activation in ("swiglu_clamp", "silu_clamp") and not gated:
        raise ValueError(f"activation {activation!r} requires gated=True")
    act = None if activation in ("swiglu_clamp", "silu_clamp") else activation_fn(activation)
    dtype = hidden_states.dtype
    num_tokens, hidden = hidden_states.shape
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    for t in range(num_tokens):
        x = hidden_states[t].float()
        for j in range(topk_ids.shape[1]):
            g = int(topk_ids[t, j])
            e = g
            if expert_map is not None:
                e = int(expert_map[g])
                if e < 0:
                    continue
            projected = w13[e].float() @ x
            if w13_bias is not None:
                projected = projected + w13_bias[g].float()
            if gated:
                gate, up = projected[:inter], projected[inter:]
                if activation == "silu_clamp":
                    h = silu_clamp(gate, up, swiglu_limit)
                elif act is None:
                    h = swiglu_clamp(gate, up, swiglu_alpha, swiglu_limit)
                else:
                    h = act(gate) * up
            else:
                h = act(projected)
            h = h.to(dtype).float()
            y = w2[e].float() @ h
            if w2_bias is not None:
                y = y + w2_bias[g].float()
            out[t] += float(topk_weights[t, j]) * y
    return out.to(dtype)


# ---- quantized experts: plain dequantization, the oracle of fused_moe_quant (layouts: moe_swap/quant.py) ----

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _nibbles(packed: Tensor, cols: int) -> Tensor:
    """uint8 [..., B] -> int64 [..., cols]: element 2j is byte j's low nibble, 2j + 1 its high nibble."""
    b = packed.to(torch.int64)
    both = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return both[..., :cols]


def dequantize(fmt: str, qweight: Tensor, scale: Tensor, zero: Optional[Tensor], cols: int, group_size: int = 0,
               segments: int = 1) -> Tensor:
    """The float32 ``[E, N, cols]`` weight a quantized expert matrix stands for, element by element."""
    e, n = qweight.shape[0], qweight.shape[1]
    k = torch.arange(cols)
    if fmt == "fp8_block":
        seg_rows = n // segments
        blocks_per_seg = -(-seg_rows // 128)
        rows = torch.arange(n)
        row_block = (rows // seg_rows) * blocks_per_seg + (rows % seg_rows) // 128
        s = scale.float()[:, row_block][:, :, k // 128]
        return qweight.float() * s
    if fmt == "mxfp4":
        values = torch.tensor(_E2M1, dtype=torch.float32)[_nibbles(qweight, cols)]
        exponent = scale.to(torch.int64)[:, :, k // 32] - 127
        return values * torch.pow(2.0, exponent.double()).float()
    if fmt == "int4":
        u = _nibbles(qweight, cols).float()
        z = zero.float()[:, :, k // group_size] if zero is not None else 8.0
        return (u - z) * scale.float()[:, :, k // group_size]
    if fmt == "int8":
        return qweight.float() * scale.float().unsqueeze(-1)
    raise ValueError(f"format must be 'fp8_block', 'mxfp4', 'int4' or 'int8', got {fmt!r}")


def fused_moe_quant(
    hidden_states: Tensor,
    w13: Tensor,
    w13_scale: Tensor,
    w2: Tensor,
    w2_scale: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    format: str,
    group_size: int = 0,
    w13_zero: Optional[Tensor] = None,
    w2_zero: Optional[Tensor] = None,
    expert_map: Optional[Tensor] = None,
    activation: str = "silu",
    w13_bias: Optional[Tensor] = None,
    w2_bias: Optional[Tensor] = None,
    gated: bool = True,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """Reference quantized MoE layer: :func:`fused_moe` on the float32 weights the quantized bytes stand
    for (the w13 of fp8_block gated is blocked per half). See :func:`moe_swap.ops.fused_moe_quant`."""
    hidden = hidden_states.shape[1]
    inter = w13.shape[1] // 2 if gated else w13.shape[1]
    g13 = group_size
    w13_f = dequantize(format, w13, w13_scale, w13_zero, hidden, g13, 2 if gated else 1)
    w2_f = dequantize(format, w2, w2_scale, w2_zero, inter, group_size, 1)
    return fused_moe(hidden_states, w13_f, w2_f, topk_weights, topk_ids, expert_map, activation, w13_bias, w2_bias,
                     gated, swiglu_alpha, swiglu_limit)
