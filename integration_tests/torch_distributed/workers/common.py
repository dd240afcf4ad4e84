"""Helpers shared by the worker scripts (run by `launcher`).

A worker runs either as the single-process reference (plain `python`) or
under `torchrun`. The reference saves the model's initial weights; the
distributed run loads them with `set_weights`, so both start from the same
values. Inputs come from a seeded generator built identically everywhere.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))


def record_threads_at_exit():
    """At exit, after Keras's teardown, write this process's thread names
    to `$RESULTS_DIR/rank{RANK}.threads`, one per line.

    Call it before the first mesh is made: exit handlers run last-registered
    first, so this one then runs after the one Keras registers when it
    forms the process group (NOTE [gloo at exit] in `process_group`).
    """
    import atexit

    path = Path(os.environ.get("RESULTS_DIR", ".")) / f"rank{RANK}.threads"

    def record():
        tasks = Path("/proc/self/task").iterdir()
        names = [(task / "comm").read_text().strip() for task in tasks]
        path.write_text("\n".join(names))

    atexit.register(record)


def is_distributed():
    return "LOCAL_RANK" in os.environ


def parse_args(extra=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", help="File of initial weights.")
    parser.add_argument("--mesh", default=None, help="Mesh shape, e.g. 2,2")
    for name, kwargs in (extra or {}).items():
        parser.add_argument(name, **kwargs)
    return parser.parse_args()


def mesh_shape(text, default):
    if not text:
        return default
    return tuple(int(s) for s in text.split(","))


def save_results(**arrays):
    """Write this rank's results to `$RESULTS_DIR/rank{RANK}.npz`."""
    path = Path(os.environ.get("RESULTS_DIR", ".")) / f"rank{RANK}.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def share_initial_weights(model, path):
    """Save `model`'s weights (reference) or load them (distributed)."""
    if is_distributed():
        with np.load(path) as data:
            model.set_weights([data[f"w{i}"] for i in range(len(data))])
    else:
        weights = model.get_weights()
        np.savez(path, **{f"w{i}": w for i, w in enumerate(weights)})


def weights_dict(model, prefix="weight"):
    """Every weight of `model`, as global numpy arrays keyed by path."""
    return {
        f"{prefix}:{v.path}": keras.ops.convert_to_numpy(v)
        for v in model.weights
    }


def data(seed, *shapes, integer_high=None):
    """Arrays from a seeded generator, identical on every rank."""
    rng = np.random.default_rng(seed)
    if integer_high:
        return [rng.integers(0, integer_high, size=s) for s in shapes]
    return [rng.normal(size=s).astype("float32") for s in shapes]


def set_distribution(distribution):
    """Set `distribution` only in the distributed run."""
    if is_distributed():
        keras.distribution.set_distribution(distribution)


def strategy_distribution(strategy, fsdp_layout_map, model_layout_map):
    """The distribution a worker's `--strategy` names, over every rank.

    Args:
        strategy: `"data"` (`DataParallel`), `"fsdp"` (a `(N,)` "batch"
            mesh with `fsdp_layout_map(mesh)`) or `"model"` (a `(1, N)`
            mesh with `model_layout_map(mesh)`).
        fsdp_layout_map: A function of a mesh, returning a `LayoutMap`.
        model_layout_map: A function of a mesh, returning a `LayoutMap`.
    """
    n = WORLD_SIZE
    if strategy == "data":
        return keras.distribution.DataParallel()
    if strategy == "fsdp":
        mesh = keras.distribution.DeviceMesh((n,), ["batch"])
        layout_map = fsdp_layout_map(mesh)
    else:
        mesh = keras.distribution.DeviceMesh((1, n), ["batch", "model"])
        layout_map = model_layout_map(mesh)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def shard_global_batch(array):
    """Shard a global batch over the batch axis, as a custom loop does."""
    import torch

    tensor = torch.as_tensor(array)
    distribution = keras.distribution.distribution()
    if distribution is None:
        return tensor
    layout = distribution.get_data_layout(tensor.shape)
    return keras.distribution.distribute_tensor(tensor, layout)


def one_pass_gradients(model, loss_fn, x, y):
    """Gradients of one forward and backward pass on the global batch
    `(x, y)`, reduced once as the optimizer gets them, and that pass's
    loss: `{"grad:<path>": ..., "grad_loss": ...}`."""
    from keras.src.backend.torch import distributed_gradients

    outputs = model(shard_global_batch(x), training=True)
    loss = loss_fn(shard_global_batch(y), outputs)
    model.zero_grad()
    loss.backward()
    variables = model.trainable_variables
    grads = distributed_gradients.reduce_gradients(
        [v.value.grad for v in variables]
    )
    model.zero_grad()
    results = {"grad_loss": keras.ops.convert_to_numpy(loss)}
    for variable, grad in zip(variables, grads):
        if grad is None:
            raise AssertionError(f"No gradient for {variable.path}")
        results[f"grad:{variable.path}"] = keras.ops.convert_to_numpy(grad)
    return results
