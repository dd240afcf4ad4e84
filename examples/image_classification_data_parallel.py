"""Image classification with `DataParallel`, on synthetic images.

    torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 \
        examples/image_classification_data_parallel.py --epochs 3

Every process reads the same dataset; each batch of 32 is the global batch,
split across the processes, and the numbers are one process's. The images
are 16x16 noise whose class (one of 4) sets which colour channel is
brighter, so a small CNN learns it in a few epochs.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402

CLASSES = 4


def synthetic_images(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    images = rng.normal(size=(count, 16, 16, 3)).astype("float32")
    # Class c brightens channel c % 3, in the left or the right half.
    for c in range(CLASSES):
        rows = labels == c
        half = slice(0, 8) if c < 3 else slice(8, 16)
        images[rows, :, half, c % 3] += 1.5
    return images, labels


def build_model():
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(CLASSES),
        ]
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)  # The same weights on every process.
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y = synthetic_images(args.samples, seed=1)
    x_test, y_test = synthetic_images(128, seed=2)

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=args.epochs, validation_split=0.2)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=32, verbose=0)
    # `print` runs on every process (the same numbers on each); Keras's own
    # output (the progress bar) is process 0's.
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] test loss {loss:.4f}, accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
