"""Train one small model with DataParallel and with ModelParallel.

Run on 2 CPU processes:

    torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 examples/distributed_demo.py

Each rank prints the shapes of the variable shards it holds and, for every
epoch, the distributed loss beside the loss of the same model trained in a
single process from the same initial weights. It exits non-zero if they
differ by more than 1e-5 (relative).
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
TOLERANCE = 1e-5


def say(text):
    # One write per line, so lines of different ranks do not interleave.
    sys.stdout.write(f"[rank {RANK}] {text}\n")
    sys.stdout.flush()


def build_model():
    inputs = keras.Input((16,))
    x = layers.Dense(64, activation="relu", name="hidden")(inputs)
    x = layers.Dense(64, activation="relu", name="hidden2")(x)
    outputs = layers.Dense(4, name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def make_data():
    rng = np.random.default_rng(0)  # Same data on every rank.
    x = rng.normal(size=(200, 16)).astype("float32")
    y = (x[:, :4] * 2.0 + x[:, 4:8] ** 2).astype("float32")
    return x, y


def train(model, x, y):
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    return history.history["loss"]


def describe_shards(model):
    for variable in model.trainable_variables:
        value = variable.value
        local = value.to_local() if hasattr(value, "to_local") else value
        placements = getattr(value, "placements", "plain tensor")
        say(
            f"  {variable.path:<16} global {tuple(variable.shape)!s:<10} "
            f"local {tuple(local.shape)!s:<10} {placements}"
        )


def run(name, distribution, initial_weights, reference_losses, x, y):
    keras.distribution.set_distribution(distribution)
    model = build_model()
    model.set_weights(initial_weights)
    say(f"{name}: variable shards on this rank")
    describe_shards(model)
    losses = train(model, x, y)
    keras.distribution.set_distribution(None)
    worst = 0.0
    for epoch, (ours, single) in enumerate(zip(losses, reference_losses)):
        relative = abs(ours - single) / abs(single)
        worst = max(worst, relative)
        say(
            f"{name} epoch {epoch + 1}: loss {ours:.6f}  single process "
            f"{single:.6f}  relative difference {relative:.1e}"
        )
    return worst


def main():
    x, y = make_data()
    keras.utils.set_random_seed(42)
    reference = build_model()
    initial_weights = reference.get_weights()
    # The single-process reference, trained here before any distribution is
    # set: plain tensors, the whole batch, one process.
    reference_losses = train(reference, x, y)

    devices = keras.distribution.list_devices()
    say(f"devices: {devices}")
    worst = run(
        "DataParallel",
        keras.distribution.DataParallel(devices=devices),
        initial_weights,
        reference_losses,
        x,
        y,
    )
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")
    layout_map["hidden/bias"] = ("model",)
    layout_map["hidden2/kernel"] = ("model", None)
    layout_map["out/kernel"] = (None, None)
    worst = max(
        worst,
        run(
            "ModelParallel",
            keras.distribution.ModelParallel(layout_map=layout_map),
            initial_weights,
            reference_losses,
            x,
            y,
        ),
    )
    verdict = "OK" if worst <= TOLERANCE else "MISMATCH"
    say(f"{verdict}: worst relative difference {worst:.1e}")
    if worst > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
