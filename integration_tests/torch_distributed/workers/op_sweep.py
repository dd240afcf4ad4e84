"""Every op of `op_catalogue` on DTensors, against the same op on plain
tensors, on each rank.

Under `DataParallel` on a mesh of the ranks, each op runs on its inputs
laid out four ways:
- `replicated`: every input a replicated DTensor;
- `sharded`: every input sharded on dimension 0 (unevenly: 5 rows);
- `sharded_last`: every input sharded on its last dimension;
- `mixed`: the first input sharded on dimension 0, the others plain
  tensors.
The reference is the op on plain tensors of the same values, run first on
the same rank (no DTensor involved), which is what one process computes.
Each records the op's outputs (global values) and, where an output is
float, the gradients of the float inputs of `sum(output * w)` for a fixed
random `w`. An op that raises records its error.
"""

import traceback
import zlib

import common
import numpy as np
import op_catalogue
import torch

import keras

LAYOUTS = ("replicated", "sharded", "sharded_last", "mixed")


def _inputs(name, specs):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    arrays = []
    for spec in specs:
        kind, shape, *rest = spec.split(":")
        shape = tuple(int(d) for d in shape.split(","))
        if kind == "f":
            arrays.append(rng.normal(size=shape))
        elif kind == "p":
            arrays.append(rng.uniform(0.5, 2.0, size=shape))
        elif kind == "u":
            arrays.append(rng.uniform(-0.9, 0.9, size=shape))
        elif kind == "i":
            arrays.append(rng.integers(0, int(rest[0]), size=shape))
        elif kind == "b":
            arrays.append(rng.random(size=shape) > 0.5)
        elif kind == "spd":
            batch, n = shape
            a = rng.normal(size=(batch, n, n))
            arrays.append(a @ np.swapaxes(a, 1, 2) + n * np.eye(n))
        else:
            raise ValueError(f"Unknown spec {spec!r}")
    arrays = [a.astype("float32") if a.dtype.kind == "f" else a for a in arrays]
    return rng, arrays


def _as_inputs(arrays, layout, mesh):
    tensors = []
    for i, array in enumerate(arrays):
        tensor = torch.as_tensor(array)
        if layout != "plain" and not (layout == "mixed" and i > 0):
            axes = [None] * tensor.ndim
            if layout in ("sharded", "mixed"):
                axes[0] = "batch"
            elif layout == "sharded_last":
                axes[-1] = "batch"
            tensor = keras.distribution.distribute_tensor(
                tensor, keras.distribution.TensorLayout(axes, mesh)
            )
        if tensor.dtype.is_floating_point:
            tensor = tensor.detach().requires_grad_(True)
        tensors.append(tensor)
    return tensors


def run_op(name, fn, arrays, layout, mesh, weights):
    tensors = _as_inputs(arrays, layout, mesh)
    outputs = keras.tree.flatten(fn(*tensors))
    results, loss = {}, None
    for i, output in enumerate(outputs):
        results[f"value{i}"] = keras.ops.convert_to_numpy(output)
        if (
            weights is not None
            and output.dtype.is_floating_point
            and output.requires_grad
        ):
            w = torch.as_tensor(weights[i]).to(output.dtype)
            term = torch.sum(output * w)
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
        for i, tensor in enumerate(tensors):
            if tensor.dtype.is_floating_point and tensor.grad is not None:
                results[f"grad{i}"] = keras.ops.convert_to_numpy(tensor.grad)
    return results


def main():
    common.parse_args()
    distribution = keras.distribution.DataParallel()
    keras.distribution.set_distribution(distribution)
    mesh = distribution.device_mesh
    results = {}
    for family, table in op_catalogue.FAMILIES.items():
        for name, fn, specs in table:
            rng, arrays = _inputs(name, specs)
            key = f"{family}/{name}"
            results[f"{key}/family"] = np.array(family)
            try:
                reference = run_op(name, fn, arrays, "plain", mesh, None)
            except Exception as error:
                results[f"{key}/reference/error"] = np.array(str(error))
                continue
            # Weights of the loss, one per output (drawn after the inputs).
            weights = {
                int(k[5:]): rng.normal(size=v.shape)
                for k, v in reference.items()
                if k.startswith("value")
            }
            reference = run_op(name, fn, arrays, "plain", mesh, weights)
            for k, v in reference.items():
                results[f"{key}/reference/{k}"] = v
            for layout in LAYOUTS:
                try:
                    out = run_op(name, fn, arrays, layout, mesh, weights)
                except Exception as error:
                    text = "".join(
                        traceback.format_exception_only(error)
                    ).strip()
                    out = {"error": np.array(text)}
                    print(f"{key}/{layout} failed:\n{traceback.format_exc()}")
                for k, v in out.items():
                    results[f"{key}/{layout}/{k}"] = v
    common.save_results(**results)


if __name__ == "__main__":
    main()
