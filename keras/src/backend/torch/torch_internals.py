"""Every private PyTorch API the torch distribution code relies on.

The distribution code uses a few of PyTorch's internals where no public API
does the job: a DTensor's local tensor without autograd, a DTensor built
from a spec without a collective, the shard a rank holds of a layout, the
autograd engine's end-of-backward callback, the torch function mode stack,
DTensor's sharding propagator, the default group's store, the process
groups a device mesh keeps, and for torch.compile a traceable all-reduce,
dynamo's recompile limit and inductor's cache folder. They can change in
any PyTorch release, so they are all here, each behind a function whose
name says what it does: a new torch version is checked against this one
file, and
`warn_if_untested_torch` tells rank 0's user when the installed torch is
not one the suite ran on.

This module imports nothing from Keras, so `core.py` (through
`dtensor_utils`) can use it at import time without a cycle.
"""

import gc
import warnings

import torch

try:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import _sharding_prop
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._utils import (
        _compute_local_shape_and_global_offset,
    )
except ImportError:  # torch built without distributed support.
    DTensor = None

# The torch versions the whole suite ran on (only 2.13.0 is installable on
# the machines the suite runs on).
TESTED_TORCH_VERSIONS = ("2.13.0",)

# The logger DTensor's redistribution logs its advice to flatten mesh
# axes on.
REDISTRIBUTE_LOGGER = "torch.distributed.tensor._redistribute"

_warned = [False]


def torch_release(version=None):
    """`"2.13.0"` for `"2.13.0+cpu"` or `"2.13.0a0+git..."`."""
    version = version or torch.__version__
    release = version.split("+")[0]
    for marker in ("a", "b", "rc", ".dev"):
        release = release.split(marker)[0]
    return release


def warn_if_untested_torch(rank):
    """Warn once, on rank 0, when the installed torch was never tested.

    Args:
        rank: This process's rank.
    """
    if _warned[0] or rank != 0:
        return
    _warned[0] = True
    if torch_release() in TESTED_TORCH_VERSIONS:
        return
    warnings.warn(
        f"keras.distribution on the torch backend was tested with torch "
        f"{', '.join(TESTED_TORCH_VERSIONS)}, but torch {torch.__version__} "
        "is installed. It relies on some of torch's private DTensor and "
        "autograd internals, which may have changed: if training fails or "
        "ranks disagree, install a tested version "
        f"(`pip install torch=={TESTED_TORCH_VERSIONS[-1]}`).",
        stacklevel=2,
    )


# DTensors.


def local_tensor(x):
    """A DTensor's local tensor, outside autograd (no `to_local` node)."""
    return x._local_tensor


# Specs made by `dtensor_without_autograd`, by mesh (its id: the spec
# keeps the mesh alive, so the id is not reused), placements, shape, stride
# and dtype. A training step wraps the same few dozen layouts every step,
# and building a spec (its shard order, its checks) cost more than the
# DTensor itself. DTensor shares specs between tensors too (its sharding
# propagation caches them); nothing changes one in place.
_specs = {}
_MAX_SPECS = 4096


def dtensor_without_autograd(local, device_mesh, placements, shape, stride):
    """A DTensor over `local` with the given global shape and stride.

    Unlike `DTensor.from_local`, it records no autograd node and runs no
    check: the caller knows the layout is right.
    """
    placements = tuple(placements)
    shape = torch.Size(shape)
    stride = tuple(stride)
    key = (id(device_mesh), placements, shape, stride, local.dtype)
    spec = _specs.get(key)
    if spec is None:
        if len(_specs) >= _MAX_SPECS:
            _specs.clear()
        spec = DTensorSpec(
            device_mesh,
            placements,
            tensor_meta=TensorMeta(shape, stride, local.dtype),
        )
        _specs[key] = spec
    return DTensor(local, spec, requires_grad=False)


def local_shape_and_offset(global_shape, mesh_shape, coordinate, placements):
    """The shape and global offset of the shard at a mesh coordinate."""
    return _compute_local_shape_and_global_offset(
        global_shape, tuple(mesh_shape), list(coordinate), placements
    )


def sharding_propagator():
    """DTensor's sharding propagator: the tables of op strategies."""
    return DTensor._op_dispatcher.sharding_propagator


def raised_by_sharding_propagation(traceback):
    """Whether the innermost frame of `traceback` is DTensor's sharding
    propagation (where "no strategy for this op" is raised)."""
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and (
        traceback.tb_frame.f_code.co_filename == _sharding_prop.__file__
    )


def get_implicit_replication():
    """Whether DTensor ops take plain tensors as replicated (per thread)."""
    return torch._C._get_dtensor_allow_implicit_replication()


def set_implicit_replication(enabled):
    """Let DTensor ops take plain tensors as replicated (per thread)."""
    torch._C._set_dtensor_allow_implicit_replication(enabled)


# Torch function modes.


def torch_function_subclasses_disabled():
    """A context in which tensor subclasses' `__torch_function__` is off."""
    return torch._C.DisableTorchFunctionSubclass()


# Autograd.


def current_backward_id():
    """An id of the backward pass running on this thread (-1 outside)."""
    return torch._C._current_graph_task_id()


def run_at_end_of_backward(callback):
    """Have the autograd engine call `callback` when this backward ends.

    Must be called from inside a backward pass (e.g. a gradient hook).
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def storage_users(tensor):
    """How many tensors share `tensor`'s storage, or None if unknown."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return use_count(tensor.untyped_storage()._cdata)


# torch.compile.


def functional_all_reduce(tensor, reduce_op, group):
    """The all-reduce torch.compile can trace: a new tensor, `tensor`
    reduced over `group` with `reduce_op` ("sum", "max", "min")."""
    from torch.distributed import _functional_collectives

    return _functional_collectives.all_reduce(tensor, reduce_op, group)


def recompile_limit(limit):
    """A context in which dynamo compiles a function up to `limit` times
    before it runs it eagerly."""
    return torch._dynamo.config.patch(recompile_limit=limit)


def inductor_cache_dir():
    """The folder inductor caches compiled code in (made if missing)."""
    from torch._inductor.runtime import cache_dir_utils

    return cache_dir_utils.cache_dir()


# Processes.


def release_mesh_process_groups():
    """Drop the process groups each live torch `DeviceMesh` keeps.

    A mesh holds its groups in `_pg_registry`, so a group outlives
    `destroy_process_group` for as long as a mesh does (cached meshes, the
    meshes of DTensor variables). Dropping them destroys the groups now:
    their destructors join their worker threads.
    """
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()


def default_store():
    """The store of the default process group (torchrun's rendezvous or
    `init_process_group`'s): every rank reaches it."""
    return dist.distributed_c10d._get_default_store()
