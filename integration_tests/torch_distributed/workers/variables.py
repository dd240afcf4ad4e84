"""Variables under ModelParallel: shards, gathered values, replication.

Each rank seeds its generator differently on purpose: rank 0's draw must be
the one every rank ends up with.
"""

import common
import models
import numpy as np

import keras
from keras.src.backend.torch import dtensor_utils


def main():
    n = common.WORLD_SIZE
    # What rank 0 draws, built with no distribution (plain tensors).
    keras.utils.set_random_seed(1000 + common.RANK)
    plain = models.mlp()
    drawn = {v.path: keras.ops.convert_to_numpy(v) for v in plain.weights}

    mesh = keras.distribution.DeviceMesh((1, n), ["batch", "model"])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=models.mlp_layout_map(mesh))
    )
    keras.utils.set_random_seed(1000 + common.RANK)
    model = models.mlp()
    results = {}
    for v in model.weights:
        value = v.value
        assert dtensor_utils.is_dtensor(value), v.path
        # Copy: `.numpy()` shares memory, and training updates in place.
        results[f"local:{v.path}"] = value.to_local().detach().numpy().copy()
        results[f"full:{v.path}"] = keras.ops.convert_to_numpy(v)
        results[f"drawn:{v.path}"] = drawn[v.path]
        results[f"requires_grad:{v.path}"] = value.requires_grad

    # Seed bug 1: integer variables are never gradient-requiring params.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = common.data(0, (8, 8), (8, 4))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    iterations = model.optimizer.iterations
    assert not iterations.value.is_floating_point(), iterations.value.dtype
    results["iterations"] = keras.ops.convert_to_numpy(iterations)
    results["iterations_requires_grad"] = iterations.value.requires_grad
    counter = keras.Variable(np.arange(6, dtype="int32"), trainable=True)
    results["int_trainable_requires_grad"] = counter.value.requires_grad
    common.save_results(**results)


if __name__ == "__main__":
    main()
