"""Sharding strategies for the backward kernels DTensor lacks.

NOTE [backward strategies]: DTensor (torch 2.13) shards the forward of
pooling, hard activations, reflection and replication padding and
`binary_cross_entropy`, but has no sharding strategy for their backward
kernels (`avg_pool2d_backward`, `max_pool3d_with_indices_backward`,
`hardtanh_backward` for `relu6`, `hardsigmoid_backward`,
`log_sigmoid_backward`, `reflection_pad2d_backward`, ...). A backward
kernel runs inside autograd, below `__torch_function__`, so neither
promotion nor its replicated fallback ever sees the call: `loss.backward()`
fails with "does not have a sharding strategy registered". Rules on the
forward functions would each have to re-implement the op on local
tensors; the kernel that fails is the right depth, so the strategies are
registered with DTensor itself (`register_sharding`), for the kernels that
have none (DTensor's own are never replaced):

- Pointwise backward kernels (`grad_output`, `self`, ...): any dim may be
  sharded, as long as every tensor argument of `self`'s shape is sharded
  alike; a tensor of another shape (an empty buffer) is replicated. A
  kernel that reduces its loss (`binary_cross_entropy_backward` with a
  reduction) divides by the element count, which only the full tensor
  has, so it is replicated there.
- Pooling backward: each (sample, channel) slice is pooled on its own, so
  dims 0 and 1 (channels first, as Keras calls torch's pooling) may be
  sharded, not the pooled spatial dims.
- Padding backward: the dims before the padded ones may be sharded.

Every kernel also accepts all-replicated arguments, so DTensor can always
fall back to gathering.
"""

import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.experimental import register_sharding

from keras.src.backend.torch import torch_internals

aten = torch.ops.aten


def _is_tensor(arg):
    return hasattr(arg, "placements") and hasattr(arg, "shape")


def _strategies(args, shardable_dims, alike):
    """Acceptable `(output, inputs)` placements of a kernel whose output
    has the shape of `args[1]` (`self`): all replicated, or `Shard(d)` for
    each `d` in `shardable_dims` on every tensor argument `alike(arg)`
    selects (the others replicated)."""

    def placements(placement):
        return [
            (placement if alike(a) else Replicate()) if _is_tensor(a) else None
            for a in args
        ]

    result = [([Replicate()], placements(Replicate()))]
    for dim in shardable_dims:
        result.append(([Shard(dim)], placements(Shard(dim))))
    return result


def _pointwise(grad_output, self, *args, **kwargs):
    args = (grad_output, self, *args, *kwargs.values())
    return _strategies(
        args, range(len(self.shape)), lambda a: a.shape == self.shape
    )


def _binary_cross_entropy(grad_output, self, target, weight=None, *args):
    reduction = args[0] if args else 1
    if reduction != 0:  # "mean" or "sum": computed on the full tensor.
        return _strategies((grad_output, self, target, weight), (), None)
    return _pointwise(grad_output, self, target, weight)


def _pooling(grad_output, self, *args, **kwargs):
    args = (grad_output, self, *args, *kwargs.values())
    return _strategies(args, (0, 1), lambda a: len(a.shape) == len(self.shape))


def _padding(dims):
    def strategy(grad_output, self, padding):
        leading = range(len(self.shape) - dims)
        return _strategies(
            (grad_output, self, padding),
            leading,
            lambda a: len(a.shape) == len(self.shape),
        )

    return strategy


_KERNELS = {
    "hardtanh_backward": _pointwise,
    "hardsigmoid_backward": _pointwise,
    "hardswish_backward": _pointwise,
    "log_sigmoid_backward": _pointwise,
    "mish_backward": _pointwise,
    "binary_cross_entropy_backward": _binary_cross_entropy,
    "avg_pool2d_backward": _pooling,
    "avg_pool3d_backward": _pooling,
    "max_pool2d_with_indices_backward": _pooling,
    "max_pool3d_with_indices_backward": _pooling,
    "adaptive_max_pool2d_backward": _pooling,
    "adaptive_max_pool3d_backward": _pooling,
    "_adaptive_avg_pool2d_backward": _pooling,
    "_adaptive_avg_pool3d_backward": _pooling,
    "reflection_pad1d_backward": _padding(1),
    "reflection_pad2d_backward": _padding(2),
    "reflection_pad3d_backward": _padding(3),
    "replication_pad1d_backward": _padding(1),
    "replication_pad2d_backward": _padding(2),
    "replication_pad3d_backward": _padding(3),
}
_registered = False


def _has_strategy(op):
    propagator = torch_internals.sharding_propagator()
    tables = (
        "op_to_rules",
        "op_strategy_funcs",
        "op_single_dim_strategy_funcs",
    )
    return any(op in getattr(propagator, table, {}) for table in tables)


def register():
    """Register the strategies DTensor lacks; idempotent."""
    global _registered
    if _registered:
        return
    for name, strategy in _KERNELS.items():
        packet = getattr(aten, name, None)
        op = getattr(packet, "default", None)
        if op is not None and not _has_strategy(op):
            register_sharding(op)(strategy)
    _registered = True
