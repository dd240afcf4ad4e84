"""A `LayoutMap` with a key that matches no variable: warned, on rank 0.

A Sequential model's paths are `sequential/dense/kernel`, so the key
`dense.*kernel` matches none of them and its kernels stay replicated,
while `.*dense.*bias` shards the biases. `fit`, `evaluate` and `predict`
each make a function; the unmatched key must be reported once in all.
`keras.distribution.sharding_summary` then shows what each key matched;
`model.summary()` prints on rank 0 only, and warnings name their process.
"""

import warnings

import common
import numpy as np

import keras


def main():
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["dense.*kernel"] = (None, "model")
    layout_map[".*dense.*bias"] = ("model",)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 4), "float32")
    y = np.ones((8, 2), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, verbose=0)
        model.evaluate(x, y, batch_size=4, verbose=0)
        model.predict(x, batch_size=4, verbose=0)
    messages = [
        str(w.message) for w in caught if "LayoutMap key" in str(w.message)
    ]
    for message in messages:
        print("warned:", message, flush=True)
    # Printed on rank 0 by default; returned on every rank.
    summary = keras.distribution.sharding_summary(model)
    model.summary()  # Printed on rank 0 only.
    formatted = warnings.formatwarning("probe", UserWarning, "f.py", 1)
    kernel = model.layers[0].kernel.value
    bias = model.layers[0].bias.value
    common.save_results(
        warnings=np.array(len(messages)),
        kernel_local=np.array(tuple(kernel.to_local().shape)),
        bias_local=np.array(tuple(bias.to_local().shape)),
        summary=np.array(summary),
        formatted_warning=np.array(formatted),
    )


if __name__ == "__main__":
    main()
