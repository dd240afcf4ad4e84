"""Variables under ModelParallel: shards, gathered values, replication.

Each rank seeds its generator differently on purpose: replicated variables
must still end up with rank 0's draw, and sharded ones with shards drawn
from rank 0's seed.
"""

import common
import models
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import keras
from keras.src.backend.torch import dtensor_utils


class LargestTensor(TorchDispatchMode):
    """Record the most elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if dtensor_utils.is_dtensor(t):
                # A DTensor's memory is its local shard.
                t = t.to_local()
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def wide_layers(results):
    """Build wide Dense layers and record the largest tensor made."""
    for initializer in ["glorot_uniform", "he_normal", "random_normal"]:
        layer = keras.layers.Dense(
            512, kernel_initializer=initializer, name=f"wide_{initializer}"
        )
        with LargestTensor() as mode:
            layer.build((None, 256))
        kernel = layer.kernel.value
        results[f"largest:{initializer}"] = mode.numel
        results[f"local_numel:{initializer}"] = kernel.to_local().numel()
        results[f"wide:{initializer}"] = keras.ops.convert_to_numpy(kernel)


def main():
    n = common.WORLD_SIZE
    # What rank 0 draws, built with no distribution (plain tensors).
    keras.utils.set_random_seed(1000 + common.RANK)
    plain = models.mlp()
    drawn = {v.path: keras.ops.convert_to_numpy(v) for v in plain.weights}

    mesh = keras.distribution.DeviceMesh((1, n), ["batch", "model"])
    layout_map = models.mlp_layout_map(mesh)
    layout_map["wide_.*/kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    keras.utils.set_random_seed(1000 + common.RANK)
    model = models.mlp()
    results = {}
    wide_layers(results)
    replicated = keras.Variable(
        initializer="glorot_uniform", shape=(6, 4), name="replicated"
    )
    results["replicated"] = keras.ops.convert_to_numpy(replicated)
    for v in model.weights:
        value = v.value
        assert dtensor_utils.is_dtensor(value), v.path
        # Copy: `.numpy()` shares memory, and training updates in place.
        results[f"local:{v.path}"] = value.to_local().detach().numpy().copy()
        results[f"full:{v.path}"] = keras.ops.convert_to_numpy(v)
        results[f"drawn:{v.path}"] = drawn[v.path]
        results[f"requires_grad:{v.path}"] = value.requires_grad

    # Seed bug 1: integer variables are never gradient-requiring params.
    optimizer = keras.optimizers.Adam(0.1)
    model.compile(optimizer, "mse")
    x, y = common.data(0, (8, 8), (8, 4))
    # Not shuffled: each rank seeded its generator differently, so each
    # would shuffle differently, and every rank must see the same batches.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    # Adam's moments take their variable's layout: same placements, and
    # local shards of the same shape.
    for v in model.trainable_variables:
        index = optimizer._get_variable_index(v)
        for slot in (optimizer._momentums[index], optimizer._velocities[index]):
            assert slot.value.placements == v.value.placements, slot.path
            local = slot.value.to_local()
            assert local.shape == v.value.to_local().shape, slot.path
            results[f"slot_local_shape:{slot.path}"] = np.array(local.shape)
    iterations = model.optimizer.iterations
    assert not iterations.value.is_floating_point(), iterations.value.dtype
    results["iterations"] = keras.ops.convert_to_numpy(iterations)
    results["iterations_requires_grad"] = iterations.value.requires_grad
    counter = keras.Variable(np.arange(6, dtype="int32"), trainable=True)
    results["int_trainable_requires_grad"] = counter.value.requires_grad
    scalars(model, results)
    common.save_results(**results)


def scalars(model, results):
    """Scalars that need no gradient are plain tensors holding rank 0's
    value (NOTE [plain scalars]); trainable ones stay DTensors."""
    tracker = model._loss_tracker
    for name, variable in (
        ("iterations", model.optimizer.iterations),
        ("learning_rate", model.optimizer._learning_rate),
        ("loss_total", tracker.total),
        ("loss_count", tracker.count),
    ):
        assert not dtensor_utils.is_dtensor(variable.value), name
        results[f"scalar:{name}"] = keras.ops.convert_to_numpy(variable)
    # A different initial value on each rank: rank 0's is kept.
    own = keras.Variable(1.0 + common.RANK, trainable=False, name="own")
    assert not dtensor_utils.is_dtensor(own.value)
    results["scalar:own"] = keras.ops.convert_to_numpy(own)
    # A DTensor meets it: promoted, and the result is assigned back.
    own.assign(own + model.layers[-1].kernel[0, 0])
    assert not dtensor_utils.is_dtensor(own.value)
    results["scalar:own_after"] = keras.ops.convert_to_numpy(own)
    trainable = keras.Variable(2.0, name="temperature")
    assert dtensor_utils.is_dtensor(trainable.value)
    results["scalar_trainable_requires_grad"] = trainable.value.requires_grad


if __name__ == "__main__":
    main()
