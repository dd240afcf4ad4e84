"""Layers that work row by row, run on each rank's own rows.

Under a distribution every value is a DTensor, and every op on one goes
through DTensor's dispatch: sharding propagation, a wrapper for each
result, its autograd. That is what gives one process's numbers for layers
that read the whole batch (batch statistics, a mean over it, uneven last
batches); on a `DataParallel` transformer it was most of the CPU time a
rank spent beyond one process's (benchmarks/README.md).

NOTE [local calls]: a layer whose output row `i` depends only on input row
`i` and on its weights (a `Dense`, a `LayerNormalization`, attention
without dropout: the classes `_row_wise_classes` lists, by exact type,
since a subclass may change `call`; not quantized, since a float8 layer
scales by the largest input in the batch) gives the same rows whether it
sees the whole batch or a rank's piece of it. When such a layer is called
with inputs that are all DTensors sharded over the batch (dimension 0) or
replicated, laid out alike, and all its variables are replicated (a
`DataParallel` model; the norms of a Megatron layout; FSDP-style variables
once their unit has gathered them, NOTE [layer gathers]), a forward
pre-hook hands its `call` the local tensors instead: the inputs' local pieces
(their Keras masks with them) and the variables' local values
(`variable._value` swapped until the call returns, as the gathers do). The
layer then runs as it does in one process, on plain tensors, with none of
DTensor's cost, and a forward hook wraps its outputs back as DTensors laid
out as the inputs were (the global batch size given, so uneven pieces stay
right).

Gradients stay exact. One autograd node (`_ToLocal`) takes a call's
inputs and variables to local tensors, and hands each local gradient back
as a DTensor: an input's laid out as the input, a variable's `Partial` over
the mesh axes the batch is sharded on (each rank's sum over its own rows,
the gradient DTensor itself gives), which `distributed_gradients` (or an
FSDP-style unit's reduce-scatter) reduces as before. One more
(`_FromLocal`) wraps the outputs, and lays their gradients out as the
outputs before taking their local pieces. One node each way, not
DTensor's `to_local`/`from_local` per tensor: those cost more, per call,
than the DTensor ops they replaced in a `Dense`.

Any other call runs on DTensors as before: a layer not listed (or
one whose configuration reads across rows, such as attention with
dropout, whose random draws DTensor keeps the same as one process's), a
variable sharded or not a DTensor, a plain tensor among the inputs,
inputs laid out differently, a stateless scope or a symbolic call, and
compiled steps (`jit_compile=True`, where DTensor's cost is compiled
away). Sublayers of a layer that runs locally see plain tensors and run
as they are. The hooks are installed when `fit`, `evaluate` or `predict`
makes its step (`distribution_checks.check_model`); a model called before
that runs on DTensors. `KERAS_TORCH_LOCAL_CALLS=0` turns them off.
"""

import os
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate

from keras.src.backend.common import stateless_scope
from keras.src.backend.common.keras_tensor import KerasTensor
from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import torch_internals

ENV = "KERAS_TORCH_LOCAL_CALLS"

# Hooked layer -> its `_Layer` record (hooks registered once); weak so
# models can be freed.
_records = weakref.WeakKeyDictionary()


def _row_wise_classes():
    """The layer classes whose output rows depend on their input rows only,
    each with a check of its configuration (None: always)."""
    from keras.src import layers

    def no_dropout(layer):
        return not getattr(layer, "_dropout", 0.0) and not getattr(
            layer, "dropout", 0.0
        )

    def keeps_batch(layer):
        return _einsum_keeps_batch(layer.equation)

    def not_on_batch(layer):
        # A negative axis other than -1 may be the batch's on some input.
        return layer.axis >= 1 or layer.axis == -1

    classes = {
        layers.Dense: None,
        layers.EinsumDense: keeps_batch,
        layers.Embedding: None,
        layers.LayerNormalization: None,
        layers.RMSNormalization: None,
        layers.GroupNormalization: None,
        layers.UnitNormalization: None,
        layers.Activation: None,
        layers.ReLU: None,
        layers.LeakyReLU: None,
        layers.ELU: None,
        layers.PReLU: None,
        layers.Softmax: None,
        layers.MultiHeadAttention: no_dropout,
        layers.GroupedQueryAttention: no_dropout,
        layers.Conv1D: None,
        layers.Conv2D: None,
        layers.Conv3D: None,
        layers.DepthwiseConv1D: None,
        layers.DepthwiseConv2D: None,
        layers.SeparableConv1D: None,
        layers.SeparableConv2D: None,
        layers.Conv1DTranspose: None,
        layers.Conv2DTranspose: None,
        layers.Conv3DTranspose: None,
        layers.MaxPooling1D: None,
        layers.MaxPooling2D: None,
        layers.MaxPooling3D: None,
        layers.AveragePooling1D: None,
        layers.AveragePooling2D: None,
        layers.AveragePooling3D: None,
        layers.GlobalAveragePooling1D: None,
        layers.GlobalAveragePooling2D: None,
        layers.GlobalAveragePooling3D: None,
        layers.GlobalMaxPooling1D: None,
        layers.GlobalMaxPooling2D: None,
        layers.GlobalMaxPooling3D: None,
        layers.Flatten: None,
        layers.Reshape: None,
        layers.Add: None,
        layers.Subtract: None,
        layers.Multiply: None,
        layers.Average: None,
        layers.Maximum: None,
        layers.Minimum: None,
        layers.Concatenate: not_on_batch,
    }
    return classes


def _einsum_keeps_batch(equation):
    """Whether an `EinsumDense` equation keeps the input's first dimension
    as the output's first, untouched by the kernel."""
    inputs, output = equation.replace(" ", "").split("->")
    x, kernel = inputs.split(",")
    if x.startswith("...") and output.startswith("..."):
        return True
    return bool(x) and output[:1] == x[:1] and x[0] not in kernel


_classes = None


def is_row_wise(layer):
    """Whether `layer` is of a class, and configured, to compute each
    output row from its input row alone (NOTE [local calls])."""
    global _classes
    if _classes is None:
        _classes = _row_wise_classes()
    cls = type(layer)
    if cls not in _classes:
        return False
    if getattr(layer, "quantization_mode", None) is not None:
        return False
    check = _classes[cls]
    return check is None or bool(check(layer))


def local_call_count(layer):
    """How many calls of `layer` have run on local tensors (for tests and
    benchmarks)."""
    record = _records.get(layer)
    return 0 if record is None else record.local_calls


def enabled():
    """Whether `install` hooks layers (`KERAS_TORCH_LOCAL_CALLS`, default
    on)."""
    return os.environ.get(ENV, "1") not in ("0", "false", "False")


class _Call:
    """What one local call changed: to undo, and to wrap its outputs."""

    def __init__(self, mesh, placements, batch, swapped, inputs):
        self.mesh = mesh
        self.placements = placements
        self.batch = batch
        self.swapped = swapped
        self.inputs = inputs


class _Layer:
    """A hooked layer's calls in progress, and how many ran locally."""

    def __init__(self):
        # One entry per call in progress: a `_Call`, or None when the call
        # runs on DTensors.
        self.calls = []
        self.local_calls = 0


def _layout(args, kwargs):
    """The inputs' common `(mesh, placements, global batch)`, or None when
    they are not all DTensors laid out alike, batch-sharded or replicated.
    """
    found = None
    for x in _tensors((args, kwargs)):
        if not isinstance(x, DTensor) or x.ndim == 0:
            return None
        placements = x.placements
        if found is None:
            for p in placements:
                if not (p.is_replicate() or (p.is_shard() and p.dim == 0)):
                    return None
            found = (x.device_mesh, placements, x.shape[0])
        elif (
            x.device_mesh != found[0]
            or placements != found[1]
            or x.shape[0] != found[2]
        ):
            return None
        mask = getattr(x, "_keras_mask", None)
        if mask is not None and (
            not isinstance(mask, DTensor)
            or mask.placements != placements
            or mask.shape[:1] != x.shape[:1]
        ):
            return None
    return found


def _tensors(structure):
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, (list, tuple)):
        for item in structure:
            yield from _tensors(item)
    elif isinstance(structure, dict):
        for item in structure.values():
            yield from _tensors(item)
    elif isinstance(structure, KerasTensor):
        # A symbolic call: never local.
        yield structure


def _map(fn, structure):
    if isinstance(structure, torch.Tensor):
        return fn(structure)
    if isinstance(structure, list):
        return [_map(fn, item) for item in structure]
    if isinstance(structure, tuple):
        return tuple(_map(fn, item) for item in structure)
    if isinstance(structure, dict):
        return {key: _map(fn, item) for key, item in structure.items()}
    return structure


class _ToLocal(torch.autograd.Function):
    """DTensors to views of their local tensors, in one autograd node.

    `specs[i]` is `(mesh, placements, shape, stride)` of the gradient the
    i-th DTensor gets back: each local gradient is wrapped as that DTensor,
    without DTensor's per-tensor autograd functions.
    """

    @staticmethod
    def forward(ctx, specs, *dtensors):
        ctx.specs = specs
        # Views: the local tensors themselves belong to the DTensors.
        return tuple(
            torch_internals.local_tensor(x).view_as(
                torch_internals.local_tensor(x)
            )
            for x in dtensors
        )

    @staticmethod
    def backward(ctx, *grads):
        results = [None]
        for needed, spec, grad in zip(
            ctx.needs_input_grad[1:], ctx.specs, grads
        ):
            if not needed or grad is None:
                results.append(None)
                continue
            results.append(
                torch_internals.dtensor_without_autograd(grad, *spec)
            )
        return tuple(results)


class _FromLocal(torch.autograd.Function):
    """Local tensors to DTensors of `specs` (`(mesh, placements, shape,
    stride)` each), in one autograd node; their gradients are laid out as
    the DTensors and handed back as local tensors."""

    @staticmethod
    def forward(ctx, specs, *locals_):
        ctx.specs = specs
        # Detached: a view of an input that requires grad still requires
        # grad here, and DTensor warns when it wraps one (this node is the
        # result's only autograd history).
        return tuple(
            torch_internals.dtensor_without_autograd(y.detach(), *spec)
            for y, spec in zip(locals_, specs)
        )

    @staticmethod
    def backward(ctx, *grads):
        results = [None]
        for spec, grad in zip(ctx.specs, grads):
            if grad is None:
                results.append(None)
                continue
            mesh, placements, shape, stride = spec
            if not isinstance(grad, DTensor):
                # A plain gradient is a full value, the same on every rank.
                grad = torch_internals.dtensor_without_autograd(
                    grad, mesh, (Replicate(),) * mesh.ndim, shape, stride
                )
            if tuple(grad.placements) != tuple(placements):
                grad = grad.redistribute(mesh, placements)
            results.append(torch_internals.local_tensor(grad))
        return tuple(results)


def _to_local(dtensors, grad_specs):
    """Local views of `dtensors`, one autograd node for those that need
    gradients (`grad_specs`: the layout each gradient goes back in)."""
    locals_ = [None] * len(dtensors)
    tracked = []
    for i, x in enumerate(dtensors):
        if x.requires_grad and torch.is_grad_enabled():
            tracked.append(i)
        else:
            locals_[i] = torch_internals.local_tensor(x)
    if tracked:
        pieces = _ToLocal.apply(
            tuple(grad_specs[i] for i in tracked),
            *(dtensors[i] for i in tracked),
        )
        for i, piece in zip(tracked, pieces):
            locals_[i] = piece
    return locals_


def _from_local(locals_, specs):
    """DTensors of `specs` over `locals_`, one autograd node for those that
    require gradients."""
    results = [None] * len(locals_)
    tracked = []
    for i, y in enumerate(locals_):
        if y.requires_grad:
            tracked.append(i)
        else:
            results[i] = torch_internals.dtensor_without_autograd(y, *specs[i])
    if tracked:
        wrapped = _FromLocal.apply(
            tuple(specs[i] for i in tracked), *(locals_[i] for i in tracked)
        )
        for i, y in zip(tracked, wrapped):
            results[i] = y
    return results


def _spec(x, placements=None):
    placements = tuple(x.placements) if placements is None else placements
    return (x.device_mesh, placements, x.shape, x.stride())


def _replicated_values(variables, mesh):
    """The variables' values, or None if one is not replicated on `mesh`
    (a plain tensor that needs no gradient is as good: the same on every
    rank)."""
    values = []
    for variable in variables:
        value = variable._value
        if isinstance(value, DTensor):
            if value.device_mesh != mesh or not all(
                p.is_replicate() for p in value.placements
            ):
                return None
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            return None
        values.append(value)
    return values


# The hooks read DTensors' metadata (`.shape`, `.stride()`,
# `.requires_grad`) a dozen times a call and run no op on one, so they run
# with `__torch_function__` off: each read then skips promotion's handler
# (NOTE [promotion] in `dtensor_promotion`), which cost 1.5-3.5 us a read
# on a CPU. A `Dense` call on 4 local rows of 16 took 277 us with the
# hooks before, 239 us after, and 100 us in one process. Where compute is
# fast (a GPU), this per-call cost is what a step waits for.


def _before_call(layer, args, kwargs):
    if torch.compiler.is_compiling():
        return None
    with torch_internals.torch_function_subclasses_disabled():
        return _enter_local_call(layer, args, kwargs)


def _after_call(layer, args, kwargs, output):
    if torch.compiler.is_compiling():
        return None
    with torch_internals.torch_function_subclasses_disabled():
        return _leave_local_call(layer, output)


def _enter_local_call(layer, args, kwargs):
    """The local `(args, kwargs)` of a call that runs locally, else None."""
    record = _records.get(layer)
    if record is None:
        return None
    record.calls.append(None)
    if stateless_scope.in_stateless_scope() or not is_row_wise(layer):
        return None
    layout = _layout(args, kwargs)
    if layout is None:
        return None
    mesh, placements, batch = layout
    # Listed at each call: a layer built in its first step, or given
    # variables later, is read as it is now.
    variables = layer.variables
    values = _replicated_values(variables, mesh)
    if values is None:
        return None
    # Each variable's gradient: this rank's sum over its rows.
    grad_placements = tuple(
        Partial("sum") if p.is_shard() else Replicate() for p in placements
    )
    # Each tensor once (attention takes the same one as query and value).
    inputs = list({id(x): x for x in _tensors((args, kwargs))}.values())
    swapped = [
        (variable, value)
        for variable, value in zip(variables, values)
        if isinstance(value, DTensor)
    ]
    pieces = _to_local(
        inputs + [value for _, value in swapped],
        [_spec(x) for x in inputs]
        + [_spec(value, grad_placements) for _, value in swapped],
    )
    for (variable, _), piece in zip(swapped, pieces[len(inputs) :]):
        variable._value = piece
    pieces = pieces[: len(inputs)]
    for x, piece in zip(inputs, pieces):
        mask = getattr(x, "_keras_mask", None)
        if mask is not None:
            piece._keras_mask = torch_internals.local_tensor(mask)
    by_id = {id(x): piece for x, piece in zip(inputs, pieces)}
    args, kwargs = _map(lambda x: by_id[id(x)], (args, kwargs))
    record.local_calls += 1
    record.calls[-1] = _Call(
        mesh, placements, batch, swapped, list(zip(inputs, pieces))
    )
    return args, kwargs


def _leave_local_call(layer, output):
    """Undo a local call's swaps; its outputs as DTensors (None if the call
    ran on DTensors)."""
    record = _records.get(layer)
    if record is None or not record.calls:
        return None
    call = record.calls.pop()
    if call is None:
        return None
    for variable, value in call.swapped:
        variable._value = value
    # A layer may drop its inputs' masks (attention does): as it would have
    # on one process's tensors.
    for x, piece in call.inputs:
        if getattr(x, "_keras_mask", None) is not None and (
            getattr(piece, "_keras_mask", None) is None
        ):
            x._keras_mask = None
    if output is None:
        return None
    rows = call.inputs[0][1].shape[0]
    outputs = list(_tensors(output))
    for y in outputs:
        if y.ndim == 0 or y.shape[0] != rows or isinstance(y, DTensor):
            # A bug in `_row_wise_classes`, not the user's: the call read
            # rows of other ranks, or met a DTensor it was not given.
            kind = "DTensor" if isinstance(y, DTensor) else "tensor"
            raise AssertionError(
                f"Layer '{layer.name}' ({type(layer).__name__}) ran on this "
                f"rank's {rows} rows and returned a {kind} of shape "
                f"{tuple(y.shape)}, where a plain tensor with those rows "
                "first was expected. Set "
                f"{ENV}=0 to run it on DTensors, and report this."
            )
    masks = [getattr(y, "_keras_mask", None) for y in outputs]
    wrapped = _from_local(outputs, [_global_spec(y, call) for y in outputs])
    for result, mask in zip(wrapped, masks):
        if mask is not None and not isinstance(mask, DTensor):
            (result._keras_mask,) = _from_local(
                [mask], [_global_spec(mask, call)]
            )
    by_id = {id(y): result for y, result in zip(outputs, wrapped)}
    return _map(lambda y: by_id[id(y)], output)


def _global_spec(local, call):
    shape = torch.Size((call.batch, *local.shape[1:]))
    return (
        call.mesh,
        call.placements,
        shape,
        dtensor_utils.contiguous_stride(shape),
    )


def install(model):
    """Run the row-wise layers of `model` on local tensors when they can.

    See NOTE [local calls]. Idempotent: each layer's hooks are registered
    once. Whether a call runs locally is decided at the call, from the
    layer's configuration, variables and inputs then.

    Args:
        model: A built Keras model.
    """
    if not enabled():
        return
    global _classes
    if _classes is None:
        _classes = _row_wise_classes()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) not in _classes or layer in _records:
            continue
        _records[layer] = _Layer()
        layer.register_forward_pre_hook(_before_call, with_kwargs=True)
        # Before any other forward hook (the FSDP-style gathers' restore):
        # the variables are swapped back in reverse order.
        layer.register_forward_hook(
            _after_call, with_kwargs=True, always_call=True, prepend=True
        )
