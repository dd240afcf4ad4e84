"""Seed bug 3 and its class: ops mixing plain tensors and DTensors.

A kernel sharded on its output dimension meets plain inputs and constants
made by numpy, nn and math ops and by layers. Forward values and gradients
with respect to the kernel must equal the single-process run.
"""

import common
import numpy as np
import torch

import keras
from keras import ops


def _cases(x, ids, kernel):
    h = ops.matmul(x, kernel)
    odd = ops.cast(ops.arange(16) % 2, "float32")
    return {
        "matmul": h,
        "einsum": ops.einsum("bi,io->bo", x, kernel),
        "add_numpy_constant": ops.add(kernel, np.ones((8, 16), "float32")),
        "where": ops.where(kernel > 0, kernel, ops.zeros_like(kernel) - 1.0),
        "softmax": ops.softmax(h, axis=-1),
        "gelu": ops.gelu(h),
        "logsumexp": ops.logsumexp(kernel, axis=0),
        "cumsum": ops.cumsum(kernel, axis=1),
        "concatenate": ops.concatenate([kernel, ops.ones((8, 4))], axis=1),
        "one_hot_matmul": ops.matmul(ops.one_hot(ids, 8), kernel),
        "arange_mask": h * odd,
        "mean_std": ops.mean(kernel) + ops.std(kernel, axis=0),
        "clip": ops.clip(kernel, -0.1, 0.1),
        "norm": ops.norm(h, axis=-1),
        "layer_norm_layer": keras.layers.LayerNormalization(name="ln")(h),
        "transpose_reshape": ops.reshape(ops.transpose(kernel), (4, 32)),
        "max_argmax": ops.max(h, axis=-1)
        + ops.cast(ops.argmax(h, -1), "float32"),
    }


def _check_promotion_mechanism(x, kernel):
    """NOTE [promotion] and NOTE [fallback] in `dtensor_promotion`: what
    promotion costs and when it falls back, on this rank."""
    from torch.overrides import TorchFunctionMode

    from keras.src.backend.torch import dtensor_promotion
    from keras.src.backend.torch import dtensor_rules

    calls = {"dispatch": 0, "replicated": 0}
    dispatch, run_replicated = (
        dtensor_promotion._dispatch,
        dtensor_rules.run_replicated,
    )

    def counting_dispatch(*args):
        calls["dispatch"] += 1
        return dispatch(*args)

    def counting_run_replicated(*args):
        calls["replicated"] += 1
        return run_replicated(*args)

    dtensor_promotion._dispatch = counting_dispatch
    dtensor_rules.run_replicated = counting_run_replicated
    try:
        # No torch function mode stays on the stack, and plain-tensor code
        # never reaches the handler.
        assert torch._C._len_torch_function_stack() == 0
        plain = torch.ones(4, 8) * 2.0 + torch.arange(8.0)
        assert calls["dispatch"] == 0, calls
        # A user's mode entered and left does not take promotion away.
        with TorchFunctionMode():
            pass
        with torch.device("cpu"):
            ops.matmul(plain, kernel)
        assert calls["dispatch"] > 0, calls
        ops.matmul(x, kernel)
        # A shape error is raised as it is, never retried replicated.
        try:
            ops.matmul(x[:, :5], kernel)
        except RuntimeError as error:
            assert "must have same reduction dim" in str(error), error
        else:
            raise AssertionError("a (4, 5) x (8, 16) matmul ran")
        assert calls["replicated"] == 0, calls
        # An op DTensor cannot shard runs replicated, on purpose.
        repeated = torch.repeat_interleave(
            kernel.value, torch.full((8,), 2), dim=0
        )
        assert tuple(repeated.shape) == (16, 16)
        assert calls["replicated"] == 1, calls
    finally:
        dtensor_promotion._dispatch = dispatch
        dtensor_rules.run_replicated = run_replicated
    _check_gradient_writes(kernel)


def _check_gradient_writes(kernel):
    """`.grad` writes: None and DTensors go straight through the handler
    (`zero_grad` writes None for every parameter, every step); a plain
    tensor is still promoted to a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    from keras.src.backend.torch import dtensor_promotion

    scans = []
    scan = dtensor_promotion._scan

    def counting_scan(*args):
        scans.append(1)
        return scan(*args)

    parameter = kernel.value
    dtensor_promotion._scan = counting_scan
    try:
        parameter.grad = None
        assert parameter.grad is None
        grad = parameter.detach() * 2.0
        scans.clear()
        parameter.grad = grad
        assert parameter.grad is grad, type(parameter.grad)
        parameter.grad = None
        assert parameter.grad is None
        assert not scans, f"{len(scans)} scans for None and DTensor writes"
        parameter.grad = torch.ones(tuple(parameter.shape))
        assert scans, "a plain tensor written to .grad was not promoted"
        written = parameter.grad
        assert isinstance(written, DTensor), type(written)
        assert all(p.is_replicate() for p in written.placements), written
        np.testing.assert_array_equal(
            written.full_tensor().numpy(), np.ones(tuple(parameter.shape))
        )
    finally:
        dtensor_promotion._scan = scan
        parameter.grad = None


def main():
    args = common.parse_args()
    if common.is_distributed():
        mesh = keras.distribution.DeviceMesh(
            (1, common.WORLD_SIZE), ["batch", "model"]
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["dense/kernel"] = (None, "model")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    dense = keras.layers.Dense(16, name="dense")
    dense.build((None, 8))
    common.share_initial_weights(dense, args.init)
    (x_numpy,) = common.data(0, (4, 8))
    (ids,) = common.data(1, (4,), integer_high=8)
    # Plain tensors, exactly what the seed's `aten.mm` error was about.
    x = torch.as_tensor(x_numpy)
    ids = torch.as_tensor(ids)
    results = {}
    for name, output in _cases(x, ids, dense.kernel).items():
        loss = ops.sum(ops.square(output))
        (grad,) = torch.autograd.grad(
            loss, [dense.kernel.value], retain_graph=True
        )
        results[f"value:{name}"] = ops.convert_to_numpy(output)
        results[f"grad:{name}"] = ops.convert_to_numpy(grad)
    if common.is_distributed():
        _check_promotion_mechanism(x, dense.kernel)
    common.save_results(**results)


if __name__ == "__main__":
    main()
