"""Every MoE family of the installed transformers whose experts go through its experts interface (found by
walking transformers.models, see families.py): a tiny random model of each gives the untouched model's greedy
tokens in float32 through offload and through load (from save_pretrained), under policies full, on_demand and
auto, and close logits in bfloat16. A family whose tiny model does not build or generate with transformers
alone is skipped with the reason; one moe_swap refuses is skipped with its refusal, which must name the module
and the attribute. transformers 4.x has no experts interface: the file skips (its six families are tested in
test_offload*.py).
"""

import math

import pytest

transformers = pytest.importorskip("transformers")

import families  # noqa: E402

FAMILIES = families.discover()
if not FAMILIES:
    pytest.skip(f"transformers {transformers.__version__} has no experts interface (families beyond the six "
                f"4.x ones are transformers 5.x only)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is faster than two contending for a busy 2-core machine
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.hf
@pytest.mark.parametrize("family", FAMILIES, ids=[f"{f.name}-{f.experts_class}" for f in FAMILIES])
def test_family_gives_the_untouched_models_tokens(family, tmp_path):
    result = families.check_family(family, str(tmp_path))
    if result.status == "not built":
        pytest.skip(f"{family.name}: tiny model not built {result.detail}")
    if result.status == "refused":
        # a refusal names the experts module and what moe_swap cannot compute
        assert any(attr in result.detail for attr in ("_apply_gate", "act_fn", "forward", "is_transposed"))
        pytest.skip(f"{family.name}: refused by moe_swap: {result.detail}")
    assert result.status == "same", f"{family.name}: tokens differ from the untouched model in {result.detail}"
    assert math.isfinite(result.bf16_error) and result.bf16_error <= 0.02, result.bf16_error


def test_discovery_finds_the_families_of_the_interface():
    names = {f.name for f in FAMILIES}
    # families whose experts transformers dispatches through the interface since it has one
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= names
    assert all(f.experts_class.endswith("Experts") for f in FAMILIES)
