"""A keras-hub Gemma model sharded with the layout map keras-hub ships.

    torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 \
        examples/keras_hub_backbone_model_parallel.py

keras-hub's backbones come with `get_layout_map(mesh)`, written for JAX;
on this fork it shards the same variables on torch. The backbone here is a
tiny randomly initialized Gemma (a preset loads the same way, with
`GemmaCausalLM.from_preset(...)` after `set_distribution`). It trains for
a few steps on synthetic token sequences, then generates greedily.
Needs keras-hub installed after the fork (see requirements-hub.txt).
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras  # noqa: E402

VOCAB = 64


def token_batches(count, length, seed):
    rng = np.random.default_rng(seed)
    start = rng.integers(1, VOCAB, size=(count, 1))
    tokens = ((start + np.arange(length + 1)) % (VOCAB - 1) + 1).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((count, length), "int32"),
    }
    return x, tokens[:, 1:]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=8,
    )
    causal_lm = keras_hub.models.GemmaCausalLM(
        backbone=backbone, preprocessor=None
    )
    keras.distribution.sharding_summary(causal_lm)
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )
    x, y = token_batches(64, 12, seed=1)
    causal_lm.fit(x, y, batch_size=8, epochs=args.epochs, shuffle=False)
    prompt = {
        "token_ids": np.array([[5, 6, 7, 0, 0, 0, 0, 0]], "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]], "int32"),
    }
    generated = causal_lm.generate(prompt, stop_token_ids=None)
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] generated {generated['token_ids'][0].tolist()}")


if __name__ == "__main__":
    main()
