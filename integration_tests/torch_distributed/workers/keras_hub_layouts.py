"""keras-hub's own layout maps (Gemma, Llama, Qwen) under ModelParallel.

For each model, a tiny backbone is built under the `LayoutMap` keras-hub
ships for JAX (`Backbone.get_layout_map(mesh)`) and wrapped in its
`CausalLM` task without a preprocessor, then used as a keras-hub user
would: an eager call of the backbone and one forward/backward pass on the
first batch (gradients reduced as the optimizer receives them), `fit` on
padded sequences with `sample_weight`, `predict` and greedy `generate`.
The reference (a plain process, no distribution) saves each model's
initial weights to `<--init>/<model>.npz`; the distributed run loads them.

The distributed run also records, for every variable, its global shape,
its local shard's shape and the layout the map gave it, and for every key
of the map the variables it matched (`re.fullmatch`, as `LayoutMap` does).
"""

import re
from pathlib import Path

import common
import keras_hub
import numpy as np

import keras
from keras.src.backend.torch import distributed_gradients

VOCAB = 64
BATCH = 4
CONFIG = {
    "vocabulary_size": VOCAB,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 32,
    "intermediate_dim": 64,
}
MODELS = {
    "gemma": ("GemmaBackbone", "GemmaCausalLM", {"head_dim": 8}),
    "llama": ("LlamaBackbone", "LlamaCausalLM", {}),
    "qwen": ("QwenBackbone", "QwenCausalLM", {}),
}


def _training_data():
    """8 sequences of 9 tokens, some padded, as next-token targets."""
    (tokens,) = common.data(0, (8, 9), integer_high=VOCAB)
    lengths = np.array([9, 9, 6, 9, 4, 9, 7, 9])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype("int32")
    tokens = (tokens * mask).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": mask[:, :-1]}
    return x, tokens[:, 1:], mask[:, 1:].astype("float32")


def _prompts():
    """4 prompts of 3 to 6 tokens, padded to the generation length 8.

    The ranks of a (2, 2) mesh's batch axis hold prompts of different
    shortest lengths (4 and 3): sampling starts at the global shortest.
    """
    (tokens,) = common.data(1, (4, 8), integer_high=VOCAB)
    lengths = np.array([4, 6, 3, 5])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype("int32")
    return {"token_ids": (tokens * mask).astype("int32"), "padding_mask": mask}


def _shard(structure):
    return keras.tree.map_structure(common.shard_global_batch, structure)


def _layout_report(name, layout_map, model, mesh_shape):
    """Record shard shapes and which layout key matched which variable."""
    results = {}
    rows = []
    keys = list(layout_map.keys())
    matched = {key: [] for key in keys}
    for variable in model.weights:
        value = variable.value
        local = value.to_local() if hasattr(value, "to_local") else value
        layout = layout_map[variable.path]
        axes = layout.axes if layout is not None else ()
        for key in keys:
            if re.fullmatch(key, variable.path):
                matched[key].append(variable.path)
        path = variable.path
        results[f"{name}:global_shape:{path}"] = variable.shape
        results[f"{name}:local_shape:{path}"] = tuple(local.shape)
        results[f"{name}:axes:{path}"] = np.array(
            [str(axis) for axis in axes], dtype=str
        )
        rows.append(
            f"  {variable.path:<58} {str(tuple(variable.shape)):<13} "
            f"{str(tuple(local.shape)):<13} {axes}"
        )
    for index, key in enumerate(keys):
        results[f"{name}:layout_key:{index}"] = np.array(key)
        results[f"{name}:layout_matched:{index}"] = np.array(
            matched[key], dtype=str
        )
    if common.RANK == 0:
        print(
            f"{name} on mesh {mesh_shape}: path, global shape, local shape, "
            "layout\n" + "\n".join(rows),
            flush=True,
        )
    return results


def run_model(name, init_dir, mesh_shape):
    """Build, call, train and sample one model; return its results."""
    backbone_name, task_name, extra = MODELS[name]
    backbone_cls = getattr(keras_hub.models, backbone_name)
    task_cls = getattr(keras_hub.models, task_name)
    layout_map = None
    if common.is_distributed():
        mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"])
        layout_map = backbone_cls.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    backbone = backbone_cls(**CONFIG, **extra)
    task = task_cls(backbone=backbone, preprocessor=None)
    common.share_initial_weights(task, Path(init_dir) / f"{name}.npz")
    results = common.weights_dict(task, prefix=f"{name}:init")
    if layout_map is not None:
        results.update(_layout_report(name, layout_map, task, mesh_shape))

    x, y, sample_weight = _training_data()
    # The first batch `fit` trains on: DTensor chooses each op's sharding
    # once per shape, which is slow on a 2-D mesh; `fit` then reuses it.
    first = _shard(keras.tree.map_structure(lambda a: a[:BATCH], (x, y)))
    first_weight = common.shard_global_batch(sample_weight[:BATCH])
    forward = backbone(first[0])
    results[f"{name}:forward"] = keras.ops.convert_to_numpy(forward)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    logits = task(first[0])
    loss = loss_fn(first[1], logits, sample_weight=first_weight)
    loss.backward()
    variables = task.trainable_variables
    grads = distributed_gradients.reduce_gradients(
        [v.value.grad for v in variables]
    )
    for variable, grad in zip(variables, grads):
        assert grad is not None, f"{name}: no gradient for {variable.path}"
        results[f"{name}:grad:{variable.path}"] = keras.ops.convert_to_numpy(
            grad
        )
    results[f"{name}:loss"] = keras.ops.convert_to_numpy(loss)
    task.zero_grad()

    # SGD, not Adam: Adam divides each gradient element by its own running
    # magnitude, so rounding differences in elements far below the largest
    # (sums taken in another order: per-rank partial sums, then all-reduced)
    # become visible steps. Measured with Adam(0.01): gradients within
    # 1.4e-6, weights 1.5e-4 apart after 4 steps. SGD keeps the weights as
    # close as the gradients.
    task.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=loss_fn,
        weighted_metrics=["sparse_categorical_accuracy"],
        sampler="greedy",
    )
    history = task.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
    ).history
    for key, values in history.items():
        results[f"{name}:history:{key}"] = values
    results[f"{name}:predict"] = task.predict(x, batch_size=BATCH, verbose=0)
    generated = task.generate(_prompts(), stop_token_ids=None)
    results[f"{name}:generate"] = generated["token_ids"]
    results.update(common.weights_dict(task, prefix=f"{name}:weight"))
    return results


def main():
    args = common.parse_args({"--models": {"default": ",".join(MODELS)}})
    mesh_shape = common.mesh_shape(args.mesh, (1, common.WORLD_SIZE))
    results = {}
    for name in args.models.split(","):
        results.update(run_model(name, args.init, mesh_shape))
    common.save_results(**results)


if __name__ == "__main__":
    main()
