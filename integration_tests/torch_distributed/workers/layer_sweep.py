"""Every case of `layer_catalogue`, one after another, in one launch.

Run as one plain process, it is the reference: each case's model is built
and its initial weights saved. Under torchrun, `--strategies` lists the
distributions to run every case under, in turn, each case's model built
under that distribution and loaded with the reference's weights:
- `data`: `DataParallel` over every rank;
- `model`: `ModelParallel` on a (1, N) mesh with the case's layouts;
- `grid`: `ModelParallel` on a (2, 2) mesh (data over "batch", the case's
  layouts over "model"), for the cases marked `grid` only.

Each case records, on a global batch of 7 rows (4 and 3 per rank when the
batch is sharded over 2): the inference output; a training pass's output,
loss `sum(output * w)` for a fixed random `w`, and the gradients of the
float inputs and of every trainable variable; and, for a case with
trainable variables, the loss of one `fit` step with SGD and every
variable after it (moving statistics included). A case that raises records
its error instead, so one failure does not hide the rest.

The inference output and the training pass are recorded twice: as the
model is first called, on DTensors, and again (keys `local_...`) once the
hooks `fit` installs are in place, with row-wise layers run on each rank's
own rows (NOTE [local calls] in `local_calls`). `local_expected` records
how many of the model's layers are row-wise, and `local_missed` the names
of those that never ran locally.
"""

import time
import traceback
import zlib
from pathlib import Path

import common
import layer_catalogue
import numpy as np
import torch

import keras
from keras.src.backend.torch import local_calls

BATCH = 7


def _inputs(case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    arrays = []
    for spec in case.inputs:
        shape = (BATCH, *spec.shape)
        if spec.kind == "float":
            arrays.append(rng.normal(size=shape).astype("float32"))
            continue
        ids = rng.integers(1 if spec.kind == "tokens" else 0, spec.high, shape)
        if spec.kind == "tokens":
            lengths = rng.integers(2, spec.shape[0] + 1, size=BATCH)
            lengths[0] = spec.shape[0]
            for row, length in enumerate(lengths):
                ids[row, length:] = 0
        arrays.append(ids.astype("int32"))
    return rng, arrays


def _build(case):
    keras.utils.set_random_seed(0)
    inputs = [
        keras.Input(
            spec.shape, dtype="float32" if spec.kind == "float" else "int32"
        )
        for spec in case.inputs
    ]
    outputs = case.make(*inputs)
    return keras.Model(inputs, outputs)


def _call(model, arrays):
    return model(arrays[0] if len(arrays) == 1 else arrays, training=False)


def _training_pass(model, case, arrays, weight):
    """Output, loss and gradients of one training pass on the global batch."""
    from keras.src.backend.torch import distributed_gradients

    tensors = []
    for spec, array in zip(case.inputs, arrays):
        tensor = common.shard_global_batch(array)
        if spec.kind == "float":
            tensor = tensor.detach().requires_grad_(True)
        tensors.append(tensor)
    out = model(tensors[0] if len(tensors) == 1 else tensors, training=True)
    loss = torch.sum(out * common.shard_global_batch(weight))
    for loss_term in model.losses:
        loss = loss + loss_term
    model.zero_grad()
    loss.backward()
    variables = model.trainable_variables
    grads = distributed_gradients.reduce_gradients(
        [v.value.grad for v in variables]
    )
    results = {
        "train_out": keras.ops.convert_to_numpy(out),
        "loss": keras.ops.convert_to_numpy(loss),
    }
    for i, (spec, tensor) in enumerate(zip(case.inputs, tensors)):
        # A layer that does not differentiate its input (Discretization)
        # leaves no gradient: the test checks both runs record the same
        # keys.
        if spec.kind == "float" and tensor.grad is not None:
            results[f"grad_input{i}"] = keras.ops.convert_to_numpy(tensor.grad)
    for variable, grad in zip(variables, grads):
        if grad is None:
            raise AssertionError(f"No gradient for {variable.path}")
        results[f"grad:{variable.path}"] = keras.ops.convert_to_numpy(grad)
    model.zero_grad()
    return results


def _local_passes(model, case, arrays, weight):
    """The inference output and training pass again, with the hooks of NOTE
    [local calls] installed (as `fit` installs them)."""
    if common.is_distributed():
        local_calls.install(model)
    out = _call(model, [common.shard_global_batch(a) for a in arrays])
    results = {"local_out": keras.ops.convert_to_numpy(out)}
    for key, value in _training_pass(model, case, arrays, weight).items():
        results[f"local_{key}"] = value
    # The model's own row-wise layers (sublayers run inside them), and
    # those of them that never ran locally.
    row_wise = [
        layer for layer in model.layers if local_calls.is_row_wise(layer)
    ]
    results["local_expected"] = np.array(len(row_wise))
    results["local_missed"] = np.array(
        " ".join(
            layer.name
            for layer in row_wise
            if local_calls.local_call_count(layer) == 0
        )
    )
    return results


def run_case(case, init_dir):
    model = _build(case)
    slug = "".join(c if c.isalnum() else "_" for c in case.name)
    common.share_initial_weights(model, f"{init_dir}/{slug}.npz")
    rng, arrays = _inputs(case)
    results = {}
    out = _call(model, [common.shard_global_batch(a) for a in arrays])
    results["out"] = keras.ops.convert_to_numpy(out)
    weight = rng.normal(size=tuple(out.shape)).astype("float32")
    results.update(_training_pass(model, case, arrays, weight))
    results.update(_local_passes(model, case, arrays, weight))
    if case.fit and model.trainable_variables:
        target = rng.normal(size=tuple(out.shape)).astype("float32")
        model.compile(keras.optimizers.SGD(0.1), "mse")
        x = arrays[0] if len(arrays) == 1 else arrays
        history = model.fit(
            x, target, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
        results["fit_loss"] = np.array(history.history["loss"])
        results.update(common.weights_dict(model))
    return results


def _distribution(strategy, case):
    devices = keras.distribution.list_devices()
    if strategy == "data":
        return keras.distribution.DataParallel()
    shape = (2, len(devices) // 2) if strategy == "grid" else (1, len(devices))
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, layout in case.layouts.items():
        layout_map[pattern] = layout
    return keras.distribution.ModelParallel(layout_map=layout_map)


def _sweep(prefix, cases, init_dir, distribution_for=None):
    results = {}
    for case in cases:
        start = time.perf_counter()
        # Layer names restart, so auto-named variables get the reference's
        # paths (clear_session also unsets the distribution).
        keras.backend.clear_session()
        if distribution_for:
            keras.distribution.set_distribution(distribution_for(case))
        try:
            case_results = run_case(case, init_dir)
        except Exception as error:  # Recorded; the test names the case.
            text = "".join(traceback.format_exception_only(error)).strip()
            case_results = {"error": np.array(text)}
            print(f"{prefix}{case.name} failed:\n{traceback.format_exc()}")
        finally:
            keras.distribution.set_distribution(None)
        case_results["seconds"] = np.array(time.perf_counter() - start)
        case_results["family"] = np.array(case.family)
        for key, value in case_results.items():
            results[f"{prefix}{case.name}/{key}"] = value
    return results


def main():
    args = common.parse_args({"--strategies": {"default": ""}})
    Path(args.init).mkdir(parents=True, exist_ok=True)
    cases = layer_catalogue.CASES
    results = {}
    if not common.is_distributed():
        results.update(_sweep("", cases, args.init))
    for strategy in filter(None, args.strategies.split(",")):
        chosen = [c for c in cases if c.grid or strategy != "grid"]
        results.update(
            _sweep(
                f"{strategy}/",
                chosen,
                args.init,
                lambda case, s=strategy: _distribution(s, case),
            )
        )
    common.save_results(**results)


if __name__ == "__main__":
    main()
