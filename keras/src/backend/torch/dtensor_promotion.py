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
                return rule(func, *args, **kwargs)
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as error:
                # Raised while choosing a sharding, before anything ran.
                if not dtensor_rules.is_missing_sharding_rule(error):
                    raise
                return dtensor_rules.run_replicated(func, mesh, args, kwargs)
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
