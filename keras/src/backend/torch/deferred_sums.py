"""Sums over the batch whose all-reduce waits for the end of backward.

NOTE [deferred sums]: a training step's loss is a sum over the batch, which
is sharded. Reduced as soon as it is computed (NOTE [scalar results] in
`dtensor_promotion`), its all-reduce makes every rank wait for the slowest
in the middle of the forward pass, a second wait per step beside the one
for the gradients, which DDP does not have: on 2 CPU ranks that cost 2-3%
of a step of a 512-4096-512 MLP. Nothing needs the loss's global value
before backward, though: backward only needs the derivatives of what
follows the sum, and for what Keras computes from a loss's sum (dividing
by the batch size, `divide_no_nan`, casts, loss scaling, the losses of
several outputs added up) those do not depend on the value.

So a scalar `Partial` sum made while the trainer computes the loss
(`deferring`; the trainer's block is `dtensor_promotion.deferring_sums`,
which also covers loss scaling and backward, pushes the torch function
mode that sees every use of a pending value, and reduces what is still
pending at its end) is not reduced at once: it goes on as a plain tensor holding
this rank's part (`defer`), pending. An op that is linear in its pending
arguments, whose derivative does not depend on them (`run_linear`: a
pending value scaled by a finite value every rank holds that needs no
gradient, pending values added up, casts between floating dtypes, views,
sums), gives a pending result holding this rank's part of its global
value, computed locally. Any other use of a pending value (reading it, an
attribute other than metadata, a nonlinear op, meeting a DTensor, an
in-place op) first reduces every pending value, in one all-reduce
(`flush`), as if each had been reduced when it was made (up to rounding:
`p0 / n + p1 / n` for `(p0 + p1) / n`). When backward ends with gradients
to reduce, `distributed_gradients` reduces them beside the gradients' last
buckets, where the ranks wait for each other anyway; the trainer reads the
loss for its tracker after backward. What flushes before backward
(regularization losses, added with `torch.stack`; each output's loss
tracker in a model with several) only costs the wait it used to.

Gradients are the same as with the sums reduced at once: the all-reduce's
gradient is the identity, and the ops run on pending values are linear, so
their backward never reads the value. Every rank makes the same pending
values in the same order (the same program on every rank), so their
reductions match: pending values are held (strongly) until they are
reduced, never dropped by one rank's garbage collector and not another's.

A reduction is a collective, which every rank must join: a value read on
some ranks only would start it on those ranks alone. So only the
trainer's own loss computation defers (not a custom loop, which may
`print(float(loss))` on rank 0 alone, nor a model that overrides
`compute_loss`); a loss function given to `compile` must read a sum on
every rank or on none.
"""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate

from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import torch_internals

# id -> (tensor, (mesh, partial axes)), in the order they were made.
_pending = {}
# How many `deferring` blocks are open (only the trainer's thread opens
# them).
_deferring = [0]


@contextlib.contextmanager
def deferring(enabled=True):
    """Defer the sums made within (the trainer's loss computation).

    Args:
        enabled: Whether to defer; False runs the block as it is.
    """
    if not enabled:
        yield
        return
    _deferring[0] += 1
    try:
        yield
    except BaseException:
        # Pending values left by a block that failed (maybe on one rank
        # only) must not join the next step's reduction.
        _pending.clear()
        raise
    finally:
        _deferring[0] -= 1


def any_pending():
    """Whether any value waits for its reduction."""
    return bool(_pending)


def is_pending(x):
    """Whether `x` is a pending value (this rank's part of a sum)."""
    entry = _pending.get(id(x))
    return entry is not None and entry[0] is x


def pending_only_first(args, kwargs):
    """Whether a call has pending values in its first argument only: for a
    backward call (`Tensor.backward`, `autograd.backward`, `autograd.grad`),
    as the tensors it differentiates, not as gradients to start from."""
    rest = dtensor_utils.arguments(args[1:], kwargs)
    return not any(is_pending(a) for a in rest)


def _register(local, key):
    _pending[id(local)] = (local, key)
    return local


def defer(x):
    """This rank's part of the `Partial` sum DTensor `x`, pending.

    Args:
        x: A scalar DTensor, the result of a reduction.

    Returns:
        A plain tensor, differentiable as `x.to_local()` with replicated
        gradient placements; None outside `deferring`, or if `x` is not a
        sum `Partial` over some axes and replicated over the others (then
        it is reduced at once).
    """
    if not _deferring[0]:
        return None
    placements = tuple(x.placements)
    axes = tuple(i for i, p in enumerate(placements) if p.is_partial())
    if not axes or not all(
        (type(p) is Partial and p.reduce_op == "sum") or p.is_replicate()
        for p in placements
    ):
        return None
    if x.requires_grad and torch.is_grad_enabled():
        local = x.to_local(grad_placements=(Replicate(),) * len(placements))
        local = _Copy.apply(local)
    else:
        local = torch_internals.local_tensor(x).clone()
    return _register(local, (x.device_mesh, axes))


class _Copy(torch.autograd.Function):
    """A copy whose gradient passes through: the tensor that its global
    value will be written into, in place, which a view of the DTensor's
    local value (`to_local`) cannot be."""

    @staticmethod
    def forward(ctx, local):
        return local.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


_SCALE = frozenset(
    (
        torch.mul,
        torch.multiply,
        torch.Tensor.mul,
        torch.Tensor.multiply,
        torch.Tensor.__mul__,
        torch.Tensor.__rmul__,
    )
)
_DIVIDE = frozenset(
    (
        torch.div,
        torch.divide,
        torch.true_divide,
        torch.Tensor.div,
        torch.Tensor.divide,
        torch.Tensor.true_divide,
        torch.Tensor.__truediv__,
    )
)
_ADD = frozenset(
    (
        torch.add,
        torch.sub,
        torch.subtract,
        torch.Tensor.add,
        torch.Tensor.sub,
        torch.Tensor.subtract,
        torch.Tensor.__add__,
        torch.Tensor.__radd__,
        torch.Tensor.__sub__,
    )
)
_WHERE = frozenset((torch.where,))
# Ops of one pending tensor and Python values that are linear in it.
_UNARY = frozenset(
    (
        torch.neg,
        torch.Tensor.neg,
        torch.Tensor.__neg__,
        torch.clone,
        torch.Tensor.clone,
        torch.Tensor.detach,
        torch.Tensor.contiguous,
        torch.reshape,
        torch.Tensor.reshape,
        torch.squeeze,
        torch.Tensor.squeeze,
        torch.unsqueeze,
        torch.Tensor.unsqueeze,
        torch.flatten,
        torch.Tensor.flatten,
        torch.sum,
        torch.Tensor.sum,
        torch.mean,
        torch.Tensor.mean,
        torch.Tensor.to,
        torch.Tensor.float,
        torch.Tensor.double,
    )
)


def _constant(arg):
    """Whether `arg` holds the same value on every rank and needs no
    gradient: a finite Python number, or a plain tensor that is not
    pending (taken to be finite: an infinite factor makes each rank's part
    infinite, or not a number where parts of both signs meet)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return math.isfinite(arg)
    return (
        isinstance(arg, torch.Tensor)
        and not isinstance(arg, DTensor)
        and not is_pending(arg)
        and not (arg.requires_grad and torch.is_grad_enabled())
    )


def _is_zero(arg):
    return isinstance(arg, (int, float)) and arg == 0


def _floating_dtypes(args, kwargs):
    """Whether every dtype among the arguments (a cast's) is floating."""
    return all(
        a.is_floating_point
        for a in dtensor_utils.arguments(args, kwargs)
        if isinstance(a, torch.dtype)
    )


def _linear_key(func, args, kwargs):
    """`(key, device)` of `func(*args, **kwargs)`'s pending arguments if it
    is linear in them (one key for all), else `(None, None)`."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    pending = [t for t in tensors if is_pending(t)]
    keys = {_pending[id(t)][1] for t in pending}
    if not pending or len(keys) != 1:
        return None, None
    key = _pending[id(pending[0])][1]
    if func in _UNARY:
        ok = len(tensors) == 1 and bool(args) and is_pending(args[0])
        ok = ok and _floating_dtypes(args, kwargs)
    elif func in _SCALE:
        ok = len(args) == 2 and not kwargs and len(pending) == 1
        ok = ok and all(is_pending(a) or _constant(a) for a in args)
    elif func in _DIVIDE:
        ok = len(args) == 2 and not kwargs and is_pending(args[0])
        ok = ok and _constant(args[1])
    elif func in _WHERE:
        # `divide_no_nan`: where(divisor == 0, 0, sum / divisor).
        ok = len(args) == 3 and not kwargs and _constant(args[0])
        ok = ok and all(is_pending(a) or _is_zero(a) for a in args[1:])
    elif func in _ADD:
        # Pending values added up, or one plus 0 (Python's `sum` starts
        # from 0).
        ok = len(args) == 2 and set(kwargs) <= {"alpha"}
        ok = ok and all(is_pending(a) or _is_zero(a) for a in args)
    else:
        ok = False
    return (key, pending[0].device) if ok else (None, None)


def run_linear(func, args, kwargs):
    """Run `func` on pending values if it is linear in them.

    Args:
        func: The torch function called (as a torch function mode sees
            it).
        args: Its positional arguments, some of them pending (Keras
            variables replaced by their values).
        kwargs: Its keyword arguments.

    Returns:
        `(True, result)`, the result pending, or `(False, None)`: then the
        caller must `flush` before running `func`.
    """
    key, device = _linear_key(func, args, kwargs)
    if key is None:
        return False, None
    result = func(*args, **kwargs)
    if not (
        isinstance(result, torch.Tensor)
        and not isinstance(result, DTensor)
        and result.dtype.is_floating_point
        and result.device == device
    ):
        # An integer result, a move to another device (which the
        # reduction of its group could not take), or anything unexpected:
        # reduce first instead.
        return False, None
    return True, _register(result, key)


class _Reduction:
    """The all-reduce of every pending value, started."""

    def __init__(self, groups):
        self.groups = groups

    def finish(self):
        """Wait, and hand each pending tensor its global value in place."""
        for (mesh, axes), tensors, flat, work in self.groups:
            work.wait()
            for axis in axes[1:]:
                dist.all_reduce(flat, group=mesh.get_group(axis))
            offset = 0
            with torch.no_grad():
                for tensor in tensors:
                    size = tensor.numel()
                    tensor.detach().copy_(
                        flat[offset : offset + size].view(tensor.shape)
                    )
                    offset += size


def start():
    """Start reducing every pending value (asynchronously); return the
    `_Reduction` to `finish`. Every rank calls it at the same point."""
    entries = list(_pending.values())
    _pending.clear()
    grouped = {}
    for tensor, key in entries:
        mesh, axes = key
        slot = (mesh, axes, tensor.dtype, tensor.device)
        grouped.setdefault(slot, []).append(tensor)
    groups = []
    with torch.no_grad():
        for (mesh, axes, _, _), tensors in grouped.items():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            work = dist.all_reduce(
                flat, group=mesh.get_group(axes[0]), async_op=True
            )
            groups.append(((mesh, axes), tensors, flat, work))
    return _Reduction(groups)


def flush():
    """Reduce every pending value now."""
    if _pending:
        start().finish()
