"""Keras distribution API for the PyTorch backend.

Every process (rank) runs the same program, as with JAX's SPMD model:

- a `keras.distribution.DeviceMesh` becomes a `torch.distributed.DeviceMesh`
  of the same shape and axis names, one device per rank;
- a `keras.distribution.TensorLayout` becomes DTensor placements: `Shard(dim)`
  on the mesh axes a tensor dimension names, `Replicate()` on the others;
- variables and input batches become DTensors with those placements.

Where the pieces live:

- `distribution_lib` (this module): devices, processes, meshes, layouts and
  the conversion of a tensor into a DTensor.
- `process_group`: forming and tearing down the `torch.distributed` world.
- `distributed_variable`: how a Keras variable holds and assigns a DTensor.
- `distributed_data`: how a global batch is sharded over the batch axis.
- `dtensor_promotion`: how plain tensors meet DTensors in an op.
- `distributed_gradients`: how gradients are reduced before the optimizer.
"""

import dataclasses
import logging
import math

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor import distribute_tensor as _torch_distribute

from keras.src.backend.torch import core
from keras.src.backend.torch import process_group
from keras.src.backend.torch import torch_internals

# The torch trainer reads the same global batches on every process and
# shards each batch over the batch axis itself (`distributed_data`), so the
# data adapters must not shard a dataset per process (read by
# `keras/src/trainers/data_adapters/__init__.py`).
TRAINER_SHARDS_BATCHES = True

# Meshes built so far, keyed by their configuration (device type, shape,
# axis names, ranks). Never keyed by `id()`: two equal keras meshes must map
# to the same torch mesh on every rank, or ranks create process groups in
# different orders and desynchronize.
_MESH_CACHE = {}


class _DropFlattenAdvice(logging.Filter):
    """Drop DTensor's advice to flatten mesh axes.

    DTensor logs it whenever a value is `Partial` over two mesh axes, e.g. a
    loss over a `(1, N)` mesh, whose batch axis of size 1 costs nothing.
    Keras users choose the mesh through the distribution, not by flattening
    torch mesh axes, so the advice only adds noise to every rank's log.
    """

    def filter(self, record):
        return "sequential all_reduce" not in record.getMessage()


logging.getLogger(torch_internals.REDISTRIBUTE_LOGGER).addFilter(
    _DropFlattenAdvice()
)


@dataclasses.dataclass(frozen=True)
class DTensorLayout:
    """The torch form of a `TensorLayout`: a mesh and DTensor placements.

    Attributes:
        device_mesh: The `torch.distributed.DeviceMesh`.
        placements: A tuple with one `Shard(dim)` or `Replicate()` per mesh
            axis.
    """

    device_mesh: TorchDeviceMesh
    placements: tuple

    @property
    def is_fully_replicated(self):
        return all(p.is_replicate() for p in self.placements)


def _default_device_type():
    return "gpu" if torch.cuda.is_available() else "cpu"


def _normalize_device_type(device_type):
    if device_type is None:
        return _default_device_type()
    device_type = device_type.lower()
    if device_type == "cuda":
        return "gpu"
    if device_type not in ("cpu", "gpu"):
        raise ValueError(
            "The torch backend distributes over `'cpu'` or `'gpu'` devices. "
            f"Received: device_type={device_type!r}"
        )
    return device_type


def list_devices(device_type=None):
    """Return all the available devices based on the device type.

    Under `torchrun` (or after `initialize()`), the devices are global: one
    per process, `"{device_type}:{rank}"` for every rank of the world. In a
    single process they are the local devices of that type: `["cpu:0"]`, or
    `"gpu:i"` for each visible CUDA device.

    Args:
        device_type: `"cpu"` or `"gpu"`. Defaults to `"gpu"` when CUDA is
            available, else `"cpu"`.

    Returns:
        List of device names, e.g. `["cpu:0", "cpu:1"]`.
    """
    device_type = _normalize_device_type(device_type)
    process_group.maybe_initialize_from_environment()
    if process_group.is_multi_process():
        return [f"{device_type}:{i}" for i in range(dist.get_world_size())]
    if device_type == "gpu":
        return [f"gpu:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu:0"]


def get_device_count(device_type=None):
    """Return the number of devices `list_devices(device_type)` returns.

    Args:
        device_type: `"cpu"` or `"gpu"`. Defaults to `"gpu"` when CUDA is
            available, else `"cpu"`.

    Returns:
        int, the number of devices.
    """
    return len(list_devices(device_type))


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Form the `torch.distributed` world for this process.

    Under `torchrun` no argument is needed: the launcher's environment
    (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) is used, and
    `keras.distribution` calls this on first use. Otherwise pass the
    coordinator address (or all job addresses, comma separated; the first
    one is the coordinator), the number of processes and this process's id.
    Uses NCCL when CUDA is available and gloo on CPU. Calling it again in a
    formed world with the same arguments does nothing.

    Args:
        job_addresses: string, `"host:port"` of the coordinator, or every
            job's address separated by commas.
        num_processes: int, the number of processes in the world.
        process_id: int, the rank of this process, in
            `[0, num_processes)`.
    """
    process_group.initialize(job_addresses, num_processes, process_id)


def num_processes():
    """Return the number of processes in the world (1 when not launched)."""
    process_group.maybe_initialize_from_environment()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def process_id():
    """Return the rank of this process (0 when not launched)."""
    process_group.maybe_initialize_from_environment()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def active_distribution():
    """Return the global distribution if it spans several devices, else None.

    A distribution over one device changes nothing on the torch backend:
    variables and batches stay plain tensors.
    """
    # Avoid circular imports.
    from keras.src.distribution import distribution_lib

    distribution = distribution_lib.distribution()
    # The mesh's shape, not its array of device names: torch.compile cannot
    # trace a NumPy array of strings, and this runs inside compiled steps.
    if distribution is None or math.prod(distribution.device_mesh.shape) == 1:
        return None
    return distribution


def prepare_callbacks(callbacks):
    """Fit a `CallbackList`'s callbacks to the distribution, if any.

    Called by `CallbackList` (through `keras.src.backend.distribution_lib`)
    for every list it builds. Under a distribution over several devices,
    the built-in callbacks that write files get one writer
    (`distributed_callbacks.adapt`), and every callback stays on the
    training thread: reading a distributed value runs collectives, which
    every rank must run in the same order.

    Args:
        callbacks: The list's callbacks.

    Returns:
        Whether the callbacks must run on the training thread.
    """
    if active_distribution() is None:
        return False
    from keras.src.backend.torch import distributed_callbacks

    distributed_callbacks.adapt(callbacks)
    return True


def _parse_device(device_name):
    """Split `"gpu:3"` (or a `torch.device`) into `("gpu", 3)`."""
    if isinstance(device_name, torch.device):
        device_type = "gpu" if device_name.type == "cuda" else device_name.type
        return device_type, device_name.index or 0
    device_name = str(device_name).lower()
    device_type, _, index = device_name.partition(":")
    if device_type == "cuda":
        device_type = "gpu"
    if device_type not in ("cpu", "gpu") or not (index or "0").isdigit():
        raise ValueError(
            "Expected a device name like 'cpu:0' or 'gpu:1'. "
            f"Received: device_name={device_name!r}"
        )
    return device_type, int(index or 0)


def _to_backend_device(device_name):
    """Return the local `torch.device` for a keras device name.

    In a multi-process world, `"gpu:i"` names the GPU of rank `i`; ranks are
    laid out host by host, so its local index is `i % local_gpu_count`.
    """
    device_type, index = _parse_device(device_name)
    if device_type == "cpu":
        return torch.device("cpu")
    local_count = max(torch.cuda.device_count(), 1)
    return torch.device("cuda", index % local_count)


def _mesh_ranks(device_mesh):
    """Return the device type and the rank grid of a keras `DeviceMesh`."""
    parsed = [_parse_device(d) for d in np.ravel(device_mesh.devices)]
    device_types = sorted({device_type for device_type, _ in parsed})
    if len(device_types) != 1:
        raise ValueError(
            "All devices of a DeviceMesh must be of one type. Received "
            f"device types {device_types} in {device_mesh}."
        )
    ranks = np.array([index for _, index in parsed], dtype=np.int64)
    return device_types[0], ranks.reshape(tuple(device_mesh.shape))


def _to_backend_mesh(device_mesh):
    """Convert a keras `DeviceMesh` to a `torch.distributed.DeviceMesh`.

    The torch mesh has the same shape and axis names; device `"cpu:i"` or
    `"gpu:i"` is rank `i`. Meshes are cached by configuration, so equal keras
    meshes share one torch mesh and every rank creates process groups in the
    same order.

    Args:
        device_mesh: A `keras.distribution.DeviceMesh`.

    Returns:
        A `torch.distributed.DeviceMesh`.
    """
    axis_names = list(device_mesh.axis_names)
    repeated = sorted({n for n in axis_names if axis_names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"The axis names of a DeviceMesh must differ. Received "
            f"axis_names={axis_names}, which repeats {repeated}. Name each "
            "axis once, e.g. ['batch', 'model']."
        )
    device_type, ranks = _mesh_ranks(device_mesh)
    world_size = num_processes()
    mesh_size = math.prod(device_mesh.shape)
    if mesh_size != world_size:
        raise ValueError(
            f"The DeviceMesh has {mesh_size} devices (shape "
            f"{tuple(device_mesh.shape)}, axis_names "
            f"{list(device_mesh.axis_names)}) but the world has {world_size} "
            "process(es). On the torch backend each process drives one "
            "device: launch with `torchrun --nproc-per-node "
            f"{mesh_size}` or build the mesh from "
            "`keras.distribution.list_devices()`."
        )
    if sorted(ranks.ravel().tolist()) != list(range(world_size)):
        raise ValueError(
            "The devices of a DeviceMesh must name every rank exactly once, "
            f"0 to {world_size - 1}. Received devices "
            f"{np.ravel(device_mesh.devices).tolist()}."
        )
    key = (
        device_type,
        tuple(device_mesh.shape),
        tuple(device_mesh.axis_names),
        tuple(ranks.ravel().tolist()),
    )
    mesh = _MESH_CACHE.get(key)
    if mesh is None:
        process_group.ensure_process_group()
        process_group.name_process_in_warnings()
        torch_internals.warn_if_untested_torch(dist.get_rank())
        if device_type == "gpu":
            process_group.use_local_cuda_device()
        kept = _kept_axes(device_mesh)
        mesh = TorchDeviceMesh(
            "cuda" if device_type == "gpu" else "cpu",
            torch.as_tensor(ranks).reshape(
                tuple(device_mesh.shape[i] for i in kept)
            ),
            mesh_dim_names=tuple(device_mesh.axis_names[i] for i in kept),
        )
        _MESH_CACHE[key] = mesh
    return mesh


def _kept_axes(device_mesh):
    """The positions of the mesh axes the torch mesh keeps.

    NOTE [size-1 axes]: an axis of size 1 shards nothing, so the torch mesh
    leaves it out: a `(1, N)` keras mesh becomes a 1-D torch mesh over the
    other axis. On such an axis every value would carry a placement that
    means nothing (the batch "sharded" into one piece, gradients "partial"
    over one rank), which costs a no-op collective per bucket and steers
    DTensor's sharding choices away from the ones tensor parallelism uses
    (gathering activations instead of keeping gradients sharded). Layouts
    may still name the axis: its dimension is simply not split.
    """
    kept = [i for i, size in enumerate(device_mesh.shape) if size > 1]
    return kept or list(range(len(device_mesh.shape)))


def _placements_for(axes, axis_names, tensor_layout):
    """Map a layout's per-dimension axes to one placement per mesh axis."""
    placements = [Replicate()] * len(axis_names)
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        if axis not in axis_names:
            raise ValueError(
                f"Unknown mesh axis {axis!r} in {tensor_layout}. The "
                f"mesh's axes are {list(axis_names)}. Use one of them, or "
                "`None` for a dimension that is not sharded."
            )
        position = axis_names.index(axis)
        if not placements[position].is_replicate():
            raise ValueError(
                f"Mesh axis {axis!r} shards more than one tensor dimension "
                f"in {tensor_layout}. A mesh axis can shard at most one "
                "dimension of a tensor."
            )
        placements[position] = Shard(dim)
    return tuple(placements)


def _to_backend_layout(tensor_layout):
    """Convert a keras `TensorLayout` to a `DTensorLayout`.

    Args:
        tensor_layout: A `keras.distribution.TensorLayout` with a mesh.

    Returns:
        A `DTensorLayout` (torch mesh and placements).
    """
    if tensor_layout.device_mesh is None:
        raise ValueError(
            "Cannot convert a TensorLayout without a device mesh. Received: "
            f"{tensor_layout}. Set `device_mesh=` or build it through a "
            "`LayoutMap`."
        )
    device_mesh = tensor_layout.device_mesh
    axis_names = tuple(device_mesh.axis_names)
    placements = _placements_for(tensor_layout.axes, axis_names, tensor_layout)
    placements = tuple(placements[i] for i in _kept_axes(device_mesh))
    return DTensorLayout(device_mesh.backend_mesh, placements)


def _as_dtensor_layout(layout):
    # Avoid circular imports.
    from keras.src.distribution import TensorLayout

    if isinstance(layout, TensorLayout):
        return layout.backend_layout
    if isinstance(layout, DTensorLayout):
        return layout
    raise TypeError(
        "Expected a `keras.distribution.TensorLayout` or a `DTensorLayout`. "
        f"Received: layout={layout!r} of type {type(layout)}"
    )


def _check_divisible(shape, layout, name):
    """Raise if a sharded dimension does not split evenly over its axes."""
    mesh = layout.device_mesh
    for mesh_dim, placement in enumerate(layout.placements):
        if not placement.is_shard():
            continue
        dim = placement.dim
        axis_size = mesh.size(mesh_dim)
        axis_name = mesh.mesh_dim_names[mesh_dim]
        if dim >= len(shape):
            raise ValueError(
                f"The layout of {name} shards dimension {dim} over mesh "
                f"axis {axis_name!r}, but {name} has shape {tuple(shape)}. "
                "Give the layout one entry per dimension."
            )
        if shape[dim] % axis_size:
            raise ValueError(
                f"Cannot shard {name} of shape {tuple(shape)}: dimension "
                f"{dim} has size {shape[dim]}, which mesh axis "
                f"{axis_name!r} of size {axis_size} does not divide. Change "
                "the layout of this variable (e.g. in the LayoutMap) or the "
                "mesh shape."
            )


def _mark_dtensors_in_use():
    # Once DTensors exist, plain tensors that meet them in an op are
    # promoted; see `dtensor_promotion`.
    from keras.src.backend.torch import dtensor_promotion

    dtensor_promotion.enable()


def distribute_tensor(tensor, layout):
    """Give a tensor the layout `layout`.

    A DTensor is redistributed (e.g. resharded) if its layout differs. A
    plain tensor is taken as the global value, identical on every process,
    and each process keeps its shard of it: no communication happens.

    Args:
        tensor: A `torch.Tensor`, a DTensor, or anything
            `keras.ops.convert_to_tensor` takes (a numpy array).
        layout: A `TensorLayout` or a `DTensorLayout`.

    Returns:
        A DTensor with the layout.
    """
    layout = _as_dtensor_layout(layout)
    _mark_dtensors_in_use()
    if not isinstance(tensor, torch.Tensor):
        tensor = core.convert_to_tensor(tensor)
    if isinstance(tensor, DTensor):
        if (
            tensor.device_mesh == layout.device_mesh
            and tuple(tensor.placements) == layout.placements
        ):
            return tensor
        return tensor.redistribute(layout.device_mesh, layout.placements)
    return _torch_distribute(
        tensor, layout.device_mesh, layout.placements, src_data_rank=None
    )


def distribute_variable(value, layout):
    """Create the DTensor holding a variable's value.

    Rank 0's value is the one kept (it is broadcast or scattered), so a
    replicated variable is identical on every rank even when each rank drew
    different random initial values. The result never aliases `value`.

    Args:
        value: The full initial value, a `torch.Tensor`.
        layout: A `TensorLayout` or a `DTensorLayout`.

    Returns:
        A DTensor with the layout.
    """
    return _distribute_variable(value, layout, "the variable")


def _distribute_variable(value, layout, name):
    layout = _as_dtensor_layout(layout)
    _check_divisible(value.shape, layout, name)
    _check_same_variable_on_every_rank(value.shape, value.dtype, layout, name)
    _mark_dtensors_in_use()
    # `distribute_tensor` writes rank 0's data into the local tensor, which
    # aliases its input: clone, or the caller's tensor changes on other
    # ranks.
    return _torch_distribute(
        value.detach().clone(), layout.device_mesh, layout.placements
    )


def _check_same_variable_on_every_rank(shape, dtype, layout, name):
    """Raise on every rank if the ranks create different variables.

    The broadcast or scatter that follows would not notice: gloo copies
    what fits, so ranks that build different shapes (model code that
    depends on the rank) would go on with different values. One integer
    per rank is exchanged.
    """
    if not process_group.is_multi_process():
        return
    from keras.src.backend.torch import cross_rank

    value = {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "layout": [str(p) for p in layout.placements],
    }
    cross_rank.check_same(
        "variables, created in the same order",
        value,
        "Every rank must build the same model, with the same distribution "
        "and LayoutMap; look for model code that depends on the rank or "
        "on the host.",
        labels={key: name for key in value},
    )


def distribute_data_input(per_process_batch, layout, batch_dim_name):
    """Assemble a global batch from each process's part of it.

    Each process passes its own rows (processes that share a position on the
    batch axis pass the same rows). Parts may differ in size by any amount,
    e.g. on the last batch of an epoch; the global batch is their
    concatenation in rank order along the batch axis.

    Args:
        per_process_batch: A `torch.Tensor` (or array) with this process's
            rows.
        layout: `TensorLayout` of the global batch; its first dimension is
            sharded over the batch axis.
        batch_dim_name: Name of the mesh axis that shards the batch.

    Returns:
        A DTensor of the global batch.
    """
    from keras.src.backend.torch import distributed_data

    return distributed_data.from_process_local(
        per_process_batch, _as_dtensor_layout(layout), batch_dim_name
    )


def write_once(write, filepath, read_state, values, atomic=True):
    """Write a model file from process 0 alone, every process in step.

    See NOTE [one writer] in `distributed_saving.py`.
    """
    from keras.src.backend.torch import distributed_saving

    distributed_saving.write_once(
        write, filepath, read_state, values, atomic=atomic
    )
