"""Where the built-in optimizers update distributed variables shard by shard.

NOTE [local updates]: the optimizers Keras runs through
`TorchParallelOptimizer` (Adadelta, Adagrad, Adam, Adamax, AdamW, Lion,
Nadam, RMSprop, SGD) update each variable from its own gradient and its
own slots (momentums, velocities) element by element, with `torch._foreach_*`
ops over the lists of all of them. On DTensors, each of those ops goes
through DTensor's dispatch: a sharding propagation over the whole list and
a new DTensor for every result, for work that never needs another rank (an
element of a variable depends only on the same element of its gradient and
slots). On a transformer LM under `DataParallel` the Adam update took 2-3
times as long on DTensors as on the same tensors without them.

So, for the length of `_parallel_update_step`, each variable, each of the
optimizer's own DTensor variables (slots carry their variable's layout:
`add_variable_from_reference` gives them its `_layout`) and each gradient
is swapped for the local tensor it holds: the update writes the shards in
place, and the DTensors, which share the shards' storage, hold the new
values afterwards. That is exact when each gradient has its variable's mesh
and placements (after `reduce_gradients` a batch-`Partial` gradient is
`Replicate`, a sharded variable's gradient is sharded alike); where one
does not, or anything else is not as expected, the update runs on the
DTensors as before. Optimizers that reduce over a variable (norms, row
means: Adafactor, LAMB, Muon, a user's `update_step`) do not go through
`_parallel_update_step` and never take this path. Gradient clipping and
weight decay run before it, on the DTensors.
"""

import contextlib

from torch.distributed.tensor import DTensor

from keras.src.backend.torch import torch_internals


def _same_layout(grad, value):
    return (
        isinstance(grad, DTensor)
        and grad.device_mesh == value.device_mesh
        and grad.placements == value.placements
        and grad.shape == value.shape
        and not any(p.is_partial() for p in value.placements)
    )


def _local_plan(optimizer, grads, variables):
    """The local gradients and the variables to swap, or None where the
    update must run on DTensors."""
    values = [variable._value for variable in variables]
    if not values or not isinstance(values[0], DTensor):
        return None
    if len(grads) != len(values):
        return None
    for grad, value in zip(grads, values):
        if not isinstance(value, DTensor) or not _same_layout(grad, value):
            return None
    swapped = list(variables)
    for variable in optimizer.variables:
        value = variable._value
        if isinstance(value, DTensor):
            if any(p.is_partial() for p in value.placements):
                return None
            swapped.append(variable)
    local_grads = [torch_internals.local_tensor(grad) for grad in grads]
    return local_grads, swapped


@contextlib.contextmanager
def on_local_shards(optimizer, grads, variables):
    """Run the enclosed update on local shards; see NOTE [local updates].

    Args:
        optimizer: The `TorchParallelOptimizer` updating `variables`.
        grads: The gradients, in the order of `variables`.
        variables: The Keras variables the update writes.

    Yields:
        The gradients to update with: the local tensors of `grads` while
        every variable and optimizer variable holds its local tensor, or
        `grads` themselves when the update must run on DTensors.
    """
    plan = _local_plan(optimizer, grads, variables)
    if plan is None:
        yield grads
        return
    local_grads, swapped = plan
    held = [variable._value for variable in swapped]
    try:
        for variable, value in zip(swapped, held):
            variable._value = torch_internals.local_tensor(value)
        yield local_grads
    finally:
        for variable, value in zip(swapped, held):
            variable._value = value
