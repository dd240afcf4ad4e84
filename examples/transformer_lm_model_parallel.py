"""A small transformer language model with `ModelParallel`.

    torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 \
        examples/transformer_lm_model_parallel.py --epochs 2

The model's variables are split over the "model" axis of a (1, N) mesh as
Megatron-style tensor parallelism splits them: the attention heads and the
feed-forward layer's hidden units are divided between the processes, and
the token embedding's columns too. The task is synthetic: each sequence
counts up by a fixed step, modulo the vocabulary, so the next token is
predictable from the previous two. `keras.distribution.sharding_summary`
prints what the layout map did.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402

VOCAB, LENGTH, WIDTH, HEADS = 64, 16, 64, 4


def sequences(count, seed):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCAB, size=(count, 1))
    step = rng.integers(1, 4, size=(count, 1))
    tokens = (start + step * np.arange(LENGTH + 1)) % VOCAB
    return tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")


class AddPositions(layers.Layer):
    """Adds a learned embedding of each position."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )

    def call(self, x):
        return x + self.positions


def build_model():
    tokens = keras.Input((LENGTH,), dtype="int32")
    x = layers.Embedding(VOCAB, WIDTH, name="embed")(tokens)
    x = AddPositions(name="position")(x)
    for i in range(2):
        attended = layers.MultiHeadAttention(
            HEADS, WIDTH // HEADS, name=f"attn{i}"
        )(x, x, use_causal_mask=True)
        x = layers.LayerNormalization(name=f"norm{i}a")(x + attended)
        hidden = layers.Dense(4 * WIDTH, activation="gelu", name=f"up{i}")(x)
        x = layers.LayerNormalization(name=f"norm{i}b")(
            x + layers.Dense(WIDTH, name=f"down{i}")(hidden)
        )
    logits = layers.Dense(VOCAB, name="head")(x)
    return keras.Model(tokens, logits)


def layout_map(mesh):
    """Megatron-style: heads and hidden units split over "model"."""
    m = "model"
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["embed/embeddings"] = (None, m)
    layouts[r"attn\d/(query|key|value)/kernel"] = (None, m, None)
    layouts[r"attn\d/(query|key|value)/bias"] = (m, None)
    layouts[r"attn\d/attention_output/kernel"] = (m, None, None)
    layouts[r"up\d/kernel"] = (None, m)
    layouts[r"up\d/bias"] = (m,)
    layouts[r"down\d/kernel"] = (m, None)
    return layouts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map(mesh))
    )
    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = sequences(args.samples, seed=1)
    model.fit(x, y, batch_size=32, epochs=args.epochs)
    keras.distribution.sharding_summary(model)
    loss, accuracy = model.evaluate(*sequences(64, seed=2), verbose=0)
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] next-token loss {loss:.4f}, accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
