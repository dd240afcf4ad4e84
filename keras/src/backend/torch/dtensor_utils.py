"""Small DTensor helpers that the rest of the torch backend can import.

This module imports nothing from Keras, so `core.py` can use it at import
time without a cycle.
"""

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support.
    DTensor = None


def is_dtensor(x):
    """Return True if `x` is a DTensor."""
    return DTensor is not None and isinstance(x, DTensor)


def to_global(x):
    """Return the global value of a DTensor as a plain tensor.

    Partial values are reduced and shards gathered, so every rank gets the
    same full tensor. Reading `.item()` or `.numpy()` of a DTensor directly
    would give the local piece instead. Other values pass through.

    Args:
        x: Any value.

    Returns:
        A plain `torch.Tensor` for a DTensor, else `x` unchanged.
    """
    if is_dtensor(x):
        with torch.no_grad():
            return x.full_tensor()
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


def from_local_with_shape(local, device_mesh, placements, shape):
    """`DTensor.from_local` for shards that may be uneven.

    DTensor infers the global shape from the local one, assuming even
    shards; when they are not (a last batch of 3 rows on 2 ranks), the
    global shape and stride must be given.

    Args:
        local: This rank's shard.
        device_mesh: The torch `DeviceMesh`.
        placements: One placement per mesh axis.
        shape: The global shape.

    Returns:
        The DTensor.
    """
    return DTensor.from_local(
        local,
        device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=contiguous_stride(shape),
    )
