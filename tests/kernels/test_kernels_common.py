"""lotus_kernels.kernels._common: the dot precision the Triton kernels compile with."""

import pytest
import torch

from lotus_kernels.kernels import _common


@pytest.fixture
def restore_fp32_precision():
    before = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interpret", [True, False])
def test_16_bit_inputs_always_get_tf32(monkeypatch, restore_fp32_precision, dtype, interpret):
    # For 16-bit operands the value is ignored by tl.dot; "tf32" is what the AOT-compile tests build with.
    monkeypatch.setattr(_common, "INTERPRET", interpret)
    for setting in ("highest", "high"):
        torch.set_float32_matmul_precision(setting)
        assert _common.input_precision(dtype) == "tf32"


def test_fp32_in_the_interpreter_is_exact_whatever_torch_allows(monkeypatch, restore_fp32_precision):
    # numpy has no TF32: asking for it there would only make the tests' bounds wrong.
    monkeypatch.setattr(_common, "INTERPRET", True)
    for setting in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(setting)
        assert _common.input_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("setting,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_on_gpu_follows_torch_matmul_precision(monkeypatch, restore_fp32_precision, setting, expected):
    # Compiled kernels do what torch's own fp32 matmuls would: switching a layer
    # between the dense and a Triton backend must not change its precision.
    monkeypatch.setattr(_common, "INTERPRET", False)
    torch.set_float32_matmul_precision(setting)
    assert _common.input_precision(torch.float32) == expected

