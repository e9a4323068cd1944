"""fused_moe_quant against the oracle (reference dequantization + the float reference), every format and CPU
build; opcheck and torch.compile; bad quantized inputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_swap
from moe_swap import quant, reference
from moe_swap.ops import fused_moe_quant

FORMATS = quant.FORMATS
TOKEN_COUNTS = (0, 1, 7, 64, 333)


def random_quant(fmt, e, n, k, *, group=32, zero=False, scale_dtype=torch.float32, segments=1):
    """A seeded random expert matrix in ``fmt``'s layout: every byte pattern a checkpoint can hold (fp8 without
    its NaN codes), scales that keep the weights near 1/sqrt(k)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    mag = 1.0 / k ** 0.5
    if fmt == "fp8_block":
        b = torch.randint(0, 256, (e, n, k), dtype=torch.uint8)
        b = torch.where((b & 0x7F) == 0x7F, b ^ 1, b)
        rows = segments * cdiv(n // segments, 128)
        scale = (torch.rand(e, rows, cdiv(k, 128)) + 0.5) * mag / 64
        return quant.check(quant.QuantWeight(fmt, b.view(torch.float8_e4m3fn), scale, None, n, k, 128, segments))
    if fmt == "mxfp4":
        q = torch.randint(0, 256, (e, n, cdiv(k, 32) * 16), dtype=torch.uint8)
        scale = torch.randint(121, 126, (e, n, cdiv(k, 32)), dtype=torch.uint8)
        return quant.check(quant.QuantWeight(fmt, q, scale, None, n, k, 32))
    if fmt == "int4":
        q = torch.randint(0, 256, (e, n, cdiv(k, 2)), dtype=torch.uint8)
        scale = ((torch.rand(e, n, cdiv(k, group)) + 0.5) * mag / 6).to(scale_dtype)
        z = torch.randint(0, 17, scale.shape, dtype=torch.uint8) if zero else None
        return quant.check(quant.QuantWeight(fmt, q, scale, z, n, k, group))
    q = torch.randint(-128, 128, (e, n, k), dtype=torch.int8)
    return quant.check(quant.QuantWeight(fmt, q, (torch.rand(e, n) + 0.5) * mag / 64, None, n, k, k))


def layer(fmt, hidden, inter, experts, *, gated=True, **kw):
    w13 = random_quant(fmt, experts, (2 if gated else 1) * inter, hidden, segments=2 if gated else 1, **kw)
    w2 = random_quant(fmt, experts, hidden, inter, **kw)
    return w13, w2


def run_both(x, w13, w2, weights, ids, **options):
    group = w13.group_size if w13.format == "int4" else 0
    args = (x, *w13.kernel_args()[:2], *w2.kernel_args()[:2], weights, ids, w13.format, group, w13.zero, w2.zero)
    return fused_moe_quant(*args, **options), reference.fused_moe_quant(*args, **options)


def routing(t, e_global, k):
    ids = torch.stack([torch.randperm(e_global)[:k] for _ in range(t)]).int() if t else torch.zeros(0, k, dtype=torch.int32)
    return torch.rand(t, k), ids


@pytest.mark.parametrize("t", TOKEN_COUNTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_token_count_against_reference(fmt, t):
    # H = 200, I = 75: neither a multiple of 128 (fp8 blocks), 32 (mxfp4, int4 groups) nor even (int4 bytes)
    hidden, inter, experts, k = 200, 75, 6, 2
    w13, w2 = layer(fmt, hidden, inter, experts)
    x = torch.randn(t, hidden)
    weights, ids = routing(t, experts, k)
    out, ref = run_both(x, w13, w2, weights, ids)
    assert out.shape == (t, hidden)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [7, 64])  # in-register decoding; dequantized row tiles
def test_options_map_biases_activations_ungated_bf16(fmt, t):
    hidden, inter, experts, k, e_global = 96, 40, 5, 2, 8
    for n, (activation, gated) in enumerate([("silu", True), ("swiglu_clamp", True), ("gelu", False),
                                             ("silu_clamp", True), ("relu2", False)]):
        dtype = torch.bfloat16 if n % 2 else torch.float32
        w13, w2 = layer(fmt, hidden, inter, experts, gated=gated)
        x = torch.randn(t, hidden).to(dtype)
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(e_global)[:experts]] = torch.randperm(experts, dtype=torch.int32)
        weights, ids = routing(t, e_global, k)
        options = dict(expert_map=expert_map, activation=activation, gated=gated, swiglu_limit=1.5,
                       w13_bias=(torch.randn(e_global, w13.rows) / 4).to(dtype),
                       w2_bias=(torch.randn(e_global, hidden) / 4).to(dtype))
        out, ref = run_both(x, w13, w2, weights, ids.long() if n == 2 else ids, **options)
        tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{activation}: {m}")


@pytest.mark.parametrize("group", quant.INT4_GROUP_SIZES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [False, True], ids=["symmetric", "zero-points"])
def test_int4_groups_scale_dtypes_zero_points(group, scale_dtype, zero):
    hidden, inter, experts = 301, 130, 4
    w13, w2 = layer("int4", hidden, inter, experts, group=group, zero=zero, scale_dtype=scale_dtype)
    for t, dtype in ((3, torch.float32), (40, torch.float32), (5, torch.bfloat16)):  # bf16: vdpbf16ps where the CPU has it
        x = torch.randn(t, hidden).to(dtype)
        weights, ids = routing(t, experts, 2)
        out, ref = run_both(x, w13, w2, weights, ids)
        tol = 2e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_special_codes_follow_the_reference():
    # fp8 NaN codes, e8m0 255 (NaN) and 0 (2^-127): the kernel's value is the reference's
    hidden, inter = 64, 32
    w13, w2 = layer("fp8_block", hidden, inter, 2)
    w13.qweight.view(torch.uint8)[0, 3, 5] = 0x7F
    x = torch.randn(2, hidden)
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    out, ref = run_both(x, w13, w2, torch.ones(2, 1), ids)
    assert out[0].isnan().all() and not out[1].isnan().any()
    torch.testing.assert_close(out[1], ref[1], atol=2e-4, rtol=2e-4)
    m13, m2 = layer("mxfp4", hidden, inter, 2)
    m13.scale[1, 0, 0] = 0
    m13.scale[0, 2, 1] = 255
    out, ref = run_both(x, m13, m2, torch.ones(2, 1), ids)
    assert out[0].isnan().all()
    torch.testing.assert_close(out[1], ref[1], atol=2e-4, rtol=2e-4)


def test_quantize_from_float_then_kernel():
    hidden, inter, experts = 160, 72, 3
    w13_f = torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5
    w2_f = torch.randn(experts, hidden, inter) / inter ** 0.5
    x = torch.randn(9, hidden)
    weights, ids = routing(9, experts, 2)
    float_out = reference.fused_moe(x, w13_f, w2_f, weights, ids)
    for name, fn, bound in (("int8", quant.quantize_int8, 0.01), ("int4", quant.quantize_int4, 0.2),
                            ("fp8", quant.quantize_fp8_block, 0.05)):
        kwargs = {"segments": 2} if name == "fp8" else {}
        w13, err13 = fn(w13_f, **kwargs)
        w2, err2 = fn(w2_f)
        assert 0 < err13["rel_rms"] < bound and 0 < err2["rel_rms"] < bound, (name, err13, err2)
        out, ref = run_both(x, w13, w2, weights, ids)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        rel = float((out - float_out).norm() / float_out.norm())
        assert rel < 2 * bound, (name, rel)
    w, err = quant.quantize_int4(w2_f, group_size=64, symmetric=False)
    assert w.zero is not None and err["rel_rms"] < 0.15


# ---- opcheck, torch.compile ----

def _samples():
    for fmt in FORMATS:
        w13, w2 = layer(fmt, 48, 20, 3, zero=fmt == "int4")
        weights, ids = routing(5, 3, 2)
        yield (torch.randn(5, 48), *w13.kernel_args()[:2], *w2.kernel_args()[:2], weights, ids, fmt,
               32 if fmt == "int4" else 0, w13.zero, w2.zero)


def test_opcheck():
    for args in _samples():
        # test_schema compares inputs before and after with arithmetic torch lacks for float8 on the CPU
        utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
                 if not (args[7] == "fp8_block" and u == "test_schema")]
        torch.library.opcheck(torch.ops.moe_swap.fused_moe_quant.default, args, {"activation": "gelu"},
                              test_utils=utils)


def test_torch_compile_fullgraph():
    for args in _samples():
        fmt = args[7]
        if fmt not in ("int4", "fp8_block"):  # the fake kernel does not depend on the format; compiles cost 4 s each
            continue

        def step(x, a=args):
            return torch.ops.moe_swap.fused_moe_quant(x, *a[1:]) * 2

        compiled = torch.compile(step, fullgraph=True)
        for _ in range(2):
            x = torch.randn(5, 48)
            torch.testing.assert_close(compiled(x), step(x), atol=1e-5, rtol=1e-5, msg=lambda m: f"{fmt}: {m}")


# ---- bad quantized inputs ----

def _good_int4():
    w13, w2 = layer("int4", 64, 32, 2, zero=True)
    weights, ids = routing(3, 2, 1)
    return dict(hidden_states=torch.randn(3, 64), w13=w13.qweight, w13_scale=w13.scale, w2=w2.qweight,
                w2_scale=w2.scale, topk_weights=weights, topk_ids=ids, format="int4", group_size=32,
                w13_zero=w13.zero, w2_zero=w2.zero)


@pytest.mark.parametrize("change, exc, message", [
    (dict(format="int3"), ValueError, "format must be 'fp8_block', 'mxfp4', 'int4' or 'int8', got 'int3'"),
    (dict(group_size=48), ValueError, "group_size must be 32, 64 or 128 for format 'int4', got 48"),
    (dict(group_size=64), RuntimeError, "w13_scale (int4: one per group) must have shape [2, 64, 1]"),
    (dict(w13=torch.zeros(2, 64, 33, dtype=torch.uint8)), RuntimeError, "w13 (int4) must have shape [2, 64, 32]"),
    (dict(w13=torch.zeros(2, 64, 32, dtype=torch.int8)), RuntimeError, "w13 (int4) must have dtype Byte"),
    (dict(w2_scale=torch.ones(2, 64, 2)), RuntimeError, "w2_scale (int4: one per group) must have shape [2, 64, 1]"),
    (dict(w2_zero=torch.zeros(2, 64, 2, dtype=torch.uint8)), RuntimeError, "w2_zero must have the shape of w2_scale"),
    (dict(w13_scale=torch.ones(2, 64, 2, dtype=torch.int32)), RuntimeError, "w13_scale (int4) must be float32"),
    (dict(format="int8", group_size=0), RuntimeError, "w13 (int8) must have shape [2, 64, 64]"),
])
def test_bad_quantized_inputs_raise_clearly(change, exc, message):
    args = {**_good_int4(), **change}
    with pytest.raises(exc) as info:
        fused_moe_quant(**args)
    assert message in str(info.value), str(info.value)


def test_bad_format_specific_inputs():
    w13, w2 = layer("fp8_block", 200, 75, 2)
    weights, ids = routing(2, 2, 1)
    base = (torch.randn(2, 200), w13.qweight, w13.scale, w2.qweight, w2.scale, weights, ids, "fp8_block")
    fused_moe_quant(*base)
    with pytest.raises(RuntimeError, match=r"w13_scale \(fp8_block: one per 128x128 block\) must have shape \[2, 2, 2\]"):
        fused_moe_quant(*base[:2], w13.scale[:, :1], *base[3:])
    with pytest.raises(ValueError, match=r"group_size must be 0 or 128 for format 'fp8_block' \(128x128 blocks\), got 64"):
        fused_moe_quant(*base, 64)
    with pytest.raises(ValueError, match="w13_zero: only format 'int4' has zero points"):
        fused_moe_quant(*base, 0, torch.zeros(2, 2, 2, dtype=torch.uint8))
    m13, m2 = layer("mxfp4", 200, 75, 2)
    with pytest.raises(RuntimeError, match=r"w2 \(mxfp4\) must have shape \[2, 200, 48\]"):
        fused_moe_quant(torch.randn(2, 200), m13.qweight, m13.scale, m2.qweight[..., :40], m2.scale, weights, ids,
                        "mxfp4")
    with pytest.raises(RuntimeError, match=r"w13_scale \(mxfp4\) must have dtype Byte"):
        fused_moe_quant(torch.randn(2, 200), m13.qweight, m13.scale.float(), m2.qweight, m2.scale, weights, ids, "mxfp4")
    with pytest.raises(RuntimeError, match=r"topk_ids\[1, 0\] = 7 is out of range"):
        fused_moe_quant(torch.randn(2, 200), m13.qweight, m13.scale, m2.qweight, m2.scale, weights,
                        torch.tensor([[0], [7]], dtype=torch.int32), "mxfp4")


# ---- every CPU build, in a fresh process (the build is chosen once per process) ----

_EVERY_BUILD_SCRIPT = """
    import sys
    sys.path.insert(0, {tests!r})  # this file's helpers (the sanitizer run imports nothing from the cwd)
    import torch, moe_swap
    from test_fused_moe_quant import layer, run_both, routing
    assert moe_swap.ops.cpu_kernel_build() == {build!r}, moe_swap.ops.cpu_kernel_build()
    torch.manual_seed(0)
    # depths that leave every remainder of the 8/16-lane steps, rows that leave 1-3 after the 4-row blocks,
    # token counts that leave each remainder of the token groups, both sides of the buffered-rows limit
    cases = [(1, 37, 29, 3, 2), (3, 130, 41, 4, 2), (6, 64, 23, 2, 2), (13, 97, 50, 3, 3), (40, 31, 9, 2, 1)]
    for fmt in moe_swap.quant.FORMATS:
        for n, (t, h, i, e, k) in enumerate(cases):
            gated = n % 2 == 0
            w13, w2 = layer(fmt, h, i, e, gated=gated, zero=n % 3 == 0, group=(32, 64, 128)[n % 3])
            x = torch.randn(t, h).to(torch.bfloat16 if n == 2 else torch.float32)
            weights, ids = routing(t, e, k)
            out, ref = run_both(x, w13, w2, weights, ids, gated=gated, activation="silu" if gated else "gelu")
            tol = 3e-2 if n == 2 else 2e-4
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"{{fmt}} case {{n}}: {{m}}")
    print("ok")
"""


@pytest.mark.parametrize("build", ["avx512_bf16", "avx512", "avx2", "generic"])
def test_every_cpu_build_against_reference(build):
    if build not in moe_swap.ops.cpu_kernel_builds():
        pytest.skip(f"this CPU does not run the {build} build (it runs {moe_swap.ops.cpu_kernel_builds()})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_EVERY_BUILD_SCRIPT.format(build=build, tests=os.path.dirname(os.path.abspath(__file__))))], cwd=root,
                            env={**os.environ, "MOE_SWAP_CPU_KERNELS": build}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---- CUDA (never run on this project's machines yet: these run where a GPU is present) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 7, 64, 333])
def test_cuda_against_reference(fmt, t, debug_off):
    hidden, inter, experts, k, e_global = 200, 75, 6, 2, 9
    for n, (activation, gated, dtype) in enumerate([("silu", True, torch.float32), ("swiglu_clamp", True, torch.bfloat16),
                                                    ("gelu", False, torch.float16)]):
        w13, w2 = layer(fmt, hidden, inter, experts, gated=gated, zero=n == 1, scale_dtype=torch.bfloat16 if n else torch.float32)
        x = torch.randn(t, hidden).to(dtype)
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(e_global)[:experts]] = torch.randperm(experts, dtype=torch.int32)
        weights, ids = routing(t, e_global, k)
        options = dict(expert_map=expert_map, activation=activation, gated=gated,
                       w13_bias=(torch.randn(e_global, w13.rows) / 4).to(dtype), w2_bias=(torch.randn(e_global, hidden) / 4).to(dtype))
        group = w13.group_size if fmt == "int4" else 0
        args = (x, w13.qweight, w13.scale, w2.qweight, w2.scale, weights, ids, fmt, group, w13.zero, w2.zero)
        ref = reference.fused_moe_quant(*args, **options)
        cuda = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
        moe_swap.set_debug(True)
        try:
            out = fused_moe_quant(*map(cuda, args), **{key: cuda(v) for key, v in options.items()})
        finally:
            moe_swap.set_debug(False)
        tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        torch.testing.assert_close(out.cpu().float(), ref.float(), atol=tol, rtol=tol,
                                   msg=lambda m: f"{fmt} T={t} {activation} {dtype}: {m}")
