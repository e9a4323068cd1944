"""Quantized expert weights: moe_swap's layouts, converters from the checkpoint formats, quantize-from-float.

One expert matrix is logically ``W [E, N, K]`` (``N`` output rows, ``K`` input columns: w13 is
``[E, 2I, H]``, w2 ``[E, H, I]``, as for :func:`moe_swap.fused_moe`). A :class:`QuantWeight` stores it
in one of four layouts, the bytes :func:`moe_swap.fused_moe_quant` computes from directly:

``fp8_block`` (DeepSeek-V3/R1, Qwen3-FP8, GLM-4.5-FP8)
    ``qweight`` float8_e4m3fn ``[E, N, K]``; ``scale`` float32 ``[E, S * ceil(N / S / 128), ceil(K / 128)]``.
    ``W[e, n, k] = float(qweight[e, n, k]) * scale[e, rb(n), k // 128]`` with the rows cut into ``S``
    equal segments (``segments``: 2 for a gated w13, whose gate and up rows were blocked separately in
    the checkpoint; else 1), each blocked on its own: ``rb(n) = s * ceil(N/S/128) + (n - s * N/S) // 128``
    for ``n`` in segment ``s``. Edge blocks are partial (the checkpoints zero-pad them when quantizing).
``mxfp4`` (gpt-oss)
    ``qweight`` uint8 ``[E, N, ceil(K / 32) * 16]``: block ``b`` of row ``n`` is bytes ``16b .. 16b+15``;
    byte ``j`` holds element ``32b + 2j`` in its low nibble and ``32b + 2j + 1`` in its high nibble, each
    an e2m1 code (sign bit 3; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6). ``scale`` uint8 e8m0
    ``[E, N, ceil(K / 32)]``: ``W = e2m1 * 2^(scale - 127)``. Nibbles past ``K`` are ignored.
``int4`` (GPTQ, AWQ, compressed-tensors pack-quantized; w4a16)
    ``qweight`` uint8 ``[E, N, ceil(K / 2)]``: byte ``j`` holds ``u[2j]`` (low nibble) and ``u[2j+1]``
    (high nibble), ``u`` in ``[0, 15]``; the high nibble of an odd ``K``'s last byte is ignored.
    ``scale`` float32, float16 or bfloat16 ``[E, N, ceil(K / g)]`` for the group size ``g`` in {32, 64,
    128} (groups run along ``K``; the last may be partial); ``zero`` uint8 ``[E, N, ceil(K / g)]`` in
    ``[0, 16]`` (16: GPTQ v1's stored 15 plus its offset of one), or None: symmetric, zero point 8.
    ``W = (u - zero) * scale``.
``int8`` (per output channel, symmetric)
    ``qweight`` int8 ``[E, N, K]``; ``scale`` float32 ``[E, N]``; ``W = qweight * scale``.

The converters (``from_*``) read a checkpoint's tensors exactly as stored and are run once at load;
they check every shape and raise ``ValueError`` naming the tensor, what was expected and what came.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["FORMATS", "QuantWeight", "check", "stack_experts", "cat_rows", "from_fp8", "from_mxfp4", "from_gptq",
           "from_awq", "from_compressed_tensors", "quantize_int8", "quantize_int4", "quantize_fp8_block",
           "quantization_scheme", "FP8_BLOCK", "MXFP4_BLOCK", "INT4_GROUP_SIZES"]

FORMATS = ("fp8_block", "mxfp4", "int4", "int8")
FP8_BLOCK = 128
MXFP4_BLOCK = 32
INT4_GROUP_SIZES = (32, 64, 128)
_INT4_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_MAX = 448.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantWeight:
    """One quantized expert matrix ``W [E, rows, cols]`` in a moe_swap layout (see the module docstring)."""

    format: str
    qweight: Tensor
    scale: Tensor
    zero: Optional[Tensor]
    rows: int
    cols: int
    group_size: int  # int4: 32/64/128; fp8_block: 128; mxfp4: 32; int8: cols (one group per row)
    segments: int = 1  # fp8_block: row segments blocked separately (2: a gated w13's gate and up halves)

    @property
    def num_experts(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weights, scales and zero points (what is stored and streamed)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)

    def kernel_args(self) -> tuple:
        """``(qweight, scale, zero)`` as :func:`moe_swap.fused_moe_quant` takes them."""
        return self.qweight, self.scale, self.zero


def _expected_shapes(fmt: str, e: int, n: int, k: int, g: int, segments: int) -> tuple:
    if fmt == "fp8_block":
        return (e, n, k), (e, segments * _cdiv(n // segments, FP8_BLOCK), _cdiv(k, FP8_BLOCK))
    if fmt == "mxfp4":
        return (e, n, _cdiv(k, MXFP4_BLOCK) * 16), (e, n, _cdiv(k, MXFP4_BLOCK))
    if fmt == "int4":
        return (e, n, _cdiv(k, 2)), (e, n, _cdiv(k, g))
    return (e, n, k), (e, n)


def check(w: QuantWeight, name: str = "weight") -> QuantWeight:
    """Raises ValueError unless ``w``'s tensors have exactly its format's dtypes and shapes."""
    if w.format not in FORMATS:
        raise ValueError(f"{name}.format must be one of {FORMATS}, got {w.format!r}")
    e = w.qweight.shape[0] if w.qweight.dim() == 3 else -1
    if w.qweight.dim() != 3:
        raise ValueError(f"{name}.qweight must be 3-D [E, N, packed K], got shape {tuple(w.qweight.shape)}")
    want_q = {"fp8_block": torch.float8_e4m3fn, "mxfp4": torch.uint8, "int4": torch.uint8, "int8": torch.int8}[w.format]
    if w.qweight.dtype != want_q:
        raise ValueError(f"{name}.qweight of format {w.format} must be {want_q}, got {w.qweight.dtype}")
    if w.format == "int4" and w.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name}: int4 group_size must be one of {INT4_GROUP_SIZES}, got {w.group_size}")
    if w.format == "fp8_block" and (w.segments < 1 or w.rows % w.segments != 0):
        raise ValueError(f"{name}: fp8_block segments must be >= 1 and divide rows = {w.rows}, got {w.segments}")
    q_shape, s_shape = _expected_shapes(w.format, e, w.rows, w.cols, w.group_size, w.segments)
    if tuple(w.qweight.shape) != q_shape:
        raise ValueError(f"{name}.qweight of format {w.format} with rows={w.rows}, cols={w.cols} must have shape "
                         f"{q_shape}, got {tuple(w.qweight.shape)}")
    want_s = _INT4_SCALE_DTYPES if w.format == "int4" else ((torch.uint8,) if w.format == "mxfp4" else (torch.float32,))
    if w.scale.dtype not in want_s:
        raise ValueError(f"{name}.scale of format {w.format} must be one of {want_s}, got {w.scale.dtype}")
    if tuple(w.scale.shape) != s_shape:
        raise ValueError(f"{name}.scale of format {w.format} with rows={w.rows}, cols={w.cols}"
                         f"{f', group_size={w.group_size}' if w.format == 'int4' else ''} must have shape {s_shape}, "
                         f"got {tuple(w.scale.shape)}")
    if w.zero is not None:
        if w.format != "int4":
            raise ValueError(f"{name}.zero: only int4 has zero points, got one for format {w.format}")
        if w.zero.dtype != torch.uint8 or tuple(w.zero.shape) != s_shape:
            raise ValueError(f"{name}.zero must be uint8 with shape {s_shape}, got {w.zero.dtype} "
                             f"{tuple(w.zero.shape)}")
    return w


def stack_experts(weights: Sequence[QuantWeight]) -> QuantWeight:
    """Experts of one projection, ``[1, N, K]`` each (or ``[e_i, N, K]``), into one ``[E, N, K]``."""
    if not weights:
        raise ValueError("stack_experts needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights):
        if (w.format, w.rows, w.cols, w.group_size, w.segments, w.zero is None, w.scale.dtype) != (
                first.format, first.rows, first.cols, first.group_size, first.segments, first.zero is None,
                first.scale.dtype):
            raise ValueError(f"stack_experts: weight {i} ({w.format}, rows={w.rows}, cols={w.cols}, group_size="
                             f"{w.group_size}) differs from weight 0 ({first.format}, rows={first.rows}, cols="
                             f"{first.cols}, group_size={first.group_size}) in format, shape, group or zero points")
    zero = None if first.zero is None else torch.cat([w.zero for w in weights])
    return check(replace(first, qweight=torch.cat([w.qweight for w in weights]),
                         scale=torch.cat([w.scale for w in weights]), zero=zero), "stack_experts")


def cat_rows(gate: QuantWeight, up: QuantWeight) -> QuantWeight:
    """A gated w13 ``[E, 2I, H]`` from the gate and up projections ``[E, I, H]`` (gate rows first).
    fp8_block keeps each half's own blocks (``segments=2``), so ``I`` need not be a multiple of 128."""
    if (gate.format, gate.rows, gate.cols, gate.group_size, gate.num_experts, gate.zero is None, gate.segments) != (
            up.format, up.rows, up.cols, up.group_size, up.num_experts, up.zero is None, up.segments):
        raise ValueError(f"cat_rows: gate ({gate.format}, [{gate.num_experts}, {gate.rows}, {gate.cols}]) and up "
                         f"({up.format}, [{up.num_experts}, {up.rows}, {up.cols}]) must match in format and shape")
    if gate.format == "fp8_block" and gate.segments != 1:
        raise ValueError("cat_rows: the fp8_block halves must have one segment each")
    zero = None if gate.zero is None else torch.cat([gate.zero, up.zero], dim=1)
    return check(replace(gate, qweight=torch.cat([gate.qweight, up.qweight], dim=1),
                         scale=torch.cat([gate.scale, up.scale], dim=1), zero=zero, rows=2 * gate.rows,
                         segments=2 if gate.format == "fp8_block" else 1), "cat_rows")


def _with_expert_dim(t: Tensor, dims: int) -> Tensor:
    return t.unsqueeze(0) if t.dim() == dims else t


def _pack_nibbles(u: Tensor) -> Tensor:
    """``u [..., K]`` values in [0, 15] -> uint8 ``[..., ceil(K/2)]``, element 2j low, 2j+1 high."""
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def _unpack_int32(packed: Tensor, dim: int, order: Sequence[int] = tuple(range(8))) -> Tensor:
    """int32 words holding eight 4-bit values each (value ``i`` at bits ``4 * order[i]``), unpacked along ``dim``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(words >> (4 * order[i])) & 0xF for i in range(8)]
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1).to(torch.uint8)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def from_fp8(weight: Tensor, weight_scale_inv: Tensor, weight_block_size: Sequence[int] = (128, 128)) -> QuantWeight:
    """DeepSeek-V3 / Qwen3-FP8 ``weight`` (float8_e4m3fn ``[N, K]`` or ``[E, N, K]``) and ``weight_scale_inv``
    (float32 ``[ceil(N/128), ceil(K/128)]``, or with E): ``W = weight * weight_scale_inv[block]``."""
    _need(list(weight_block_size) == [FP8_BLOCK, FP8_BLOCK],
          f"quantization_config.weight_block_size must be [128, 128], got {list(weight_block_size)}")
    _need(weight.dtype == torch.float8_e4m3fn, f"weight must be float8_e4m3fn (fmt 'e4m3'), got {weight.dtype}")
    _need(weight.dim() in (2, 3), f"weight must be [N, K] or [E, N, K], got shape {tuple(weight.shape)}")
    q = _with_expert_dim(weight, 2)
    s = _with_expert_dim(weight_scale_inv, 2)
    e, n, k = q.shape
    want = (e, _cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK))
    _need(s.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"weight_scale_inv must be a float tensor, got {s.dtype}")
    _need(tuple(s.shape) == want, f"weight_scale_inv for weight {tuple(weight.shape)} must have shape "
          f"{want[1:] if weight.dim() == 2 else want} (one per 128x128 block), got {tuple(weight_scale_inv.shape)}")
    return check(QuantWeight("fp8_block", q.contiguous(), s.float().contiguous(), None, n, k, FP8_BLOCK), "from_fp8")


def from_mxfp4(blocks: Tensor, scales: Tensor, cols: Optional[int] = None) -> QuantWeight:
    """gpt-oss ``*_blocks`` (uint8 ``[E, N, K/32, 16]``) and ``*_scales`` (uint8 e8m0 ``[E, N, K/32]``), rows as
    stored (gpt-oss's ``gate_up_proj`` rows interleave gate and up: see :func:`deinterleave_rows`). The bytes
    are moe_swap's mxfp4 layout as they are; ``cols`` (default ``32 * K/32``) is the logical K."""
    _need(blocks.dtype == torch.uint8 and blocks.dim() == 4 and blocks.shape[-1] == 16,
          f"*_blocks must be uint8 [E, N, K/32, 16], got {blocks.dtype} {tuple(blocks.shape)}")
    e, n, nb, _ = blocks.shape
    _need(scales.dtype == torch.uint8 and tuple(scales.shape) == (e, n, nb),
          f"*_scales must be uint8 {(e, n, nb)} (one e8m0 per 32 of *_blocks {tuple(blocks.shape)}), got "
          f"{scales.dtype} {tuple(scales.shape)}")
    k = nb * MXFP4_BLOCK if cols is None else int(cols)
    _need(_cdiv(k, MXFP4_BLOCK) == nb, f"cols = {k} needs {_cdiv(k, MXFP4_BLOCK)} blocks of 32, *_blocks has {nb}")
    return check(QuantWeight("mxfp4", blocks.reshape(e, n, nb * 16).contiguous(), scales.contiguous(), None, n, k,
                             MXFP4_BLOCK), "from_mxfp4")


def deinterleave_rows(w: QuantWeight) -> QuantWeight:
    """Rows ``g0, u0, g1, u1, ...`` (gpt-oss's gate_up_proj) to gate rows then up rows (a gated w13).
    Any per-row format: the rows are permuted with their scales."""
    _need(w.format != "fp8_block" and w.rows % 2 == 0, f"deinterleave_rows needs a per-row format and even rows, "
          f"got {w.format} with {w.rows} rows")
    perm = torch.cat([torch.arange(0, w.rows, 2), torch.arange(1, w.rows, 2)])
    zero = None if w.zero is None else w.zero[:, perm].contiguous()
    return replace(w, qweight=w.qweight[:, perm].contiguous(), scale=w.scale[:, perm].contiguous(), zero=zero)


def _group_count(k: int, group_size: int, what: str) -> int:
    g = k if group_size == -1 else group_size
    _need(g in INT4_GROUP_SIZES, f"{what}: group_size must be one of {INT4_GROUP_SIZES} (moe_swap's int4 groups), "
          f"got {group_size}")
    return g


def from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor] = None, *, group_size: int,
              bits: int = 4, sym: bool = True, checkpoint_format: str = "gptq") -> QuantWeight:
    """GPTQ: ``qweight`` int32 ``[K/8, N]`` (eight 4-bit values along K per word, value i at bits 4i),
    ``qzeros`` int32 ``[G, N/8]`` (along N), ``scales`` ``[G, N]``, ``g_idx`` int32 ``[K]``.
    ``checkpoint_format`` "gptq" (v1: the zero point is stored minus one) or "gptq_v2". Act-order
    checkpoints (``g_idx`` not ``k // group_size``: desc_act) are refused: their groups are not runs of K."""
    _need(bits == 4, f"quantization_config.bits must be 4 for GPTQ (moe_swap's int4), got {bits}")
    _need(checkpoint_format in ("gptq", "gptq_v2"),
          f"quantization_config.checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    _need(qweight.dtype == torch.int32 and qweight.dim() == 2, f"qweight must be int32 [K/8, N], got {qweight.dtype} "
          f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    g = _group_count(k, group_size, "GPTQ")
    groups = _cdiv(k, g)
    _need(tuple(scales.shape) == (groups, n) and scales.dtype in _INT4_SCALE_DTYPES,
          f"scales must be float [{groups}, {n}] (K = {k}, group_size {g}, N = {n}), got {scales.dtype} "
          f"{tuple(scales.shape)}")
    _need(qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (groups, _cdiv(n, 8)),
          f"qzeros must be int32 [{groups}, {_cdiv(n, 8)}], got {qzeros.dtype} {tuple(qzeros.shape)}")
    if g_idx is not None:
        _need(tuple(g_idx.shape) == (k,), f"g_idx must have shape [{k}], got {tuple(g_idx.shape)}")
        _need(bool(torch.equal(g_idx.to(torch.int64), torch.arange(k) // g)),
              "g_idx is not k // group_size: act-order (desc_act=True) GPTQ checkpoints are not supported")
    u = _unpack_int32(qweight, 0).t()  # [N, K]
    z = _unpack_int32(qzeros, 1)[:, :n].t()  # [N, G]
    if checkpoint_format == "gptq":
        z = z + 1
    zero = None if sym and bool((z == 8).all()) else z.contiguous()
    return check(QuantWeight("int4", _pack_nibbles(u).unsqueeze(0), scales.t().contiguous().unsqueeze(0),
                             None if zero is None else zero.unsqueeze(0), n, k, g), "from_gptq")


# AWQ packs eight output columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7: column c at bits 4 * _AWQ_SLOT[c]
_AWQ_SLOT = (0, 4, 1, 5, 2, 6, 3, 7)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, *, group_size: int, bits: int = 4) -> QuantWeight:
    """AWQ (GEMM): ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32 ``[G, N/8]``, both packed along N in
    AWQ's order; ``scales`` ``[G, N]``; ``W = (q - z) * s``."""
    _need(bits == 4, f"quantization_config.bits must be 4 for AWQ, got {bits}")
    _need(qweight.dtype == torch.int32 and qweight.dim() == 2, f"qweight must be int32 [K, N/8], got {qweight.dtype} "
          f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _group_count(k, group_size, "AWQ")
    groups = _cdiv(k, g)
    _need(tuple(scales.shape) == (groups, n) and scales.dtype in _INT4_SCALE_DTYPES,
          f"scales must be float [{groups}, {n}] (K = {k}, group_size {g}), got {scales.dtype} {tuple(scales.shape)}")
    _need(qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (groups, n // 8),
          f"qzeros must be int32 [{groups}, {n // 8}], got {qzeros.dtype} {tuple(qzeros.shape)}")
    u = _unpack_int32(qweight, 1, _AWQ_SLOT).t()  # [N, K]
    z = _unpack_int32(qzeros, 1, _AWQ_SLOT).t()  # [N, G]
    return check(QuantWeight("int4", _pack_nibbles(u).unsqueeze(0), scales.t().contiguous().unsqueeze(0),
                             z.contiguous().unsqueeze(0), n, k, g), "from_awq")


def from_compressed_tensors(weight_packed: Tensor, weight_scale: Tensor, weight_shape: Optional[Tensor] = None,
                            weight_zero_point: Optional[Tensor] = None, *, group_size: int, num_bits: int = 4,
                            symmetric: bool = True) -> QuantWeight:
    """compressed-tensors ``pack-quantized``: ``weight_packed`` int32 ``[N, ceil(K/8)]`` (along K, value i at
    bits 4i, stored as q + 8), ``weight_scale`` ``[N, G]``, ``weight_zero_point`` int32 ``[ceil(N/8), G]``
    (asymmetric; along N, also + 8), ``weight_shape`` ``[N, K]``. ``W = (q - zp) * s``."""
    _need(num_bits == 4, f"quantization_config ... weights.num_bits must be 4 for pack-quantized, got {num_bits}")
    _need(weight_packed.dtype == torch.int32 and weight_packed.dim() == 2,
          f"weight_packed must be int32 [N, ceil(K/8)], got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    n = weight_packed.shape[0]
    k = int(weight_shape[1]) if weight_shape is not None else weight_packed.shape[1] * 8
    if weight_shape is not None:
        _need(tuple(int(v) for v in weight_shape) == (n, k), f"weight_shape {weight_shape.tolist()} must be [N, K] "
              f"with N = weight_packed.size(0) = {n}")
    _need(weight_packed.shape[1] == _cdiv(k, 8), f"weight_packed must have {_cdiv(k, 8)} words per row for K = {k}, "
          f"got {weight_packed.shape[1]}")
    g = _group_count(k, group_size, "compressed-tensors")
    groups = _cdiv(k, g)
    _need(tuple(weight_scale.shape) == (n, groups) and weight_scale.dtype in _INT4_SCALE_DTYPES,
          f"weight_scale must be float [{n}, {groups}] (K = {k}, group_size {g}), got {weight_scale.dtype} "
          f"{tuple(weight_scale.shape)}")
    u = _unpack_int32(weight_packed, 1)[:, :k]
    zero = None
    if not symmetric:
        _need(weight_zero_point is not None, "weight_zero_point is required for symmetric=false")
        _need(weight_zero_point.dtype == torch.int32 and tuple(weight_zero_point.shape) == (_cdiv(n, 8), groups),
              f"weight_zero_point must be int32 [{_cdiv(n, 8)}, {groups}], got {weight_zero_point.dtype} "
              f"{tuple(weight_zero_point.shape)}")
        zero = _unpack_int32(weight_zero_point, 0)[:n].contiguous().unsqueeze(0)
    return check(QuantWeight("int4", _pack_nibbles(u).unsqueeze(0), weight_scale.contiguous().unsqueeze(0), zero, n, k,
                             g), "from_compressed_tensors")


def quantization_scheme(quantization_config: dict) -> dict:
    """The moe_swap format of a ``config.json`` ``quantization_config``: ``{"format", "group_size", ...}``.
    Raises ValueError naming the field and value of anything not supported."""
    qc = quantization_config
    method = qc.get("quant_method")
    if method == "fp8":
        _need(qc.get("fmt", "e4m3") == "e4m3", f"quantization_config.fmt must be 'e4m3', got {qc.get('fmt')!r}")
        _need(list(qc.get("weight_block_size") or []) == [128, 128],
              f"quantization_config.weight_block_size must be [128, 128], got {qc.get('weight_block_size')!r}")
        _need(qc.get("activation_scheme", "dynamic") == "dynamic",
              f"quantization_config.activation_scheme must be 'dynamic', got {qc.get('activation_scheme')!r}")
        return {"format": "fp8_block", "group_size": FP8_BLOCK}
    if method == "mxfp4":
        return {"format": "mxfp4", "group_size": MXFP4_BLOCK}
    if method in ("gptq", "awq"):
        _need(qc.get("bits", 4) == 4, f"quantization_config.bits must be 4, got {qc.get('bits')!r}")
        g = qc.get("group_size", 128)
        _need(g in INT4_GROUP_SIZES, f"quantization_config.group_size must be one of {INT4_GROUP_SIZES}, got {g!r}")
        if method == "gptq":
            _need(not qc.get("desc_act", False), "quantization_config.desc_act must be false (act-order GPTQ is not "
                  f"supported), got {qc.get('desc_act')!r}")
            return {"format": "int4", "group_size": g, "source": "gptq", "sym": bool(qc.get("sym", True)),
                    "checkpoint_format": qc.get("checkpoint_format", "gptq")}
        _need(qc.get("version", "gemm").lower() == "gemm",
              f"quantization_config.version must be 'gemm', got {qc.get('version')!r}")
        return {"format": "int4", "group_size": g, "source": "awq"}
    if method == "compressed-tensors":
        _need(qc.get("format") == "pack-quantized",
              f"quantization_config.format must be 'pack-quantized', got {qc.get('format')!r}")
        groups = qc.get("config_groups") or {}
        _need(len(groups) == 1, f"quantization_config.config_groups must hold one group, got {len(groups)}")
        weights = next(iter(groups.values())).get("weights") or {}
        _need(weights.get("num_bits") == 4, f"quantization_config.config_groups.*.weights.num_bits must be 4, got "
              f"{weights.get('num_bits')!r}")
        _need(weights.get("strategy") == "group", f"quantization_config.config_groups.*.weights.strategy must be "
              f"'group', got {weights.get('strategy')!r}")
        g = weights.get("group_size")
        _need(g in INT4_GROUP_SIZES, f"quantization_config.config_groups.*.weights.group_size must be one of "
              f"{INT4_GROUP_SIZES}, got {g!r}")
        _need(not weights.get("actorder"), f"quantization_config.config_groups.*.weights.actorder must be null, "
              f"got {weights.get('actorder')!r}")
        return {"format": "int4", "group_size": g, "source": "compressed-tensors",
                "symmetric": bool(weights.get("symmetric", True))}
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported: expected 'fp8', 'mxfp4', "
                     "'gptq', 'awq' or 'compressed-tensors'")


# ---- quantize from float (opt-in, lossy): each returns the weight and the error it introduced ----

def _error(w: Tensor, q: QuantWeight) -> dict:
    from .reference import dequantize

    d = dequantize(q.format, q.qweight, q.scale, q.zero, q.cols, q.group_size, q.segments)
    diff = (d - w.float()).abs()
    rms = float(w.float().pow(2).mean().sqrt())
    return {"max_abs": float(diff.max()) if diff.numel() else 0.0,
            "rel_rms": float(diff.pow(2).mean().sqrt()) / rms if rms > 0 else 0.0}


def quantize_int8(w: Tensor) -> tuple[QuantWeight, dict]:
    """Per output channel, symmetric: ``scale = max|row| / 127``."""
    w3 = _with_expert_dim(w, 2).float()
    scale = w3.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w3 / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    out = check(QuantWeight("int8", q.contiguous(), scale.contiguous(), None, w3.shape[1], w3.shape[2], w3.shape[2]))
    return out, _error(w3, out)


def quantize_int4(w: Tensor, group_size: int = 128, symmetric: bool = True) -> tuple[QuantWeight, dict]:
    """Group-wise along K: symmetric ``scale = max|group| / 7``, ``u = round(w / scale) + 8`` in [0, 15]; else
    min/max with a zero point."""
    _need(group_size in INT4_GROUP_SIZES, f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    w3 = _with_expert_dim(w, 2).float()
    e, n, k = w3.shape
    groups = _cdiv(k, group_size)
    padded = torch.nn.functional.pad(w3, (0, groups * group_size - k)).view(e, n, groups, group_size)
    if symmetric:
        scale = padded.abs().amax(dim=-1) / 7.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        u = torch.round(padded / scale.unsqueeze(-1)).clamp(-8, 7) + 8
        zero = None
    else:
        lo, hi = padded.amin(dim=-1).clamp(max=0), padded.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = torch.round(-lo / scale).clamp(0, 15)
        u = (torch.round(padded / scale.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
        zero = z.to(torch.uint8).contiguous()
    u = u.view(e, n, groups * group_size)[..., :k]
    out = check(QuantWeight("int4", _pack_nibbles(u), scale.contiguous(), zero, n, k, group_size))
    return out, _error(w3, out)


def quantize_fp8_block(w: Tensor, segments: int = 1) -> tuple[QuantWeight, dict]:
    """128x128 blocks (each of ``segments`` row segments blocked on its own), ``scale = max|block| / 448``."""
    w3 = _with_expert_dim(w, 2).float()
    e, n, k = w3.shape
    _need(n % segments == 0, f"segments = {segments} must divide rows = {n}")
    seg_rows = n // segments
    rb, cb = _cdiv(seg_rows, FP8_BLOCK), _cdiv(k, FP8_BLOCK)
    parts = []
    for s in range(segments):
        seg = torch.nn.functional.pad(w3[:, s * seg_rows:(s + 1) * seg_rows],
                                      (0, cb * FP8_BLOCK - k, 0, rb * FP8_BLOCK - seg_rows))
        parts.append(seg.view(e, rb, FP8_BLOCK, cb, FP8_BLOCK).abs().amax(dim=(2, 4)) / _FP8_MAX)
    scale = torch.cat(parts, dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    row_block = torch.cat([s * rb + torch.arange(seg_rows) // FP8_BLOCK for s in range(segments)])
    full = scale[:, row_block][:, :, torch.arange(k) // FP8_BLOCK]
    q = (w3 / full).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    out = check(QuantWeight("fp8_block", q.contiguous(), scale.contiguous(), None, n, k, FP8_BLOCK, segments))
    return out, _error(w3, out)
