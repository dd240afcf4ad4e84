"""Small DTensor helpers that the rest of the torch backend can import.

This module imports nothing from Keras, so `core.py` can use it at import
time without a cycle.
"""

import torch

from keras.src.backend.torch import torch_internals

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor import Replicate

    # `Partial` reductions as `torch.distributed` ops ("avg": a sum, then
    # divided by the number of shards).
    REDUCE_OPS = {
        "sum": dist.ReduceOp.SUM,
        "avg": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }
except ImportError:  # torch built without distributed support.
    DTensor = None


def arguments(args, kwargs):
    """Every argument of a call, and the items of list and tuple arguments
    (`torch.cat`, `torch._foreach_*`)."""
    for group in (args, kwargs.values()):
        for arg in group:
            if isinstance(arg, (list, tuple)):
                yield from arg
            else:
                yield arg


def is_dtensor(x):
    """Return True if `x` is a DTensor."""
    return DTensor is not None and isinstance(x, DTensor)


def is_sharded(x):
    """Return True if `x` is a DTensor sharded over some mesh axis."""
    return is_dtensor(x) and any(p.is_shard() for p in x.placements)


def to_global(x):
    """Return the global value of a DTensor as a plain tensor.

    Partial values are reduced and shards gathered, so every rank gets the
    same full tensor. Reading `.item()` or `.numpy()` of a DTensor directly
    would give the local piece instead. Sharded values are gathered one
    shard at a time into a single full tensor (`shard_streaming`). Other
    values pass through. Not differentiable; see `replicated_local` for the
    differentiable form.

    Args:
        x: Any value.

    Returns:
        A plain `torch.Tensor` for a DTensor, else `x` unchanged.
    """
    if is_dtensor(x):
        from keras.src.backend.torch import shard_streaming

        with torch.no_grad():
            if shard_streaming.supports(x.device_mesh, x.placements):
                return shard_streaming.gather(x)
            return replicated_local(x)
    return x


def contiguous_stride(shape):
    """The strides of a contiguous tensor of `shape`.

    `DTensor.from_local(..., shape=...)` takes the global shape and stride
    when shards are uneven; this gives the stride for a global shape.
    """
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def from_local(local, device_mesh, placements, shape=None):
    """`DTensor.from_local(..., run_check=False)`, cheap when it can be.

    `DTensor.from_local` is an autograd function: its Python costs tens of
    microseconds, paid for every constant that meets a DTensor and every
    batch and gradient made distributed. A local tensor that does not
    require gradients needs no autograd node, so its DTensor is built
    directly (about ten times faster). One that requires gradients goes
    through `DTensor.from_local`, whose backward hands it its gradient.

    Args:
        local: This rank's piece.
        device_mesh: The torch `DeviceMesh`.
        placements: One placement per mesh axis.
        shape: The global shape, needed when shards may be uneven (a last
            batch of 3 rows on 2 ranks). Defaults to the shape DTensor
            infers from even shards.

    Returns:
        The DTensor, aliasing `local`.
    """
    placements = tuple(placements)
    if shape is not None:
        shape = torch.Size(shape)
        stride = contiguous_stride(shape)
    elif not any(p.is_shard() for p in placements):
        shape, stride = local.shape, local.stride()
    if local.requires_grad or shape is None:
        return DTensor.from_local(
            local,
            device_mesh,
            placements,
            run_check=False,
            shape=shape,
            stride=None if shape is None else stride,
        )
    return torch_internals.dtensor_without_autograd(
        local, device_mesh, placements, shape, stride
    )


def _all_reduce(local, device_mesh, placements):
    """`local` reduced over the mesh axes where `placements` are `Partial`:
    in place eagerly, a new tensor when compiling. Use the result."""
    compiling = torch.compiler.is_compiling()
    for axis, placement in enumerate(placements):
        if not placement.is_partial():
            continue
        if compiling:
            # Inductor cannot compile the in-place c10d op; the functional
            # collective is the traceable form of the same all-reduce.
            local = torch_internals.functional_all_reduce(
                local,
                "sum" if placement.reduce_op == "avg" else placement.reduce_op,
                device_mesh.get_group(axis),
            )
            if placement.reduce_op == "avg":
                local = local / device_mesh.size(axis)
            continue
        dist.all_reduce(
            local,
            op=REDUCE_OPS[placement.reduce_op],
            group=device_mesh.get_group(axis),
        )
        if placement.reduce_op == "avg":
            local /= device_mesh.size(axis)
    return local


class _AllReduce(torch.autograd.Function):
    """The all-reduce of a plain tensor, whose gradient passes through as
    it is: DTensor's own gradient for a `Partial` value made `Replicate`."""

    @staticmethod
    def forward(ctx, local, device_mesh, placements):
        return _all_reduce(local.clone(), device_mesh, placements)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def replicated_local(x):
    """The global value of a DTensor, on every rank, as a plain tensor.

    Differentiable: the gradient reaches `x` as a replicated DTensor, as
    through `x.full_tensor()`. A `Partial` DTensor is reduced with one
    `torch.distributed.all_reduce` per axis (115 us for a scalar on 2 CPU
    ranks, where DTensor's redistribution takes 630-700 us); other layouts
    (shards, `Partial` subclasses such as norms) are gathered by DTensor.

    Args:
        x: A DTensor.

    Returns:
        A `torch.Tensor`, the same on every rank.
    """
    placements = tuple(x.placements)
    replicate = (Replicate(),) * len(placements)
    if not all(
        p.is_replicate() or (type(p) is Partial and p.reduce_op in REDUCE_OPS)
        for p in placements
    ):
        x = x.redistribute(x.device_mesh, replicate)
        placements = replicate
    partial = placements != replicate
    if not (x.requires_grad and torch.is_grad_enabled()):
        local = torch_internals.local_tensor(x)
        if partial:
            local = _all_reduce(local.clone(), x.device_mesh, placements)
        return local
    local = x.to_local(grad_placements=replicate)
    if partial:
        local = _AllReduce.apply(local, x.device_mesh, placements)
    return local
