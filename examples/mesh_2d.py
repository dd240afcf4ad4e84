"""Data and model parallelism together, on a (2, 2) mesh of 4 processes.

    torchrun --nproc-per-node 4 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 examples/mesh_2d.py

The "batch" axis splits each global batch in two; the "model" axis splits
the hidden layer's units in two. Each process holds a quarter of the work:
its half of the batch through its half of the hidden layer. Every process
prints the shape of the kernel shards it holds.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402


def main():
    devices = keras.distribution.list_devices()
    if len(devices) != 4:
        raise SystemExit(
            f"This example needs 4 processes; it runs on {len(devices)}. "
            "Launch it with `torchrun --nproc-per-node 4 ...`."
        )
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")  # split the hidden units
    layout_map["hidden/bias"] = ("model",)
    layout_map["out/kernel"] = ("model", None)  # and its inputs
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32,))
    hidden = layers.Dense(128, activation="relu", name="hidden")(inputs)
    outputs = layers.Dense(1, name="out")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 32)).astype("float32")
    y = np.sin(x[:, :1] * 2.0) + x[:, 1:2] ** 2
    model.fit(x, y, batch_size=32, epochs=3)

    rank = os.environ.get("RANK", "0")
    for layer in ("hidden", "out"):
        kernel = model.get_layer(layer).kernel
        local = tuple(kernel.value.to_local().shape)
        print(
            f"[rank {rank}] {layer}/kernel {tuple(kernel.shape)}: shard {local}"
        )
    print(f"[rank {rank}] final loss {model.evaluate(x, y, verbose=0):.4f}")


if __name__ == "__main__":
    main()
