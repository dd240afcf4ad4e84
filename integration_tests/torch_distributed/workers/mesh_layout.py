"""Mesh and layout conversion, the mesh cache, and their errors."""

import gc

import common
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

import keras
from keras.src.backend.torch import distribution_lib

DeviceMesh = keras.distribution.DeviceMesh
TensorLayout = keras.distribution.TensorLayout


def error_message(function):
    try:
        function()
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{function} did not raise ValueError")


def main():
    common.record_threads_at_exit()
    n = common.WORLD_SIZE
    devices = keras.distribution.list_devices()
    flat = DeviceMesh((n,), ["batch"], devices)
    torch_flat = flat.backend_mesh
    assert tuple(torch_flat.mesh.shape) == (n,)
    assert torch_flat.mesh_dim_names == ("batch",)
    # Equal configurations share one torch mesh; the cache key is the
    # configuration, not the object.
    assert DeviceMesh((n,), ["batch"], devices).backend_mesh is torch_flat

    # Seed bug 2: a mesh cached by id() was handed to a later mesh of a
    # different shape that reused the id. Drop the first mesh and build
    # one of another configuration: it must get its own torch mesh.
    del flat
    gc.collect()
    shape = common.mesh_shape(common.parse_args().mesh, (1, n))
    grid = DeviceMesh(shape, ["batch", "model"], devices)
    torch_grid = grid.backend_mesh
    assert torch_grid is not torch_flat
    # Axes of size 1 shard nothing and are left out of the torch mesh.
    kept = [i for i, size in enumerate(shape) if size > 1]
    names = ("batch", "model")
    assert tuple(torch_grid.mesh.shape) == tuple(shape[i] for i in kept)
    assert torch_grid.mesh_dim_names == tuple(names[i] for i in kept)
    if shape[1] > 1:
        # Every rank agrees on the groups: a sum over the model axis.
        rank = torch.tensor([dist.get_rank()])
        dist.all_reduce(rank, group=torch_grid.get_group("model"))
        row = dist.get_rank() // shape[1]
        model_peers = range(row * shape[1], (row + 1) * shape[1])
        assert rank.item() == sum(model_peers), (rank, list(model_peers))

    placements = {
        "kernel": TensorLayout((None, "model"), grid).backend_layout,
        "batch": TensorLayout(("batch", None), grid).backend_layout,
        "replicated": TensorLayout((None, None), grid).backend_layout,
    }
    kernel = (Replicate(), Shard(1))
    batch = (Shard(0), Replicate())
    assert placements["kernel"].placements == tuple(kernel[i] for i in kept)
    assert placements["batch"].placements == tuple(batch[i] for i in kept)
    assert placements["replicated"].is_fully_replicated

    # Errors, raised on every rank with both values in the message.
    unknown = TensorLayout(("nope", None))
    unknown._device_mesh = grid  # Bypass keras's own check to reach ours.
    unknown_axis = error_message(
        lambda: distribution_lib._to_backend_layout(unknown)
    )
    too_big = DeviceMesh(
        (2 * n,), ["batch"], [f"cpu:{i}" for i in range(2 * n)]
    )
    size_mismatch = error_message(lambda: too_big.backend_mesh)
    twice = TensorLayout(("model", "model"), grid)
    axis_twice = error_message(lambda: twice.backend_layout)
    common.save_results(
        unknown_axis=unknown_axis,
        size_mismatch=size_mismatch,
        axis_twice=axis_twice,
    )


if __name__ == "__main__":
    main()
