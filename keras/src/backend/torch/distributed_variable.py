"""Where a Keras variable's value becomes a DTensor.

Under a distribution whose mesh has more than one device, every variable is
a DTensor with the layout the distribution gives it (`LayoutMap` entry, or
replicated). Each rank holds only its shard:

- a sharded variable created from an initializer is drawn shard by shard
  (`shard_initializers`), so it never exists in full on any rank;
- otherwise rank 0's full initial value is the one kept (broadcast or
  scattered), so replicated variables are identical on every rank.

NOTE [plain scalars]: a scalar variable that needs no gradient (a metric's
`total` and `count`, the optimizer's `iterations` and learning rate, a loss
scale) keeps rank 0's initial value as a plain tensor instead. A scalar
cannot be sharded, and every value assigned to it is global: a DTensor is
reduced or gathered first (`value_to_assign`), and the promotion handler
makes a DTensor of the plain value wherever it meets one. As a DTensor,
each of Keras's bookkeeping calls on it (`assign_add`, `divide_no_nan`)
cost 5-10 times as much, through DTensor's dispatch; a training step makes
dozens. A plain value assigned to such a scalar is taken as it is on each
rank, as promotion takes plain values that meet DTensors (values
computed from replicated state); a replicated DTensor variable instead
takes rank 0's, at the cost of a broadcast (a metric reset was two per
`train_on_batch`).
"""

import math

import numpy as np
import torch

from keras.src.backend.common import global_state
from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import shard_streaming


def _variable_layout(variable):
    """Return the variable's `TensorLayout`, or None if not distributed."""
    if variable._layout is None:
        distribution = global_state.get_global_attribute("distribution")
        if distribution is None:
            return None
        layout = distribution.get_variable_layout(variable)
        _check_layout_rank(variable, layout)
        variable._layout = layout
    layout = variable._layout
    device_mesh = getattr(layout, "device_mesh", None)
    if device_mesh is None or math.prod(device_mesh.shape) == 1:
        # A mesh of one device needs no DTensor: same as no distribution.
        return None
    return layout


def _check_layout_rank(variable, layout):
    """Raise if `layout` names more dimensions than the variable has.

    A layout with fewer entries leaves the last dimensions unsharded, as a
    JAX `PartitionSpec` does: layout maps written for JAX work unchanged.
    """
    axes = getattr(layout, "axes", None)
    shape = variable._shape
    if axes is None or shape is None or len(axes) <= len(shape):
        return
    raise ValueError(
        f"The layout of variable '{variable.path}' has {len(axes)} "
        f"entries, {tuple(axes)}, but the variable has {len(shape)} "
        f"dimension(s), shape {tuple(shape)}. Give the layout at most one "
        "entry per dimension, `None` for a dimension that is not sharded "
        "(in the LayoutMap, under the key that matches this path)."
    )


def _as_parameter(variable, value, distributed):
    """Wrap a variable's value (tensor or DTensor) as a `Parameter`.

    Only floating point and complex variables that are trainable require
    gradients: integer variables (the optimizer's `iterations`, seeds,
    counters) cannot, and are plain non-trainable parameters.
    """
    requires_grad = _requires_grad(variable, value)
    parameter = torch.nn.Parameter(value, requires_grad=requires_grad)
    if distributed and requires_grad:
        from keras.src.backend.torch import distributed_gradients

        distributed_gradients.watch(parameter)
    return parameter


def _requires_grad(variable, value):
    return bool(variable.trainable) and (
        value.is_floating_point() or value.is_complex()
    )


def new_parameter(variable, value, device):
    """Return the `torch.nn.Parameter` holding a new variable's value.

    Args:
        variable: The Keras `Variable` being initialized.
        value: Its full initial value, a `torch.Tensor` of its dtype.
        device: The torch device the value belongs on.

    Returns:
        A `torch.nn.Parameter`, wrapping a DTensor when distributed (but
        see NOTE [plain scalars]).
    """
    value = value.to(device)
    # The distribution reads the shape to choose a layout; for a variable
    # created from a value it is not set yet.
    variable._shape = variable._validate_shape(value.shape)
    layout = _variable_layout(variable)
    if layout is None:
        return _as_parameter(variable, value, False)
    from keras.src.backend.torch import distribution_lib

    value = distribution_lib._distribute_variable(
        value, layout, f"variable '{variable.path}'"
    )
    if value.ndim == 0 and not _requires_grad(variable, value):
        # NOTE [plain scalars]. Replicated: the local value is rank 0's.
        return _as_parameter(variable, value.to_local(), False)
    return _as_parameter(variable, value, True)


def parameter_from_initializer(variable, initializer, device):
    """Return the `torch.nn.Parameter` of a variable with an initializer.

    A sharded variable whose initializer draws elementwise is drawn shard
    by shard on each rank; every other variable is drawn in full and
    handed to `new_parameter`.

    Args:
        variable: The Keras `Variable` being initialized; its shape and
            dtype are set.
        initializer: A callable `(shape, dtype) -> value`.
        device: The torch device the value belongs on.

    Returns:
        A `torch.nn.Parameter`, wrapping a DTensor when distributed.
    """
    # Imported here: it imports keras initializers, which import `core`.
    from keras.src.backend.torch import shard_initializers

    layout = _variable_layout(variable)
    if layout is not None and shard_initializers.draws_by_shard(initializer):
        from keras.src.backend.torch import distribution_lib

        name = f"variable '{variable.path}'"
        dtensor_layout = distribution_lib._as_dtensor_layout(layout)
        if not dtensor_layout.is_fully_replicated:
            distribution_lib._check_divisible(
                variable._shape, dtensor_layout, name
            )
            distribution_lib._check_same_variable_on_every_rank(
                variable._shape, variable._dtype, dtensor_layout, name
            )
            distribution_lib._mark_dtensors_in_use()
            mesh = dtensor_layout.device_mesh
            placements = dtensor_layout.placements
            local = shard_initializers.draw_local_shard(
                initializer, variable._shape, variable._dtype, mesh, placements
            )
            local = variable._convert_to_tensor(local, dtype=variable._dtype)
            value = dtensor_utils.from_local(
                local.to(device), mesh, placements, variable._shape
            )
            return _as_parameter(variable, value, True)
    value = variable._convert_to_tensor(
        initializer(variable._shape, dtype=variable._dtype),
        dtype=variable._dtype,
    )
    return new_parameter(variable, value, device)


def borrow_array(variable, value):
    """A NumPy `value` for a DTensor variable, as a tensor on its memory.

    Keras converts a value to a tensor before assigning it, and converting
    an array copies it. A DTensor variable only reads the value, to write
    its shards, so the copy is one more full-size tensor for nothing: on a
    large variable being loaded from a file, the one that runs out of
    memory. Other values, and values for plain variables (which may keep
    the tensor they are given, as a stateless scope does), are returned
    as they are.

    Args:
        variable: The Keras variable being assigned to.
        value: The value given to `assign`.

    Returns:
        A tensor sharing `value`'s memory, or `value` unchanged.
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    if (
        not isinstance(value, np.ndarray)
        or not value.flags.writeable
        or not dtensor_utils.is_dtensor(variable._value)
        or in_stateless_scope()
    ):
        return value
    try:
        return torch.from_numpy(value)
    except TypeError:  # A dtype torch has no tensors of (bfloat16 arrays).
        return value


def value_to_assign(current, value):
    """Return `value` in the layout of a variable's `current` value.

    A DTensor of another layout is redistributed (a `Partial` one is reduced
    once). A plain tensor assigned to a DTensor variable is taken from rank
    0, so every rank stores the same value; when it is sharded, rank 0's
    value is written straight into every rank's shard of `current`
    (`shard_streaming`), and `current` itself is returned. A DTensor
    assigned to a plain variable is gathered.

    Args:
        current: The variable's current value (tensor or DTensor).
        value: The value to assign.

    Returns:
        A tensor that `current.copy_()` accepts, or `current` when the
        value has already been written into it.
    """
    if not dtensor_utils.is_dtensor(current):
        return dtensor_utils.to_global(value)
    mesh, placements = current.device_mesh, tuple(current.placements)
    if dtensor_utils.is_dtensor(value):
        if value.device_mesh == mesh and tuple(value.placements) == placements:
            return value
        return value.redistribute(mesh, placements)
    from torch.distributed.tensor import distribute_tensor

    value = torch.as_tensor(value, dtype=current.dtype, device=current.device)
    if tuple(value.shape) != tuple(current.shape):
        value = value.expand(current.shape)
    if shard_streaming.supports(mesh, placements):
        with torch.no_grad():
            shard_streaming.scatter_into(current, value.detach())
        return current
    # `distribute_tensor` broadcasts into its argument in place.
    return distribute_tensor(value.detach().clone(), mesh, placements)
