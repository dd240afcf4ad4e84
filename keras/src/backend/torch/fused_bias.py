"""`Dense`'s product and bias as one torch op.

Keras's `Dense` computes `ops.matmul(inputs, kernel)`, then
`ops.add(x, bias)`: on torch, a matrix product and then a second pass that
reads and writes all of its output again. In a transformer LM's forward
pass (an output layer of 8192 logits a position) those passes cost about
a quarter as much as the `Dense` products themselves
(benchmarks/README.md, "Dense's bias inside the product"). `torch.addmm`
adds the bias as it writes the product, as `torch.nn.Linear` does:
`matmul_add` uses it, through the `_backend_matmul_add` hook that the
torch backend's layer class gives `Dense`.

It does so only where the result is what Keras's two ops give, to
rounding: plain tensors (a DTensor goes through `matmul` and `add`, whose
sharding rules DTensor knows), a 2-D kernel and a 1-D bias, inputs of at
least 2 dimensions, and one dtype, float32 or float64. Keras rounds a
float16 or bfloat16 product before it adds the bias, and computes float16
products on CPU in float32; fused, those numbers would change, so they
keep the two ops, as do integer inputs, whose product Keras promotes.

Inputs of more than 2 dimensions are flattened to rows (a view when they
are contiguous, as `torch.matmul` does for them too), so the kernel's
gradient is computed as one contiguous product, as it is without fusion.
"""

import torch
from torch.distributed.tensor import DTensor

from keras.src.backend.torch.core import convert_to_tensor

_FUSED_DTYPES = (torch.float32, torch.float64)


def _fusable(inputs, kernel, bias):
    for x in (inputs, kernel, bias):
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return False
    return (
        kernel.ndim == 2
        and bias.ndim == 1
        and inputs.ndim >= 2
        and inputs.dtype in _FUSED_DTYPES
        and kernel.dtype == inputs.dtype
        and bias.dtype == inputs.dtype
    )


def matmul_add(inputs, kernel, bias):
    """`inputs @ kernel + bias`, in one `torch.addmm` where that gives
    Keras's numbers (see the module docstring), else with `ops.matmul` and
    `ops.add`.

    Args:
        inputs: The layer's inputs, `(..., input_dim)`.
        kernel: The kernel, `(input_dim, units)`: a variable or a tensor.
        bias: The bias, `(units,)`: a variable or a tensor.

    Returns:
        The tensor `(..., units)`.
    """
    if isinstance(inputs, torch.Tensor):
        kernel = convert_to_tensor(kernel)
        bias = convert_to_tensor(bias)
        if _fusable(inputs, kernel, bias):
            rows = inputs if inputs.ndim == 2 else inputs.flatten(0, -2)
            x = torch.addmm(bias, rows, kernel)
            if inputs.ndim == 2:
                return x
            return x.view(*inputs.shape[:-1], kernel.shape[-1])
    from keras.src import ops

    return ops.add(ops.matmul(inputs, kernel), bias)
