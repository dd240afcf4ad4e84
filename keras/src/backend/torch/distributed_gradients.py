"""Where gradients are reduced before the optimizer.

A parameter replicated over a mesh axis on which the batch is sharded gets
a `Partial` gradient: each rank holds the sum over its own rows. It must be
reduced exactly once. Reducing each gradient on its own costs one collective
per parameter, and handing `Partial` gradients to the optimizer costs one
per use; instead, gradients that need the same reduction are packed into
one flat buffer and reduced with a single all-reduce per mesh axis, as DDP's
buckets do.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def _reduction_key(grad):
    """What decides which grads share a buffer, or None if none needed."""
    if not isinstance(grad, DTensor):
        return None
    partial_axes = tuple(
        axis for axis, p in enumerate(grad.placements) if p.is_partial()
    )
    if not partial_axes:
        return None
    ops = tuple(grad.placements[axis].reduce_op for axis in partial_axes)
    return grad.device_mesh, partial_axes, ops, grad.dtype, grad.device


def reduce_gradients(grads):
    """Reduce every `Partial` gradient, one all-reduce per bucket and axis.

    Args:
        grads: List of gradients (tensors, DTensors or None).

    Returns:
        A list of the same length where no DTensor is `Partial` any more.
    """
    buckets = {}
    for index, grad in enumerate(grads):
        key = _reduction_key(grad)
        if key is not None:
            buckets.setdefault(key, []).append(index)
    if not buckets:
        return grads
    grads = list(grads)
    with torch.no_grad():
        for (mesh, axes, ops, _, _), indices in buckets.items():
            locals_ = [grads[i].to_local() for i in indices]
            flat = torch.cat([t.reshape(-1) for t in locals_])
            for axis, op in zip(axes, ops):
                if op not in _REDUCE_OPS:
                    raise ValueError(
                        f"Cannot reduce a gradient that is Partial({op!r}). "
                        f"Supported reductions: {sorted(_REDUCE_OPS)}."
                    )
                dist.all_reduce(
                    flat, op=_REDUCE_OPS[op], group=mesh.get_group(axis)
                )
                if op == "avg":
                    flat /= mesh.size(axis)
            offset = 0
            for i, local in zip(indices, locals_):
                grad = grads[i]
                reduced = flat[offset : offset + local.numel()]
                offset += local.numel()
                placements = [
                    Replicate() if p.is_partial() else p
                    for p in grad.placements
                ]
                grads[i] = DTensor.from_local(
                    reduced.view(local.shape),
                    mesh,
                    placements,
                    run_check=False,
                    shape=grad.shape,
                    stride=grad.stride(),
                )
    return grads
