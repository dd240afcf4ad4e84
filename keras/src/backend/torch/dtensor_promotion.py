"""Plain tensors meeting DTensors: one mechanism for every op.

DTensor refuses ops that mix it with plain tensors ("got mixed torch.Tensor
and DTensor"). Under a distribution, Keras code mixes them all the time:
constants made by ops (`ones`, `arange`, masks, epsilons), random draws,
tensors made by layers, variables created before the distribution.

NOTE [promotion]: once the first DTensor exists, `enable` installs a
handler as `DTensor.__torch_function__` (DTensor's own is disabled: its
calls go straight to dispatch). Torch calls that handler for every call
whose arguments include a DTensor, and never for one that has none, so
code that never meets a DTensor pays nothing for it, and no torch
function mode a user enters or leaves (`with torch.device(...)`, their
own `TorchFunctionMode`) can take it away, as it could a mode pushed on
the stack once. The handler promotes each plain tensor argument to a
DTensor replicated on the same mesh (`dtensor_utils.from_local`, no
communication). That covers every backend op (numpy, nn, math, linalg,
layer code) in one place. The promotion is differentiable, so backward
sees only DTensors and needs nothing more: a gradient flowing back to a
promoted plain tensor arrives as its full value.

A promoted tensor is taken to hold the same value on every rank, which is
true of constants and of values computed from replicated state. Per-rank
data never takes this path: input batches are sharded explicitly by
`distributed_data`.

NOTE [made in C++]: what the handler cannot see is a tensor that torch
makes in C++, inside an op's decomposition or backward formula below
`__torch_function__`: the causal mask of the math attention kernel, the
zeros `prod`'s backward concatenates, the mask `cumprod`'s backward
selects with. DTensor would refuse the mixed op ("got mixed torch.Tensor
and DTensor"). Such a tensor is made from shapes and constants, the same
on every rank, so it is replicated, which is what DTensor's implicit
replication (`torch.distributed.tensor.experimental.implicit_replication`)
takes every plain tensor in an aten op to be: the handler turns it on for
each thread that meets a DTensor (the flag is per thread; autograd carries
it into backward). It is the same assumption promotion makes one level
up, so a plain tensor means the same thing wherever it is met.

The same handler sends the few ops that DTensor cannot shard the way Keras
needs (convolutions over a batch-sharded input, attention, embedding
lookups) to the rules in `dtensor_rules`.

NOTE [fallback]: an op runs replicated (its DTensor arguments gathered,
the op run on the local values, a replicated result;
`dtensor_rules.run_replicated`) under explicit conditions only: the op is
listed in `dtensor_rules.RUN_REPLICATED`; or DTensor's sharding
propagation raised its "no sharding strategy" `NotImplementedError` (e.g.
`repeat_interleave` with tensor repeats, which metrics use); or an
argument is sharded unevenly (NOTE [uneven gradients]) and the op failed
before running. If the replicated run fails too, the op's own error is
raised. Every other error is raised as it is, never retried: a shape
error reads as it would in one process, and nothing runs twice.

NOTE [partial results]: an op whose result is `Partial` over a model axis
(a matmul over a sharded contraction dimension) has it reduced right away,
as tensor parallelism does at the output of a row-parallel layer. Left
`Partial`, the value would be reduced implicitly inside the next op, whose
backward then reuses the `Partial` input: gradients upstream come out
`Partial` and full-size instead of sharded (a row-parallel kernel's
gradient would be all of the kernel on every rank). Reducing it with an
explicit redistribution costs the same all-reduce, and its backward keeps
the gradient replicated. `Partial` over the batch axis is left to DTensor
and `distributed_gradients`, which reduces parameter gradients in buckets,
except in scalars (NOTE [scalar results]). Attribute reads (a parameter's
gradient) and in-place ops keep their result as is.

NOTE [scalar results]: a scalar that an op computes from a DTensor that is
not a scalar (a loss, a metric's sum, a mean) is reduced over every mesh
axis, and goes on as a plain tensor holding the same value on every rank
(`dtensor_utils.replicated_local`; its gradient reaches the DTensor
replicated, as DTensor's own does), at once. Keras's
bookkeeping on such scalars (the end of the loss's reduction, the loss
tracker, metric results, loss scaling: a dozen small ops a step) then
costs what it costs in one process instead of DTensor's dispatch for each
op; a plain scalar that meets a DTensor again is promoted, replicated,
which it is. A `Partial` scalar is reduced before any use anyway (nothing
shards a scalar), so this adds no collective, but where two of them would
have been added up before their reduction (one all-reduce each, about
0.1 ms on 2 CPU ranks). Ops on scalar DTensors (a trainable scalar variable, its
`detach`) keep them DTensors. In a DataParallel step of a 512-4096-512
MLP on 2 CPU ranks, the loss, the loss tracker and their backward took
3.3-4.4 ms before, 2.6-3.3 ms now.

NOTE [uneven gradients]: DTensor cannot merge a dimension that is sharded
unevenly with another one (a view of `(7, 6, 8)` split 4/3 as `(42, 8)`).
Forward ops that need to are run replicated (`run_replicated`), so values
computed from a final batch of 7 rows on 2 ranks may be replicated. In
backward, though, DTensor may hand such a replicated value a gradient
sharded like the batch (the gradient of `x + y` for a replicated `y` and a
batch-sharded `x`), and the backward of the ops that made it (an einsum's
views) then fail. So a result replicated over some mesh axes gets its
gradient gathered over those axes when backward brings it unevenly sharded
there, and so does a result `Partial` over the batch axis (a contraction
with a weight sharded over that axis, FSDP-style). Evenly sharded
gradients are kept as they are: DTensor handles them.
`Tensor.backward` itself never falls back to `run_replicated`: an error in
backward is raised as it is, not by a second backward pass.

The handler is process-wide.
"""

import contextlib
import functools

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate

from keras.src.backend.common.variables import Variable as KerasVariable
from keras.src.backend.torch import dtensor_rules
from keras.src.backend.torch import dtensor_strategies
from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import torch_internals

# Calls that run backward: never retried replicated (NOTE [uneven
# gradients]).
_BACKWARD = frozenset(
    (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
)


def _value(arg):
    return arg.value if isinstance(arg, KerasVariable) else arg


def _scan(args, kwargs):
    """Find the arguments' mesh, and whether any argument needs promoting.

    Most calls that meet a DTensor have only DTensors and Python values:
    they skip promotion altogether.

    Returns:
        `(mesh, promote)`: the mesh of the first DTensor (or Keras variable
        holding one), None if there is none; and whether there is a plain
        tensor to promote or a Keras variable to replace by its value.
    """
    mesh = None
    promote = False
    for arg in dtensor_utils.arguments(args, kwargs):
        if isinstance(arg, KerasVariable):
            promote = True
            arg = arg.value
        elif isinstance(arg, torch.Tensor) and not isinstance(arg, DTensor):
            promote = True
        if mesh is None and isinstance(arg, DTensor):
            mesh = arg.device_mesh
    return mesh, promote


def _promote(arg, mesh, placements):
    arg = _value(arg)
    if isinstance(arg, DTensor):
        return arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(_promote(item, mesh, placements) for item in arg)
    if isinstance(arg, torch.Tensor):
        if arg.device.type != mesh.device_type:
            arg = arg.to(mesh.device_type)
        return dtensor_utils.from_local(arg, mesh, placements)
    return arg


def _reduce_partial(x, keep=()):
    """Reduce the `Partial` placements of a DTensor, except on `keep` axes.

    Only sums and means are kept there. A `Partial` min or max (`ops.min`
    of a batch-sharded tensor) is reduced on every axis: no gradient
    reduction waits for it, and code reads it as a value (keras-hub's
    samplers index the prompt with the shortest prompt's length), which a
    `Partial` DTensor gives as this rank's local value.
    """
    placements = x.placements
    if not any(p.is_partial() for p in placements):
        return x
    target = [
        Replicate()
        if p.is_partial()
        and (axis not in keep or p.reduce_op not in ("sum", "avg"))
        else p
        for axis, p in enumerate(placements)
    ]
    if target == list(placements):
        return x
    return x.redistribute(x.device_mesh, target)


def _batch_dim_name():
    """The batch axis name of the current distribution, or None."""
    from keras.src.distribution import distribution_lib

    return getattr(distribution_lib.distribution(), "batch_dim_name", None)


@functools.lru_cache(maxsize=None)
def _axes_named(names, name):
    return tuple(i for i, n in enumerate(names or ()) if n == name)


def _batch_axes(mesh):
    """Mesh axes over which the batch is sharded (gradients reduced later)."""
    return _axes_named(mesh.mesh_dim_names, _batch_dim_name())


def _is_reduction_to_scalar(result, args, kwargs):
    """Whether `result` is a scalar DTensor computed from a DTensor that is
    not a scalar."""
    return (
        isinstance(result, DTensor)
        and result.ndim == 0
        and any(
            isinstance(arg, DTensor) and arg.ndim
            for arg in dtensor_utils.arguments(args, kwargs)
        )
    )


def _settle(result):
    """Reduce a result's `Partial` placements; keep its gradient reduced.

    See NOTE [partial results]. Only model axes are reduced: `Partial` over
    a batch axis (a mean over the batch, parameter gradients) is left to
    DTensor and `distributed_gradients`. A result replicated over a model
    axis gets a gradient hook that reduces a `Partial` gradient on that
    axis as soon as backward reaches it, as the input of a column-parallel
    layer does in tensor parallelism.
    """
    if isinstance(result, (list, tuple)):
        if any(isinstance(item, DTensor) for item in result):
            return type(result)(_settle(item) for item in result)
        return result
    if not isinstance(result, DTensor):
        return result
    placements = result.placements
    if not result.requires_grad and not any(p.is_partial() for p in placements):
        return result
    batch_axes = _batch_axes(result.device_mesh)
    result = _reduce_partial(result, keep=batch_axes)
    # Only results of the graph get the hook: a leaf that requires grad is
    # a parameter returned as is (`variable.to(dtype)` of its own dtype),
    # whose gradient `distributed_gradients` reduces, and a hook registered
    # on it each step would pile up.
    if result.requires_grad and result.grad_fn is not None:
        hook = _gradient_hook(result, batch_axes)
        if hook is not None:
            result.register_hook(hook)
    return result


def _is_uneven(x, dim):
    """Whether dimension `dim` of DTensor `x` is split unevenly."""
    parts = 1
    for axis, p in enumerate(x.placements):
        if p.is_shard() and p.dim == dim:
            parts *= x.device_mesh.size(axis)
    return x.shape[dim] % parts != 0


def _gather_uneven(grad, axes):
    """Make `grad` replicated on those of `axes` that shard it unevenly."""
    if not isinstance(grad, DTensor):
        return grad
    target = list(grad.placements)
    for axis in axes:
        p = target[axis]
        if p.is_shard() and _is_uneven(grad, p.dim):
            target[axis] = Replicate()
    if target == list(grad.placements):
        return grad
    return grad.redistribute(grad.device_mesh, target)


@functools.lru_cache(maxsize=4096)
def _gradient_plan(placements, shape, devices, batch_axes):
    """What the gradient hook of a result does: `(reduce, gather_axes)`.

    A result replicated over a model axis has its gradient's `Partial`
    placements there reduced (NOTE [partial results]); one replicated or
    `Partial` over any axis has its gradient gathered there if it is
    unevenly sharded (NOTE [uneven gradients]). A gradient has its result's
    shape, and any split of a dimension that the number of devices divides
    is even: such results need no gathering. Cached: a training step asks
    for the same few layouts and shapes over and over.
    """
    unsharded = tuple(
        axis for axis, p in enumerate(placements) if not p.is_shard()
    )
    gather = bool(unsharded) and any(n % devices for n in shape)
    reduce = any(
        placements[axis].is_replicate() and axis not in batch_axes
        for axis in unsharded
    )
    return reduce, unsharded if gather else ()


def _gradient_hook(result, batch_axes):
    """The hook that settles the gradient of `result`, or None."""
    reduce, gather_axes = _gradient_plan(
        result.placements,
        tuple(result.shape),
        result.device_mesh.size(),
        batch_axes,
    )
    if not (reduce or gather_axes):
        return None

    def hook(grad):
        if reduce:
            grad = _reduce_partial(grad, keep=batch_axes)
        if gather_axes:
            grad = _gather_uneven(grad, gather_axes)
        return grad

    return hook


def _dispatch(func, args, kwargs):
    """Run a torch call that has a DTensor among its arguments.

    Plain tensors are promoted (NOTE [promotion]), the call goes to its rule
    in `dtensor_rules` if it has one, and its result is settled (NOTE
    [partial results], NOTE [scalar results]).
    """
    name = getattr(func, "__name__", None)
    if name == "__get__" or (
        name == "__set__" and (args[1] is None or isinstance(args[1], DTensor))
    ):
        # Attribute reads (`.grad`, `.dtype`), the most frequent call by
        # far, and writes of no plain tensor (`zero_grad`'s `.grad = None`):
        # nothing to promote or settle.
        return func(*args, **kwargs)
    mesh, promote = _scan(args, kwargs)
    if mesh is None:
        # A DTensor's own type asked, with no DTensor among the values
        # (a Keras variable holding a plain tensor beside a DTensor type).
        return func(*args, **kwargs)
    if promote:
        placements = [Replicate()] * mesh.ndim
        args = tuple(_promote(a, mesh, placements) for a in args)
        kwargs = {k: _promote(v, mesh, placements) for k, v in kwargs.items()}
    rule = dtensor_rules.RULES.get(func)
    result = dtensor_rules.AS_USUAL
    if rule is not None:
        result = rule(func, *args, **kwargs)
    if result is dtensor_rules.AS_USUAL:
        result = _run_or_fall_back(func, mesh, args, kwargs)
    if (args and result is args[0]) or dtensor_rules.is_in_place(func):
        # In-place ops, and no-op conversions that return their input
        # (settled when it was made).
        return result
    if _is_reduction_to_scalar(result, args, kwargs):
        # NOTE [scalar results].
        return dtensor_utils.replicated_local(result)
    return _settle(result)


def _run_or_fall_back(func, mesh, args, kwargs):
    """Run `func`; run it replicated if DTensor cannot (NOTE [fallback])."""
    if func in dtensor_rules.RUN_REPLICATED:
        return dtensor_rules.run_replicated(func, mesh, args, kwargs)
    try:
        return func(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as error:
        if func in _BACKWARD or not (
            dtensor_rules.is_missing_rule(error)
            or dtensor_rules.has_uneven_shards(args, kwargs)
        ):
            raise
        try:
            return dtensor_rules.run_replicated(func, mesh, args, kwargs)
        except Exception:
            # Not a sharding problem after all: the error the call gave.
            raise error from None


def _dtensor_torch_function(cls, func, types, args=(), kwargs=None):
    """`DTensor.__torch_function__` while promotion is installed.

    Runs with subclass torch functions disabled, as DTensor's own calls
    do: the calls it makes (promotion, rules, the op itself) do not come
    back here.
    """
    if not torch_internals.get_implicit_replication():
        # Per thread; set on every thread that meets a DTensor, before its
        # first op (NOTE [made in C++]).
        torch_internals.set_implicit_replication(True)
    with torch_internals.torch_function_subclasses_disabled():
        return _dispatch(func, args, kwargs or {})


# DTensor's own `__torch_function__`: disabled, straight to dispatch.
_DTENSOR_DEFAULT = DTensor.__dict__["__torch_function__"]
_PROMOTING = classmethod(_dtensor_torch_function)


def enable():
    """Install promotion on `DTensor.__torch_function__` (NOTE [promotion]).

    Process-wide and idempotent: every thread, every DTensor from then on.
    """
    dtensor_strategies.register()
    DTensor.__torch_function__ = _PROMOTING


def is_enabled():
    """Whether plain tensors meeting DTensors are promoted."""
    return DTensor.__dict__["__torch_function__"] is _PROMOTING


@contextlib.contextmanager
def suspended():
    """Run the block with DTensor's own behaviour (no promotion): for
    native DTensor code measured beside Keras in one process."""
    was_enabled = is_enabled()
    DTensor.__torch_function__ = _DTENSOR_DEFAULT
    try:
        yield
    finally:
        if was_enabled:
            DTensor.__torch_function__ = _PROMOTING
