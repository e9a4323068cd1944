"""moe_swap.quant's converters against checkpoints built here in each format's exact tensor names and layouts
(seeded random weights), against transformers' own dequantization where it has one on the CPU; checks."""

import numpy as np
import pytest
import torch

from moe_swap import quant, reference


def dequant(w):
    return reference.dequantize(w.format, w.qweight, w.scale, w.zero, w.cols, w.group_size, w.segments)


def pack_words(values, dim):
    """Eight 4-bit values per int32 word along ``dim`` (value i of a word at bits 4i), as GPTQ's and
    compressed-tensors' packers write them (uint32 arithmetic, then the bits as int32)."""
    v = np.asarray(values, dtype=np.uint32)
    v = np.moveaxis(v, dim, -1)
    pad = (-v.shape[-1]) % 8
    v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for i in range(8):
        words |= (v[..., i] & 0xF) << np.uint32(4 * i)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, -1, dim)).view(np.int32))


def expand_groups(per_group, k, group):
    return per_group.repeat_interleave(group, dim=-1)[..., :k]


# ---- DeepSeek-V3 / Qwen3-FP8: weight + weight_scale_inv ----

def fp8_checkpoint(n, k):
    b = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    b = torch.where((b & 0x7F) == 0x7F, b ^ 1, b)
    return b.view(torch.float8_e4m3fn), torch.rand(-(-n // 128), -(-k // 128)) + 0.01


@pytest.mark.parametrize("n, k", [(256, 384), (200, 75)])
def test_fp8_matches_the_checkpoint_definition(n, k):
    weight, scale_inv = fp8_checkpoint(n, k)
    w = quant.from_fp8(weight, scale_inv, [128, 128])
    expected = weight.float() * scale_inv.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    torch.testing.assert_close(dequant(w)[0], expected, rtol=0, atol=0)


def test_fp8_matches_transformers_dequantization():
    finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(finegrained_fp8, "Fp8Dequantize"):  # transformers 4.x has no CPU dequantization
        pytest.skip(f"transformers {__import__('transformers').__version__} has no Fp8Dequantize")
    weight, scale_inv = fp8_checkpoint(256, 384)  # transformers' CPU dequantization needs whole blocks
    theirs = finegrained_fp8.Fp8Dequantize(None)._dequantize_one(weight, scale_inv, torch.float32)
    torch.testing.assert_close(dequant(quant.from_fp8(weight, scale_inv, [128, 128]))[0], theirs, rtol=0, atol=0)


def test_fp8_gate_and_up_keep_their_own_blocks():
    inter, hidden = 75, 200  # I not a multiple of 128: the halves' blocks do not line up in one [2I, H] grid
    (g, gs), (u, us) = fp8_checkpoint(inter, hidden), fp8_checkpoint(inter, hidden)
    w13 = quant.cat_rows(quant.from_fp8(g, gs), quant.from_fp8(u, us))
    assert w13.segments == 2 and w13.scale.shape == (1, 2, 2)
    torch.testing.assert_close(dequant(w13)[0], torch.cat([dequant(quant.from_fp8(g, gs))[0],
                                                           dequant(quant.from_fp8(u, us))[0]]), rtol=0, atol=0)


def test_fp8_bad_checkpoints_raise():
    weight, scale_inv = fp8_checkpoint(200, 300)
    with pytest.raises(ValueError, match=r"weight_scale_inv .* must have shape \(2, 3\) .*got \(2, 2\)"):
        quant.from_fp8(weight, scale_inv[:, :2])
    with pytest.raises(ValueError, match=r"weight_block_size must be \[128, 128\], got \[64, 64\]"):
        quant.from_fp8(weight, scale_inv, [64, 64])
    with pytest.raises(ValueError, match="weight must be float8_e4m3fn"):
        quant.from_fp8(weight.float(), scale_inv)


# ---- gpt-oss MXFP4: *_blocks + *_scales ----

def test_mxfp4_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    e, n, k = 3, 10, 96
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8)
    scales = torch.randint(118, 135, (e, n, k // 32), dtype=torch.uint8)
    w = quant.from_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]: the module's layout
    torch.testing.assert_close(dequant(w), theirs.transpose(1, 2), rtol=0, atol=0)


def test_mxfp4_gpt_oss_interleaved_gate_up_to_w13():
    e, n, k = 2, 8, 64
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8)
    scales = torch.randint(120, 130, (e, n, k // 32), dtype=torch.uint8)
    rows = dequant(quant.from_mxfp4(blocks, scales))
    w13 = dequant(quant.deinterleave_rows(quant.from_mxfp4(blocks, scales)))
    # gpt-oss: gate = gate_up[..., ::2], up = gate_up[..., 1::2] in its [E, H, 2I] layout
    torch.testing.assert_close(w13, torch.cat([rows[:, 0::2], rows[:, 1::2]], dim=1), rtol=0, atol=0)


def test_mxfp4_bad_checkpoints_raise():
    blocks = torch.zeros(2, 4, 3, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\*_scales must be uint8 \(2, 4, 3\)"):
        quant.from_mxfp4(blocks, torch.zeros(2, 4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\*_blocks must be uint8 \[E, N, K/32, 16\]"):
        quant.from_mxfp4(torch.zeros(2, 4, 3, 8, dtype=torch.uint8), torch.zeros(2, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cols = 20 needs 1 blocks of 32"):
        quant.from_mxfp4(blocks, torch.zeros(2, 4, 3, dtype=torch.uint8), cols=20)


# ---- GPTQ: qweight [K/8, N], qzeros [G, N/8], scales [G, N], g_idx ----

def gptq_checkpoint(n, k, group, v1=True):
    q = torch.randint(0, 16, (n, k))
    z = torch.randint(1, 16, (n, -(-k // group)))  # v1 stores z - 1: a zero of 0 cannot round-trip
    s = (torch.rand(n, -(-k // group)) + 0.1).half()
    qweight = pack_words(q.t().numpy(), 0)                       # along K
    qzeros = pack_words((z - 1 if v1 else z).t().numpy(), 1)     # along N
    g_idx = torch.arange(k, dtype=torch.int32) // group
    return q, z, s, qweight, qzeros, s.t().contiguous(), g_idx


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("v1", [True, False], ids=["gptq", "gptq_v2"])
def test_gptq_matches_its_definition(group, v1):
    n, k = 24, 256
    q, z, s, qweight, qzeros, scales, g_idx = gptq_checkpoint(n, k, group, v1)
    w = quant.from_gptq(qweight, qzeros, scales, g_idx, group_size=group, sym=False,
                        checkpoint_format="gptq" if v1 else "gptq_v2")
    expected = (q.float() - expand_groups(z, k, group).float()) * expand_groups(s, k, group).float()
    torch.testing.assert_close(dequant(w)[0], expected, rtol=0, atol=0)


def test_gptq_symmetric_has_no_zero_tensor():
    n, k = 16, 64
    q = torch.randint(0, 16, (n, k))
    s = torch.rand(2, n).half()
    w = quant.from_gptq(pack_words(q.t().numpy(), 0), pack_words(np.full((2, n), 7), 1), s, group_size=32)
    assert w.zero is None
    torch.testing.assert_close(dequant(w)[0], (q.float() - 8) * expand_groups(s.t(), k, 32).float())


def test_gptq_bad_checkpoints_raise():
    q, z, s, qweight, qzeros, scales, g_idx = gptq_checkpoint(16, 128, 32)
    with pytest.raises(ValueError, match="act-order"):
        quant.from_gptq(qweight, qzeros, scales, g_idx.flip(0), group_size=32)
    with pytest.raises(ValueError, match=r"scales must be float \[4, 16\]"):
        quant.from_gptq(qweight, qzeros, scales[:3], group_size=32)
    with pytest.raises(ValueError, match=r"qzeros must be int32 \[4, 2\]"):
        quant.from_gptq(qweight, qzeros[:, :1], scales, group_size=32)
    with pytest.raises(ValueError, match="bits must be 4"):
        quant.from_gptq(qweight, qzeros, scales, group_size=32, bits=8)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.from_gptq(qweight, qzeros, scales, group_size=16)


# ---- AWQ: qweight [K, N/8] and qzeros [G, N/8] in AWQ's order 0 2 4 6 1 3 5 7 ----

def awq_pack(columns):
    """[K, N] 4-bit values -> int32 [K, N/8] as AutoAWQ's GEMM packer writes them: word c holds column
    8c + order_map[i] at bits 4i, order_map = [0, 2, 4, 6, 1, 3, 5, 7]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    v = np.asarray(columns, dtype=np.uint32)
    words = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for c in range(v.shape[1] // 8):
        for i in range(8):
            words[:, c] |= v[:, 8 * c + order_map[i]] << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32))


def test_awq_matches_its_packing_order():
    n, k, group = 32, 128, 64
    q = torch.randint(0, 16, (n, k))
    z = torch.randint(0, 16, (n, k // group))
    s = torch.rand(k // group, n).half()
    w = quant.from_awq(awq_pack(q.t().numpy()), awq_pack(z.t().numpy()), s, group_size=group)
    expected = (q.float() - expand_groups(z, k, group).float()) * expand_groups(s.t(), k, group).float()
    torch.testing.assert_close(dequant(w)[0], expected, rtol=0, atol=0)
    # the plain order would be a different matrix: the test can tell the orders apart
    w_plain = quant.from_awq(pack_words(q.t().numpy(), 1), pack_words(z.t().numpy(), 1), s, group_size=group)
    assert not torch.equal(dequant(w_plain)[0], expected)


def test_awq_bad_checkpoints_raise():
    with pytest.raises(ValueError, match=r"scales must be float \[2, 16\]"):
        quant.from_awq(torch.zeros(64, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                       torch.zeros(2, 8).half(), group_size=32)


# ---- compressed-tensors pack-quantized: weight_packed, weight_scale, weight_zero_point, weight_shape ----

@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_pack_quantized(symmetric):
    n, k, group = 20, 100, 32  # K not a multiple of 8 or of the group; N not a multiple of 8
    q = torch.randint(-8, 8, (n, k))
    zp = torch.randint(-8, 8, (n, -(-k // group))) if not symmetric else torch.zeros(n, -(-k // group), dtype=torch.long)
    s = torch.rand(n, -(-k // group)).bfloat16()
    packed = pack_words((q + 8).numpy(), 1)           # stored unsigned: q + 8, along K
    zero = None if symmetric else pack_words((zp + 8).numpy(), 0)  # along N
    w = quant.from_compressed_tensors(packed, s, torch.tensor([n, k]), zero, group_size=group, symmetric=symmetric)
    expected = (q.float() - expand_groups(zp, k, group).float()) * expand_groups(s, k, group).float()
    torch.testing.assert_close(dequant(w)[0], expected, rtol=0, atol=0)
    assert (w.zero is None) == symmetric


def test_compressed_tensors_bad_checkpoints_raise():
    packed = torch.zeros(20, 13, dtype=torch.int32)
    with pytest.raises(ValueError, match="weight_packed must have 13 words per row for K = 100, got 12"):
        quant.from_compressed_tensors(packed[:, :12], torch.zeros(20, 4), torch.tensor([20, 100]), group_size=32)
    with pytest.raises(ValueError, match=r"weight_zero_point must be int32 \[3, 4\]"):
        quant.from_compressed_tensors(packed, torch.zeros(20, 4), torch.tensor([20, 100]),
                                      torch.zeros(2, 4, dtype=torch.int32), group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="num_bits must be 4"):
        quant.from_compressed_tensors(packed, torch.zeros(20, 4), torch.tensor([20, 100]), group_size=32, num_bits=8)


# ---- stacking, config detection, layout checks ----

def test_stack_experts_and_checks():
    q, z, s, qweight, qzeros, scales, g_idx = gptq_checkpoint(16, 64, 32, v1=False)
    one = quant.from_gptq(qweight, qzeros, scales, group_size=32, sym=False, checkpoint_format="gptq_v2")
    both = quant.stack_experts([one, one])
    assert both.qweight.shape == (2, 16, 32) and both.nbytes == 2 * one.nbytes
    with pytest.raises(ValueError, match="differs from weight 0"):
        quant.stack_experts([one, quant.quantize_int8(torch.randn(16, 64))[0]])
    with pytest.raises(ValueError, match=r"scale of format int4 with rows=16, cols=64, group_size=64 must have shape"):
        quant.check(quant.QuantWeight("int4", one.qweight, one.scale, None, 16, 64, 64))


@pytest.mark.parametrize("config, expected", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3", "activation_scheme": "dynamic"},
     {"format": "fp8_block", "group_size": 128}),
    ({"quant_method": "mxfp4"}, {"format": "mxfp4", "group_size": 32}),
    ({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True},
     {"format": "int4", "group_size": 64, "source": "gptq", "sym": True, "checkpoint_format": "gptq"}),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
     {"format": "int4", "group_size": 128, "source": "awq"}),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}}}},
     {"format": "int4", "group_size": 32, "source": "compressed-tensors", "symmetric": False}),
])
def test_quantization_scheme(config, expected):
    assert quant.quantization_scheme(config) == expected


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "quantization_config.weight_block_size must be [128, 128]"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "quantization_config.activation_scheme must be 'dynamic', got 'static'"),
    ({"quant_method": "gptq", "bits": 3}, "quantization_config.bits must be 4, got 3"),
    ({"quant_method": "gptq", "desc_act": True}, "quantization_config.desc_act must be false"),
    ({"quant_method": "awq", "group_size": 256}, "quantization_config.group_size must be one of (32, 64, 128), got 256"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"},
     "quantization_config.format must be 'pack-quantized', got 'float-quantized'"),
])
def test_unsupported_schemes_are_refused_naming_the_field(config, message):
    with pytest.raises(ValueError) as info:
        quant.quantization_scheme(config)
    assert message in str(info.value)
