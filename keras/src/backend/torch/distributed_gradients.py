"""Where gradients are reduced before the optimizer.

A parameter replicated over a mesh axis on which the batch is sharded gets
a `Partial` gradient: each rank holds the sum over its own rows. It must be
reduced exactly once. Reducing each gradient on its own costs one collective
per parameter, and handing `Partial` gradients to the optimizer costs one
per use; instead, gradients that need the same reduction are packed into
flat buckets, each reduced with one all-reduce per mesh axis, as DDP does.

NOTE [overlap]: distributed parameters are watched (`watch`): as backward
accumulates their gradients, they fill buckets, and a bucket whose size
reaches KERAS_TORCH_GRADIENT_BUCKET_MB (default 4) starts its all-reduce at
once, asynchronously, while backward goes on. A gradient that size or
larger is its own bucket and is reduced in place: copying megabytes into a
flat buffer costs more than the extra collective saves (a few megabytes
already fill the link), and the copy was 8% of a step of a
512-4096-512 MLP on 2 CPU ranks. When backward ends (a callback queued on
the autograd engine, as DDP does) the last buckets start, all are waited
for, and each parameter's `.grad` is replaced by its reduced gradient:
after `loss.backward()`, gradients are already reduced (`Replicate` where
they were `Partial`), whoever reads them. Every rank runs the same graph,
so buckets form identically on every rank.

A second backward before the optimizer (gradient accumulation) adds its
`Partial` gradient to the reduced one: DTensor reduces it for the sum, one
collective per parameter. `reduce_gradients`, called by the optimizer's
`apply`, reduces any `Partial` gradient still handed to it (from
`torch.autograd.grad`, or edited by the caller) in buckets, synchronously.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate

from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import torch_internals

# Buckets start their all-reduce once they hold this many megabytes.
BUCKET_MB_ENV = "KERAS_TORCH_GRADIENT_BUCKET_MB"
_DEFAULT_BUCKET_MB = 4.0


def _bucket_bytes():
    value = os.environ.get(BUCKET_MB_ENV, _DEFAULT_BUCKET_MB)
    try:
        return float(value) * 2**20
    except ValueError:
        raise ValueError(
            f"{BUCKET_MB_ENV} must be a number of megabytes. Received: "
            f"{BUCKET_MB_ENV}={value!r}"
        )


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


def _local(grad):
    return torch_internals.local_tensor(grad)


# Flat buffers kept from one step to the next, by bucket key and size, as
# DDP keeps its buckets: allocating (and faulting in) megabytes for every
# bucket of every step costs as much as the copy into it. A buffer is
# reused only while no bucket is reducing into it (`_busy`) and nothing
# else holds its storage (a reduced gradient is a view of it, and may be
# kept by the caller).
_buffers = {}
_busy = set()


def _storage_users(tensor):
    return torch_internals.storage_users(tensor)


def _flat_buffer(key, pieces):
    numel = sum(piece.numel() for piece in pieces)
    slot = (key, numel)
    entry = _buffers.get(slot)
    if entry is not None and id(entry[0]) not in _busy:
        buffer, idle_users = entry
        if idle_users is not None and _storage_users(buffer) == idle_users:
            _busy.add(id(buffer))
            return buffer
    buffer = torch.empty(numel, dtype=pieces[0].dtype, device=pieces[0].device)
    _buffers[slot] = (buffer, _storage_users(buffer))
    _busy.add(id(buffer))
    return buffer


def _nbytes(grad):
    return _local(grad).numel() * _local(grad).element_size()


class _Bucket:
    """Gradients reduced together along the partial axes: packed into one
    flat buffer, or a single gradient reduced in place."""

    def __init__(self, key):
        self.key = key
        self.grads = []
        self.parameters = []
        self.nbytes = 0
        self.flat = None
        self.in_place = False
        self.work = None

    def add(self, grad, parameter=None):
        self.grads.append(grad)
        self.parameters.append(parameter)
        self.nbytes += _nbytes(grad)
        return self

    def describe(self):
        """What must be the same on every rank: the reduction, and each
        gradient's variable (by position) and shape, in order."""
        mesh, axes, ops, dtype, _ = self.key
        return {
            "reduction": (
                f"{list(ops)} over mesh axes "
                f"{[mesh.mesh_dim_names[a] for a in axes]}, {dtype}"
            ),
            "gradients (by position in the model's trainable variables)": [
                _order.get(id(p), ("?",))[0] for p in self.parameters
            ],
            "gradient shapes": [list(g.shape) for g in self.grads],
        }

    def start(self, async_op, in_place=False):
        """Start the all-reduce. `in_place` reduces a bucket of one
        contiguous gradient in its own memory, which only a gradient about
        to be replaced by its reduced value may be."""
        mesh, axes, ops, _, _ = self.key
        if _verify[0]:
            _check_same_on_every_rank(self)
        for op in ops:
            if op not in dtensor_utils.REDUCE_OPS:
                raise ValueError(
                    f"Cannot reduce a gradient that is Partial({op!r}). "
                    f"Supported reductions: {sorted(dtensor_utils.REDUCE_OPS)}."
                )
        locals_ = [_local(g).detach().reshape(-1) for g in self.grads]
        self.in_place = (
            in_place
            and len(self.grads) == 1
            and _local(self.grads[0]).is_contiguous()
        )
        if self.in_place:
            self.flat = locals_[0]
        else:
            with torch.no_grad():
                self.flat = torch.cat(
                    locals_, out=_flat_buffer(self.key, locals_)
                )
        self.work = dist.all_reduce(
            self.flat,
            op=dtensor_utils.REDUCE_OPS[ops[0]],
            group=mesh.get_group(axes[0]),
            async_op=async_op,
        )
        return self

    def finish(self):
        """Wait, reduce the other axes; return `(parameter, grad, reduced)`
        for every gradient of the bucket."""
        mesh, axes, ops, _, _ = self.key
        if self.work is not None:
            self.work.wait()
        if not self.in_place:
            _busy.discard(id(self.flat))
        with torch.no_grad():
            for index, (axis, op) in enumerate(zip(axes, ops)):
                if index:
                    dist.all_reduce(
                        self.flat,
                        op=dtensor_utils.REDUCE_OPS[op],
                        group=mesh.get_group(axis),
                    )
                if op == "avg":
                    self.flat /= mesh.size(axis)
        results, offset = [], 0
        for grad, parameter in zip(self.grads, self.parameters):
            local = _local(grad)
            reduced = self.flat[offset : offset + local.numel()]
            offset += local.numel()
            placements = [
                Replicate() if p.is_partial() else p for p in grad.placements
            ]
            reduced = dtensor_utils.from_local(
                reduced.view(local.shape), mesh, placements, grad.shape
            )
            results.append((parameter, grad, reduced))
        return results


# NOTE [checked buckets]: every rank must form the same buckets, in the
# same order, or the all-reduces pair unrelated gradients (summed
# silently when their sizes match, a hang when they do not). DDP
# broadcasts rank 0's bucket order; here the ranks compare each bucket's
# composition before reducing it, on the first backward pass after
# `verify_next_buckets` (called before training starts): one small
# collective per bucket, once.
_verify = [False]
_order = {}


def verify_next_buckets(trainable_variables):
    """Compare every bucket across ranks in the next backward pass.

    Args:
        trainable_variables: The model's trainable variables: a bucket's
            gradients are named by their position in this list, the same
            on every rank that runs the same model code.
    """
    _order.clear()
    # Keyed by id, with the parameter kept alive beside its position: a
    # freed parameter's id may be reused by a new one on one rank only.
    _order.update(
        (id(v._value), (index, v._value))
        for index, v in enumerate(trainable_variables)
    )
    _verify[0] = True


def _check_same_on_every_rank(bucket):
    from keras.src.backend.torch import cross_rank

    cross_rank.check_same(
        "gradient buckets",
        bucket.describe(),
        "The ranks' backward passes produced different gradients: every "
        "rank must run the same model code, with the same layouts.",
    )


_filling = {}
_in_flight = []
# The backward pass (autograd graph task) whose end is awaited, if any: a
# pass that raised never runs its callback, and must not stop the next
# pass from queuing its own.
_finish_queued_for = [None]


def _start_filling():
    for bucket in _filling.values():
        _in_flight.append(bucket.start(async_op=True))
    _filling.clear()


def _finish_backward():
    """At the end of backward: reduce every bucket still open, wait for all,
    and hand each parameter its reduced gradient."""
    with torch_internals.torch_function_subclasses_disabled():
        _finish_buckets()


def _finish_buckets():
    _finish_queued_for[0] = None
    _start_filling()
    _verify[0] = False
    _order.clear()
    buckets = list(_in_flight)
    _in_flight.clear()
    for bucket in buckets:
        for parameter, grad, reduced in bucket.finish():
            if parameter is not None and parameter.grad is grad:
                parameter.grad = reduced


def _drop_unfinished_backward():
    """Forget what a backward pass that raised left behind.

    NOTE [failed backward]: a pass that raises (out of memory, caught by
    the user, who retries with a smaller batch) never runs its end
    callback: it leaves half-filled buckets and started all-reduces. The
    next pass drops them before its first gradient, so none joins its
    reduction. The started all-reduces are waited for, not cancelled: every
    rank started them, and a collective must complete on every rank (when
    backward raised on every rank alike, as the same error on the same
    graph does). Their results, and the half-filled buckets, are discarded.
    """
    for bucket in _in_flight:
        if bucket.work is not None:
            bucket.work.wait()
        if not bucket.in_place:
            _busy.discard(id(bucket.flat))
    _in_flight.clear()
    _filling.clear()


# The bucket size of the backward pass under way (read once a pass).
_bytes_this_pass = [None]


def _on_gradient_ready(parameter):
    # Runs once per parameter per backward pass, and touches no op that
    # mixes plain tensors with DTensors: with `__torch_function__` off, its
    # reads of `.grad`, `.placements` and `.shape` skip promotion's
    # handler (NOTE [promotion] in `dtensor_promotion`).
    with torch_internals.torch_function_subclasses_disabled():
        _add_gradient(parameter)


def _add_gradient(parameter):
    grad = parameter.grad
    key = _reduction_key(grad)
    if key is None:
        return
    task = torch_internals.current_backward_id()
    if _finish_queued_for[0] != task:
        if _finish_queued_for[0] is not None:
            _drop_unfinished_backward()
        _finish_queued_for[0] = task
        _bytes_this_pass[0] = _bucket_bytes()
        torch_internals.run_at_end_of_backward(_finish_backward)
    if _nbytes(grad) >= _bytes_this_pass[0]:
        bucket = _Bucket(key).add(grad, parameter)
        _in_flight.append(bucket.start(async_op=True, in_place=True))
        return
    bucket = _filling.setdefault(key, _Bucket(key))
    bucket.add(grad, parameter)
    if bucket.nbytes >= _bytes_this_pass[0]:
        del _filling[key]
        _in_flight.append(bucket.start(async_op=True))


def watch(parameter):
    """Reduce `parameter`'s gradients during backward; see NOTE [overlap]."""
    parameter.register_post_accumulate_grad_hook(_on_gradient_ready)


def reduce_gradients(grads):
    """Reduce every `Partial` gradient exactly once; see the module doc.

    Gradients that backward accumulated into watched parameters are reduced
    already; this reduces the others, in buckets.

    Args:
        grads: List of gradients (tensors, DTensors or None).

    Returns:
        A list of the same length where no DTensor is `Partial` any more.
    """
    if not any(isinstance(grad, DTensor) for grad in grads):
        # Nothing distributed: return before any bookkeeping, which would
        # make torch.compile guard on every gradient and recompile.
        return grads
    grads = list(grads)
    pending = {}
    for index, grad in enumerate(grads):
        key = _reduction_key(grad)
        if key is not None:
            pending.setdefault(key, []).append(index)
    for key, indices in pending.items():
        bucket = _Bucket(key)
        for index in indices:
            bucket.add(grads[index])
        results = bucket.start(async_op=False).finish()
        for index, (_, _, reduced) in zip(indices, results):
            grads[index] = reduced
    return grads
