"""Draw a sharded variable's initial value one shard at a time.

A variable sharded by its layout must never exist in full on any rank, not
even while it is initialized. For the initializers whose values are drawn
element by element (constants, normal, truncated normal, uniform, and the
variance-scaling family: Glorot, He, Lecun), each rank draws only its own
shard:

- the distribution's parameters are those of the full shape (the fans of a
  variance-scaling initializer are the full variable's);
- each shard draws from its own seed, derived from the initializer's seed
  and the shard's position, so shards are independent draws and ranks that
  hold the same shard (on a replicated mesh axis) draw the same values.

The values therefore follow the same distribution as a single process's
draw, but are not the same numbers: to start a distributed run from the
weights of a single-process one, load them (`set_weights`, a checkpoint).
Other initializers (`Orthogonal`, `Identity`, custom callables) need the full
shape at once; they are drawn in full, one variable at a time, and sliced.
"""

import numpy as np
import torch
import torch.distributed as dist

from keras.src import initializers
from keras.src.initializers.random_initializers import compute_fans
from keras.src.random.seed_generator import draw_seed

# Initializers whose `__call__` draws independent elements, by the class
# that defines that `__call__`. A subclass that overrides `__call__` is not
# elementwise as far as we know, and is drawn in full.
_CONSTANT_INITIALIZERS = (
    initializers.Zeros,
    initializers.Ones,
    initializers.Constant,
)
_RANDOM_INITIALIZERS = (
    initializers.RandomNormal,
    initializers.TruncatedNormal,
    initializers.RandomUniform,
)


def _defining_class(initializer, classes):
    for cls in classes:
        if isinstance(initializer, cls) and (
            type(initializer).__call__ is cls.__call__
        ):
            return cls
    return None


def local_shard_shape(shape, device_mesh, placements):
    """Return the shape of this rank's shard of a tensor of `shape`.

    Args:
        shape: The global shape; every sharded dimension divides evenly.
        device_mesh: The torch `DeviceMesh`.
        placements: One `Shard(dim)` or `Replicate()` per mesh axis.

    Returns:
        A tuple of ints.
    """
    local = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            local[placement.dim] //= device_mesh.size(mesh_dim)
    return tuple(local)


def _shard_index(device_mesh, placements):
    """Number this rank's shard: equal for ranks holding the same shard."""
    coordinate = device_mesh.get_coordinate()
    index = 0
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            index = index * device_mesh.size(mesh_dim) + coordinate[mesh_dim]
    return index


def _rank_zero_seed(initializer_seed, device_mesh):
    """Draw the initializer's next seed and take rank 0's value.

    Every rank draws (so a `SeedGenerator` advances the same way on every
    rank, as in one process); rank 0's draw is kept, so ranks agree even
    when their global seeds differ.
    """
    seed = [int(s) for s in np.asarray(draw_seed(initializer_seed))]
    device = "cuda" if device_mesh.device_type == "cuda" else "cpu"
    if device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    seed = torch.tensor(seed, dtype=torch.int64, device=device)
    dist.broadcast(seed, src=0)
    return [int(s) for s in seed.tolist()]


def _shard_seed(seed, shard_index):
    """Mix a seed pair and a shard index into one non-negative int."""
    mixed = (seed[0] & 0xFFFFFFFF) * 0x9E3779B1 + (seed[1] & 0xFFFFFFFF)
    mixed = mixed * 0x85EBCA77 + shard_index + 1
    return mixed & 0x7FFFFFFF


def _fan_divisor(initializer, shape):
    fan_in, fan_out = compute_fans(
        shape,
        input_axes=initializer.input_axes,
        output_axes=initializer.output_axes,
    )
    if initializer.mode == "fan_in":
        return max(1.0, fan_in)
    if initializer.mode == "fan_out":
        return max(1.0, fan_out)
    return max(1.0, (fan_in + fan_out) / 2.0)


def draws_by_shard(initializer):
    """Return True if `initializer` can be drawn one shard at a time."""
    if isinstance(initializer, initializers.Constant):
        return np.ndim(initializer.value) == 0 and (
            _defining_class(initializer, _CONSTANT_INITIALIZERS) is not None
        )
    return (
        _defining_class(
            initializer,
            _CONSTANT_INITIALIZERS
            + _RANDOM_INITIALIZERS
            + (initializers.VarianceScaling,),
        )
        is not None
    )


def _shard_initializer(initializer, shape, local_shape, seed):
    """Return an initializer that draws a shard of `initializer`'s value."""
    if _defining_class(initializer, _CONSTANT_INITIALIZERS) is not None:
        return initializer
    cls = _defining_class(initializer, _RANDOM_INITIALIZERS)
    if cls is not None:
        config = initializer.get_config()
        config["seed"] = seed
        return cls.from_config(config)
    # Variance scaling. The shard's fans are smaller than the variable's:
    # rescale so the shard's variance is the one the full shape gives.
    scale = initializer.scale * (
        _fan_divisor(initializer, local_shape)
        / _fan_divisor(initializer, shape)
    )
    return initializers.VarianceScaling(
        scale=scale,
        mode=initializer.mode,
        distribution=initializer.distribution,
        seed=seed,
        input_axes=initializer.input_axes,
        output_axes=initializer.output_axes,
    )


def draw_local_shard(initializer, shape, dtype, device_mesh, placements):
    """Draw this rank's shard of a variable's initial value.

    Args:
        initializer: The variable's initializer; `draws_by_shard()` must
            be True for it.
        shape: The variable's global shape.
        dtype: The variable's dtype.
        device_mesh: The torch `DeviceMesh` of its layout.
        placements: The placements of its layout; sharded dimensions divide
            evenly.

    Returns:
        The local shard, a tensor of `local_shard_shape(...)`.
    """
    local_shape = local_shard_shape(shape, device_mesh, placements)
    seed = None
    if _defining_class(initializer, _CONSTANT_INITIALIZERS) is None:
        seed = _shard_seed(
            _rank_zero_seed(initializer.seed, device_mesh),
            _shard_index(device_mesh, placements),
        )
    shard_initializer = _shard_initializer(
        initializer, tuple(shape), local_shape, seed
    )
    value = shard_initializer(local_shape, dtype=dtype)
    if tuple(value.shape) != local_shape:
        raise AssertionError(
            f"Drew a shard of shape {tuple(value.shape)} for a variable of "
            f"shape {tuple(shape)}; expected {local_shape}."
        )
    return value
