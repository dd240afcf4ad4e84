"""Collectives of one training step, counted by kind, on every rank.

A `TorchDispatchMode` sees every op that reaches the dispatcher: the
functional collectives DTensor issues when it redistributes, and the c10d
ops of `torch.distributed` calls (the gradient buckets). One
`train_on_batch` step is counted after two warm-up steps, for:

- `data`: a two-layer MLP (`hidden`, `out`) under `DataParallel`, float32;
- `data_float16`: the same under `mixed_float16`, where `compile` wraps the
  optimizer in a `LossScaleOptimizer` (its finiteness check reads every
  gradient);
- `model`: the MLP on a (1, 2) mesh, its hidden layer column-parallel and
  its output layer row-parallel (`models.mlp_layout_map`, Megatron-style);
- `fsdp`: the MLP on a (2,) mesh, every variable split over "batch" on its
  first dimension (FSDP-style), and a layer whose variables are float16
  between them (NOTE [layer gathers] in `layer_gathers`: one all-gather
  per unit and dtype; these three small layers are one unit).

Results per scenario: `{scenario}/{kind}` (how many collectives of that
kind) and `{scenario}/{kind}_elements` (how many elements they took in),
`{scenario}/last_{kind}_elements` (how many the step's last one took in)
and `{scenario}/parameters` (how many elements the trainable variables
hold).
"""

import collections
import sys

import common
import models
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import keras

_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")
_KINDS = {
    "all_reduce": ("all_reduce", "allreduce"),
    "all_gather": ("all_gather", "allgather"),
    "reduce_scatter": ("reduce_scatter",),
    "broadcast": ("broadcast",),
    "all_to_all": ("all_to_all", "alltoall"),
}


class CollectiveCounter(TorchDispatchMode):
    """Counts collective ops, and the elements they take in, by kind."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.elements = collections.Counter()
        self.last_elements = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor first; its collectives come back.
        if getattr(func, "namespace", None) in _NAMESPACES:
            name = func._overloadpacket.__name__
            for kind, stems in _KINDS.items():
                if any(stem in name for stem in stems):
                    elements = sum(
                        item.numel()
                        for arg in args
                        for item in (
                            arg if isinstance(arg, (list, tuple)) else [arg]
                        )
                        if isinstance(item, torch.Tensor)
                    )
                    self.counts[kind] += 1
                    self.elements[kind] += elements
                    self.last_elements[kind] = elements
        return func(*args, **kwargs)


def _mlp():
    """Two Dense layers: no normalization, whose batch statistics would
    add collectives of their own."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs)


def _fsdp_mlp():
    """Three Dense layers, the middle one float16."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(12, dtype="float16", name="wide")(x)
    x = keras.layers.Activation("relu", dtype="float32")(x)
    outputs = keras.layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs)


def _distribution(scenario):
    if scenario.startswith("data"):
        return keras.distribution.DataParallel()
    if scenario == "fsdp":
        mesh = keras.distribution.DeviceMesh((common.WORLD_SIZE,), ["batch"])
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map[".*kernel"] = ("batch", None)
        layout_map[".*bias"] = ("batch",)
        return keras.distribution.ModelParallel(layout_map=layout_map)
    mesh = keras.distribution.DeviceMesh(
        (1, common.WORLD_SIZE), ["batch", "model"]
    )
    return keras.distribution.ModelParallel(
        layout_map=models.mlp_layout_map(mesh)
    )


def count_step(scenario):
    """Count the collectives of one training step of `scenario`."""
    keras.distribution.set_distribution(_distribution(scenario))
    keras.config.set_dtype_policy(
        "mixed_float16" if scenario.endswith("float16") else "float32"
    )
    model = _fsdp_mlp() if scenario == "fsdp" else _mlp()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = common.data(0, (16, 8), (16, 4))
    for _ in range(2):
        model.train_on_batch(x, y)
    counter = CollectiveCounter()
    with counter:
        model.train_on_batch(x, y)
    results = {f"{scenario}/parameters": model.count_params()}
    for kind in _KINDS:
        results[f"{scenario}/{kind}"] = counter.counts[kind]
        results[f"{scenario}/{kind}_elements"] = counter.elements[kind]
        results[f"{scenario}/last_{kind}_elements"] = counter.last_elements[
            kind
        ]
    return results


def main():
    if not common.is_distributed():
        sys.exit("collectives.py runs under torchrun only.")
    results = {}
    for scenario in ("data", "data_float16", "model", "fsdp"):
        results.update(count_step(scenario))
    common.save_results(**results)
    if common.RANK == 0:
        print({k: v for k, v in results.items() if v})


if __name__ == "__main__":
    main()
