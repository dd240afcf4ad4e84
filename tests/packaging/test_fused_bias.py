"""`Dense` on torch adds its bias inside the product, with the same numbers.

`fused_bias.matmul_add` runs `torch.addmm` where that gives what
`ops.matmul` then `ops.add` give, and those two ops elsewhere. Each case
compares a layer's output and its gradients (inputs, kernel, bias) with
the same layer with the hook switched off, and checks which path ran.
"""

import os
from unittest import mock

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "torch":
    pytest.skip("needs KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402

import keras  # noqa: E402


def _run(layer, x):
    """`(output, d input, d kernel, d bias)` of a sum of squares."""
    x = x.detach().clone().requires_grad_(True)
    if not layer.built:
        layer.build(tuple(x.shape))
    layer.kernel.value.grad = None
    layer.bias.value.grad = None
    with mock.patch.object(torch, "addmm", wraps=torch.addmm) as addmm:
        y = layer(x)
    y.float().square().sum().backward()
    grads = [x.grad, layer.kernel.value.grad, layer.bias.value.grad]
    arrays = [t.detach().float().numpy() for t in [y, *grads]]
    return arrays, addmm.call_count


def _compare(layer, x, fused):
    got, calls = _run(layer, x)
    layer._backend_matmul_add = None
    expected, unfused_calls = _run(layer, x)
    del layer._backend_matmul_add
    assert unfused_calls == 0
    assert calls == (1 if fused else 0)
    names = ["output", "inputs", "kernel", "bias"]
    for name, a, b in zip(names, got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    return got


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "shape", [(5, 3), (2, 7, 3), (2, 2, 7, 3)], ids=["2d", "3d", "4d"]
)
def test_float_inputs_use_one_addmm(dtype, shape):
    layer = keras.layers.Dense(4, dtype=dtype)
    x = torch.randn(*shape, dtype=getattr(torch, dtype))
    out = _compare(layer, x, fused=True)[0]
    kernel = layer.kernel.value.detach().numpy()
    bias = layer.bias.value.detach().numpy()
    np.testing.assert_allclose(
        out, x.numpy() @ kernel + bias, rtol=1e-5, atol=1e-6
    )


def test_non_contiguous_inputs():
    layer = keras.layers.Dense(4)
    # (2, 7, 3) viewed from a (2, 3, 7) tensor.
    x = torch.randn(2, 3, 7).transpose(1, 2)
    assert not x.is_contiguous()
    _compare(layer, x, fused=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_two_ops(dtype):
    # Keras rounds the product before adding the bias (and computes
    # float16 on CPU in float32): fused, the numbers would change.
    layer = keras.layers.Dense(4, dtype=dtype)
    _compare(layer, torch.randn(2, 7, 3).to(getattr(torch, dtype)), False)


def test_mixed_precision_keeps_two_ops():
    layer = keras.layers.Dense(4, dtype="mixed_bfloat16")
    _compare(layer, torch.randn(2, 7, 3), fused=False)


def test_no_bias_and_activation():
    layer = keras.layers.Dense(4, use_bias=False)
    with mock.patch.object(torch, "addmm", wraps=torch.addmm) as addmm:
        y = layer(torch.randn(2, 3))
    assert addmm.call_count == 0
    assert tuple(y.shape) == (2, 4)
    layer = keras.layers.Dense(4, activation="relu")
    x = torch.randn(2, 7, 3)
    out = _compare(layer, x, fused=True)[0]
    assert out.min() >= 0


def test_symbolic_and_lora():
    inputs = keras.Input((7, 3))
    layer = keras.layers.Dense(4)
    assert tuple(layer(inputs).shape) == (None, 7, 4)
    layer.enable_lora(2)
    # LoRA's kernel is a tensor computed from the variables: still fused.
    x = torch.randn(2, 7, 3)
    with mock.patch.object(torch, "addmm", wraps=torch.addmm) as addmm:
        y = layer(x)
    assert addmm.call_count == 1
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    bias = layer.bias.value.detach().numpy()
    np.testing.assert_allclose(
        y.detach().numpy(), x.numpy() @ kernel + bias, rtol=1e-5, atol=1e-6
    )
