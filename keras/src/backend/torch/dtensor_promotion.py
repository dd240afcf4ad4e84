"""Plain tensors meeting DTensors: one mechanism for every op.

DTensor refuses ops that mix it with plain tensors ("got mixed torch.Tensor
and DTensor"). Under a distribution, Keras code mixes them all the time:
constants made by ops (`ones`, `arange`, masks, epsilons), random draws,
tensors made by layers, variables created before the distribution.

NOTE [promotion]: once the first DTensor exists, a `TorchFunctionMode` is
pushed for the rest of the process. For every torch call whose arguments
include a DTensor, each plain tensor argument is promoted to a DTensor
replicated on the same mesh (`DTensor.from_local`, no communication). That
covers every backend op (numpy, nn, math, linalg, layer code) in one place.
The promotion is differentiable, so backward sees only DTensors and needs
nothing more: a gradient flowing back to a promoted plain tensor arrives as
its full value.

A promoted tensor is taken to hold the same value on every rank, which is
true of constants and of values computed from replicated state. Per-rank
data never takes this path: input batches are sharded explicitly by
`distributed_data`.

The same mode sends the few ops that DTensor cannot shard the way Keras
needs (convolutions over a batch-sharded input, CPU fused attention) to the
rules in `dtensor_rules`, and catches the ops DTensor has no sharding rule
for at all (e.g. `repeat_interleave` with tensor repeats, which metrics
use): their DTensor arguments are made replicated and the op runs on the
local values, giving a replicated result (`dtensor_rules.run_replicated`).

NOTE [partial results]: an op whose result is `Partial` over a model axis
(a matmul over a sharded contraction dimension) has it reduced right away,
as tensor parallelism does at the output of a row-parallel layer. Left
`Partial`, the value would be reduced implicitly inside the next op, whose
backward then reuses the `Partial` input: gradients upstream come out
`Partial` and full-size instead of sharded (a row-parallel kernel's
gradient would be all of the kernel on every rank). Reducing it with an
explicit redistribution costs the same all-reduce, and its backward keeps
the gradient replicated. `Partial` over the batch axis is left to DTensor
and `distributed_gradients`, which reduces parameter gradients in buckets.
Attribute reads (a parameter's gradient) and in-place ops keep their
result as is.

The mode is thread-local, like every torch function mode: DTensor
computation must run on the thread that created the first DTensor (Keras's
training loops do).
"""

import threading

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.overrides import TorchFunctionMode

from keras.src.backend.common.variables import Variable as KerasVariable
from keras.src.backend.torch import dtensor_rules

_lock = threading.Lock()
_enabled_threads = set()


def _value(arg):
    return arg.value if isinstance(arg, KerasVariable) else arg


def _find_mesh(args, kwargs):
    """Return the mesh of the first DTensor among the arguments, or None."""
    for group in (args, kwargs.values()):
        for arg in group:
            arg = _value(arg)
            if isinstance(arg, DTensor):
                return arg.device_mesh
            if isinstance(arg, (list, tuple)):
                for item in arg:
                    item = _value(item)
                    if isinstance(item, DTensor):
                        return item.device_mesh
    return None


def _promote(arg, mesh, placements):
    arg = _value(arg)
    if isinstance(arg, DTensor):
        return arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(_promote(item, mesh, placements) for item in arg)
    if isinstance(arg, torch.Tensor):
        if arg.device.type != mesh.device_type:
            arg = arg.to(mesh.device_type)
        return DTensor.from_local(arg, mesh, placements, run_check=False)
    return arg


def _keeps_partial(func):
    name = getattr(func, "__name__", "")
    return name == "__get__" or (name.endswith("_") and name != "__")


def _reduce_partial(x, keep=()):
    """Reduce the `Partial` placements of a DTensor, except on `keep` axes."""
    placements = x.placements
    if not any(p.is_partial() for p in placements):
        return x
    target = [
        Replicate() if p.is_partial() and axis not in keep else p
        for axis, p in enumerate(placements)
    ]
    if target == list(placements):
        return x
    return x.redistribute(x.device_mesh, target)


def _batch_axes(mesh):
    """Mesh axes over which the batch is sharded (gradients reduced later)."""
    from keras.src.distribution import distribution_lib

    distribution = distribution_lib.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    names = mesh.mesh_dim_names or ()
    return tuple(i for i, n in enumerate(names) if n == name)


def _settle(result):
    """Reduce a result's `Partial` placements; keep its gradient reduced.

    See NOTE [partial results]. Only model axes are reduced: `Partial` over
    a batch axis (a mean over the batch, parameter gradients) is left to
    DTensor and `distributed_gradients`. A result replicated over a model
    axis gets a gradient hook that reduces a `Partial` gradient on that
    axis as soon as backward reaches it, as the input of a column-parallel
    layer does in tensor parallelism.
    """
    if isinstance(result, (list, tuple)):
        if any(isinstance(item, DTensor) for item in result):
            return type(result)(_settle(item) for item in result)
        return result
    if not isinstance(result, DTensor):
        return result
    placements = result.placements
    if not result.requires_grad and not any(p.is_partial() for p in placements):
        return result
    batch_axes = _batch_axes(result.device_mesh)
    result = _reduce_partial(result, keep=batch_axes)
    if result.requires_grad:
        if any(
            p.is_replicate() and axis not in batch_axes
            for axis, p in enumerate(result.placements)
        ):
            result.register_hook(
                lambda grad: _reduce_partial(grad, keep=batch_axes)
            )
    return result


class PromoteToDTensorMode(TorchFunctionMode):
    """Promotes plain tensors to replicated DTensors where DTensors are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mesh = _find_mesh(args, kwargs)
        if mesh is not None:
            placements = [Replicate()] * mesh.ndim
            args = tuple(_promote(a, mesh, placements) for a in args)
            kwargs = {
                k: _promote(v, mesh, placements) for k, v in kwargs.items()
            }
            rule = dtensor_rules.RULES.get(func)
            if rule is not None:
                result = rule(func, *args, **kwargs)
            else:
                try:
                    result = func(*args, **kwargs)
                except (RuntimeError, NotImplementedError) as error:
                    # Raised while choosing a sharding, before anything ran.
                    if not dtensor_rules.is_missing_sharding_rule(error):
                        raise
                    result = dtensor_rules.run_replicated(
                        func, mesh, args, kwargs
                    )
            if _keeps_partial(func):
                return result
            return _settle(result)
        return func(*args, **kwargs)


def enable():
    """Push the promotion mode on this thread, once."""
    thread = threading.get_ident()
    if thread in _enabled_threads:
        return
    with _lock:
        if thread in _enabled_threads:
            return
        PromoteToDTensorMode().__enter__()
        _enabled_threads.add(thread)
