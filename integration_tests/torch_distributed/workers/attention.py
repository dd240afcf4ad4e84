"""Attention with real padding and causal masks, one pass and `fit`.

Scenarios (each a model built from shared initial weights):
- `mask_zero`: `Embedding(mask_zero=True)` into `MultiHeadAttention`, on
  sequences whose last positions are padding (0).
- `explicit`: the same padding given as an `attention_mask`.
- `causal`: `use_causal_mask=True` with the padding mask.
- `causal_only`: `use_causal_mask=True` and no padding mask (the fused
  causal kernel).

Each records one pass's output and gradients and the weights and history
after `fit` on 51 samples in batches of 16 (the last batch of 3 rows is
uneven on 2 ranks). The distributed run builds its models inside
`with torch.device("cpu")`, a torch function mode a user may enter.
"""

import common
import numpy as np
import torch

import keras

SCENARIOS = ("mask_zero", "explicit", "causal", "causal_only")
SAMPLES, BATCH, LENGTH, VOCAB = 51, 16, 10, 40


def tokens():
    rng = np.random.default_rng(7)
    x = rng.integers(1, VOCAB, size=(SAMPLES, LENGTH))
    lengths = rng.integers(3, LENGTH + 1, size=SAMPLES)
    for row, length in enumerate(lengths):
        x[row, length:] = 0
    y = rng.normal(size=(SAMPLES, 4)).astype("float32")
    return x, y


def build(scenario):
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    mask_zero = scenario in ("mask_zero", "causal")
    h = keras.layers.Embedding(VOCAB, 16, mask_zero=mask_zero, name="emb")(ids)
    mha = keras.layers.MultiHeadAttention(2, 8, name="mha")
    if scenario == "explicit":
        valid = keras.ops.not_equal(ids, 0)
        mask = keras.ops.logical_and(valid[:, :, None], valid[:, None, :])
        h = mha(h, h, attention_mask=mask)
    else:
        h = mha(h, h, use_causal_mask=scenario.startswith("causal"))
    y = keras.layers.Dense(4, name="head")(
        keras.layers.GlobalAveragePooling1D()(h)
    )
    return keras.Model(ids, y)


def run(scenario, init):
    model = build(scenario)
    common.share_initial_weights(model, f"{init}-{scenario}.npz")
    x, y = tokens()
    results = {}
    out = model(common.shard_global_batch(x[:BATCH]))
    results["out"] = keras.ops.convert_to_numpy(out)
    loss_fn = keras.losses.MeanSquaredError()
    results.update(
        common.one_pass_gradients(model, loss_fn, x[:BATCH], y[:BATCH])
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False)
    results["history:loss"] = np.array(history.history["loss"])
    results.update(common.weights_dict(model))
    results["predict"] = model.predict(x, batch_size=BATCH)
    return {f"{scenario}/{k}": v for k, v in results.items()}


def main():
    args = common.parse_args({"--strategy": {"default": "data"}})
    keras.utils.set_random_seed(0)
    if common.is_distributed():
        if args.strategy == "data":
            distribution = keras.distribution.DataParallel()
        else:
            devices = keras.distribution.list_devices()
            shape = common.mesh_shape(args.mesh, (1, len(devices)))
            mesh = keras.distribution.DeviceMesh(
                shape, ["batch", "model"], devices
            )
            layout_map = keras.distribution.LayoutMap(mesh)
            layout_map["mha/(query|key|value)/kernel"] = (None, "model", None)
            layout_map["mha/attention_output/kernel"] = ("model", None, None)
            distribution = keras.distribution.ModelParallel(
                layout_map=layout_map
            )
        keras.distribution.set_distribution(distribution)
    results = {}
    for scenario in SCENARIOS:
        # A user's device context around building and training must not
        # take promotion away (NOTE [promotion]).
        with torch.device("cpu"):
            results.update(run(scenario, args.init))
    common.save_results(**results)


if __name__ == "__main__":
    main()
