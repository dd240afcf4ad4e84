"""FSDP-style variables gathered once per layer call, not once per use.

A variable sharded over the mesh axis the batch is sharded on (an
FSDP-style layout: `LayoutMap` entries like `("batch", None)`) must be
whole on that axis before a batch-sharded input can use it. Left to
DTensor, each op that uses it gathers it: a `Dense` layer's kernel for its
matmul, its bias again for the add, and backward gathers them once more.
On a 4-block transformer LM that was 113 all-gathers a step, each waited
for alone.

NOTE [layer gathers]: instead, `install(model)` (run when the trainer
makes a step function) splits the model into units, as FSDP2 users wrap
blocks with `fully_shard`: each layer directly inside a model (models are
descended into) that holds such variables, sublayers included (a
`MultiHeadAttention` is one unit, its four projections with it), small
layers joined to the next (NOTE [small layers joined], below). When a
unit is called, a forward pre-hook gathers all its FSDP-style trainable
variables with one all-gather per dtype (each rank's shards flattened,
padded to the largest rank's, into one buffer) and the variables read as
the gathered values (`variable._value` swapped) until the call returns
(a forward hook that runs even when the call raises). The gather is one
autograd function (`_GatherUnit`): its backward takes the gradients of the
gathered values, which are `Partial` over the batch axis (each rank's sum
over its own rows), and reduce-scatters them with one collective back to
the variables' shards, as FSDP2 does. The gathered values stay alive until
backward has used them (FSDP2's `reshard_after_forward=False`): parameter
and optimizer memory held between steps stays sharded.

What stays per use, as DTensor does it: variables that are not trainable
(a layer may assign them during the call, which a swapped value would
lose), variables read outside their unit's call (a tied embedding read by
another layer), variables sharded over the batch axis and another axis on
the same dimension, and calls in a stateless scope (`stateless_call`,
symbolic builds), where the scope supplies the values. Numbers are the
same either way: the gathered value is the variable's full value, and the
gradient each shard receives is the sum over ranks that DTensor's
reduction would give.
"""

import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate

from keras.src import tree
from keras.src.backend.common import global_state
from keras.src.backend.common import stateless_scope
from keras.src.backend.common.keras_tensor import KerasTensor
from keras.src.backend.torch import torch_internals

# Unit layer -> its `_Unit`, for the hooks; weak so models can be freed.
_units = weakref.WeakKeyDictionary()
# Layers whose hooks are registered (once each).
_hooked = weakref.WeakSet()


class _Piece:
    """Where one variable's shards sit in a unit's gather buffer.

    `shapes[i]` is the local shape of the shard held by batch-axis index
    `i` (at this rank's coordinate on the other axes), `offsets[i]` its
    start along the sharded dimension, `padded` the largest shard's
    element count: every rank's slot for this variable has that length.
    """

    def __init__(self, variable, axis):
        value = variable._value
        mesh = value.device_mesh
        self.variable = variable
        self.axis = axis
        self.dim = value.placements[axis].dim
        self.placements = tuple(value.placements)
        self.gathered_placements = tuple(
            Replicate() if i == axis else p
            for i, p in enumerate(self.placements)
        )
        self.shape = tuple(value.shape)
        coordinate = list(mesh.get_coordinate())
        self.index = coordinate[axis]
        self.shapes = []
        for i in range(mesh.size(axis)):
            coordinate[axis] = i
            shape, _ = torch_internals.local_shape_and_offset(
                value.shape, mesh.shape, coordinate, self.placements
            )
            self.shapes.append(tuple(shape))
        sizes = [shape[self.dim] for shape in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numels = [_numel(shape) for shape in self.shapes]
        self.padded = max(self.numels)


def _numel(shape):
    n = 1
    for size in shape:
        n *= size
    return n


class _Group:
    """The variables of one unit gathered by one collective: same mesh,
    batch axis, dtype and device."""

    def __init__(self, variables, axis):
        self.pieces = []
        start = 0
        for variable in variables:
            piece = _Piece(variable, axis)
            piece.start = start
            start += piece.padded
            self.pieces.append(piece)
        self.total = start
        value = variables[0]._value
        self.mesh = value.device_mesh
        self.parts = self.mesh.size(axis)
        self.process_group = self.mesh.get_group(axis)
        self.dtype = value.dtype
        self.device = value.device

    def gather(self):
        """The variables' values, whole on the batch axis (autograd)."""
        parameters = [piece.variable._value for piece in self.pieces]
        return _GatherUnit.apply(self, *parameters)


class _GatherUnit(torch.autograd.Function):
    """All-gather a group's shards; reduce-scatter their gradients."""

    @staticmethod
    def forward(ctx, group, *parameters):
        ctx.group = group
        send = torch.empty(group.total, dtype=group.dtype, device=group.device)
        for piece, parameter in zip(group.pieces, parameters):
            local = torch_internals.local_tensor(parameter)
            send[piece.start : piece.start + local.numel()].copy_(
                local.reshape(-1)
            )
        received = torch.empty(
            group.parts * group.total, dtype=group.dtype, device=group.device
        )
        dist.all_gather_single(received, send, group=group.process_group)
        received = received.view(group.parts, group.total)
        gathered = []
        for piece in group.pieces:
            shards = [
                received[i, piece.start : piece.start + piece.numels[i]].view(
                    piece.shapes[i]
                )
                for i in range(group.parts)
            ]
            local = torch.cat(shards, dim=piece.dim)
            gathered.append(
                torch_internals.dtensor_without_autograd(
                    local,
                    group.mesh,
                    piece.gathered_placements,
                    piece.shape,
                    _contiguous_stride(piece.shape),
                )
            )
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads):
        group = ctx.group
        send = None
        results = [None] * len(group.pieces)
        for n, (piece, grad) in enumerate(zip(group.pieces, grads)):
            if grad is None:
                continue
            grad = _as_partial_or_replicated(grad, piece, group.mesh)
            local = torch_internals.local_tensor(grad)
            if grad.placements == piece.gathered_placements:
                # Already summed over ranks: this rank's rows are its shard.
                shard = local.narrow(
                    piece.dim,
                    piece.offsets[piece.index],
                    piece.shapes[piece.index][piece.dim],
                )
                results[n] = _shard_gradient(
                    shard.contiguous(), piece, group.mesh
                )
                continue
            if send is None:
                send = torch.zeros(
                    group.parts,
                    group.total,
                    dtype=grad.dtype,
                    device=local.device,
                )
            for i in range(group.parts):
                rows = local.narrow(
                    piece.dim, piece.offsets[i], piece.shapes[i][piece.dim]
                )
                send[i, piece.start : piece.start + piece.numels[i]].copy_(
                    rows.reshape(-1)
                )
            results[n] = piece
        if send is not None:
            received = torch.empty(
                group.total, dtype=send.dtype, device=send.device
            )
            dist.reduce_scatter_single(
                received, send.view(-1), group=group.process_group
            )
            for n, piece in enumerate(group.pieces):
                if results[n] is piece:
                    numel = piece.numels[piece.index]
                    shard = received[piece.start : piece.start + numel]
                    results[n] = _shard_gradient(
                        shard.view(piece.shapes[piece.index]), piece, group.mesh
                    )
        return (None, *results)


def _contiguous_stride(shape):
    stride = []
    step = 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _as_partial_or_replicated(grad, piece, mesh):
    """The gradient of a gathered value, as a `Partial` sum or replicated on
    the batch axis and laid out as the gathered value on the other axes."""
    if not isinstance(grad, DTensor):
        # A plain tensor: the same full value on every rank.
        return torch_internals.dtensor_without_autograd(
            grad,
            mesh,
            piece.gathered_placements,
            piece.shape,
            _contiguous_stride(piece.shape),
        )
    target = list(piece.gathered_placements)
    own = grad.placements[piece.axis]
    if own.is_partial() and own.reduce_op == "sum":
        target[piece.axis] = own
    if tuple(grad.placements) != tuple(target):
        grad = grad.redistribute(grad.device_mesh, target)
    return grad


def _shard_gradient(local, piece, mesh):
    return torch_internals.dtensor_without_autograd(
        local,
        mesh,
        piece.placements,
        piece.shape,
        _contiguous_stride(piece.shape),
    )


def _is_gathered_here(value, axis):
    """Whether a variable value is FSDP-style: a leaf DTensor sharded over
    mesh axis `axis` (of more than one device), on a dimension no other
    axis shards."""
    if not isinstance(value, DTensor) or value.grad_fn is not None:
        return False
    if value.device_mesh.size(axis) < 2:
        return False
    placement = value.placements[axis]
    if not placement.is_shard():
        return False
    return not any(
        p.is_shard() and p.dim == placement.dim
        for i, p in enumerate(value.placements)
        if i != axis
    )


class _Unit:
    """Layers whose FSDP-style variables are gathered together (NOTE [small
    layers joined])."""

    def __init__(self, groups, variables_of):
        self.groups = groups
        # Member layer's id -> its own variables among the groups' (ids:
        # `_units` holds units weakly keyed by layer, so a unit must not
        # keep its layers alive).
        self.variables_of = variables_of
        self.placements = {
            id(piece.variable): piece.placements
            for group in groups
            for piece in group.pieces
        }
        # One entry per call in progress: what it swapped.
        self.calls = []
        # While members are still to be called after a gather: variable id
        # -> gathered value, the members not called yet, and when the
        # values were gathered (the pass, the grad mode).
        self.gathered = None
        self.waiting = None
        self.gathered_in = None

    def before_call(self, layer, args, kwargs):
        swapped = []
        self.calls.append(swapped)
        if stateless_scope.in_stateless_scope() or _is_symbolic(args, kwargs):
            return
        variables = [
            v for v in self.variables_of.get(id(layer), ()) if self._sharded(v)
        ]
        if not variables:
            return
        values = self._values_for(id(layer))
        if values is None:
            return
        for variable in variables:
            swapped.append((variable, variable._value))
            variable._value = values[id(variable)]

    def after_call(self):
        if not self.calls:
            return
        for variable, parameter in self.calls.pop():
            variable._value = parameter

    def _sharded(self, variable):
        """Whether `variable` holds its sharded value: not swapped already
        (a call inside a call) nor replaced by another layout."""
        value = variable._value
        return value.grad_fn is None and (
            tuple(value.placements) == self.placements[id(variable)]
        )

    def _values_for(self, member):
        """The gathered values for a call of `member` (a layer's id): those
        gathered for an earlier member's call if still good, else gathered
        now; None if a variable of the unit cannot be gathered now."""
        if (
            self.gathered is None
            or member not in self.waiting
            or not self._in_same_pass()
        ):
            if not all(
                self._sharded(piece.variable)
                for group in self.groups
                for piece in group.pieces
            ):
                return None
            self.gathered = {}
            for group in self.groups:
                for piece, value in zip(group.pieces, group.gather()):
                    self.gathered[id(piece.variable)] = value
            self.waiting = set(self.variables_of)
            context = _call_context()
            self.gathered_in = (
                None if context is None else weakref.ref(context),
                torch.is_grad_enabled(),
            )
        values = self.gathered
        self.waiting.discard(member)
        if not self.waiting:
            # Every member has had its call: free the values (backward
            # keeps what it needs).
            self.gathered = self.waiting = self.gathered_in = None
        return values

    def _in_same_pass(self):
        """Whether this call is in the outermost call, and grad mode, that
        the values were gathered in."""
        context_ref, grad_enabled = self.gathered_in
        context = _call_context()
        return (
            context is not None
            and context_ref is not None
            and context_ref() is context
            and grad_enabled == torch.is_grad_enabled()
        )


def _call_context():
    """Keras's context of the outermost layer call in progress (one per
    forward pass of a model), or None. Referenced weakly: it is freed when
    that call returns, so a dead reference means another pass."""
    return global_state.get_global_attribute("current_call_ctx")


def _is_symbolic(args, kwargs):
    for x in tree.flatten((args, kwargs)):
        if isinstance(x, KerasTensor):
            return True
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            return True
    return False


# Under `jit_compile=True` the hooks run eagerly, a graph break on each side
# of a unit's call (NOTE [compiled steps] in `compiled_steps`): traced, the
# gather and the swap of `variable._value` were compiled again for every
# unit's shapes until dynamo's recompile limit.
@torch.compiler.disable
def _before_call(layer, args, kwargs):
    unit = _units.get(layer)
    if unit is not None:
        unit.before_call(layer, args, kwargs)


@torch.compiler.disable
def _after_call(layer, args, kwargs, output):
    unit = _units.get(layer)
    if unit is not None:
        unit.after_call()


def _unit_layers(model):
    """The layers directly inside `model`, descending into models."""
    from keras.src.models import Model

    for layer in model._flatten_layers(include_self=False, recursive=False):
        if isinstance(layer, Model):
            yield from _unit_layers(layer)
        else:
            yield layer


def _gathered_variables(layer, axis_of):
    """A layer's FSDP-style trainable variables, each once."""
    variables = []
    seen = set()
    for variable in layer.trainable_variables:
        value = variable._value
        if id(variable) in seen or not isinstance(value, DTensor):
            continue
        seen.add(id(variable))
        axis = axis_of(value.device_mesh)
        if axis is not None and _is_gathered_here(value, axis):
            variables.append((variable, axis))
    return variables


def _groups(variables):
    """`(variable, axis)` pairs grouped by collective."""
    grouped = {}
    for variable, axis in variables:
        value = variable._value
        key = (value.device_mesh, axis, value.dtype, value.device)
        grouped.setdefault(key, (axis, []))[1].append(variable)
    return [_Group(variables, axis) for axis, variables in grouped.values()]


def _nbytes(variable):
    value = variable._value
    return value.numel() * value.element_size()


# NOTE [small layers joined]: a collective on 2 CPU ranks costs about half
# a millisecond however small (benchmarks/README.md), and a layer norm's
# scale and offset are a few thousand elements: gathered alone, the 9 norms
# and the position embedding of the 4-block LM were 20 of its 48
# collectives a step. So consecutive unit layers (in the model's layer
# order) are joined until their variables hold `_UNIT_BYTES`: a norm joins
# the attention or `Dense` after it, as FSDP2 users wrap a block. The
# first member called gathers for all; the others' calls use those values
# (their own variables swapped in for their own calls only) within the
# same outermost call (one forward pass of the model: Keras's call
# context) and grad mode, unless the member is called again before the
# rest (a shared layer): then it gathers anew, as a unit of one would.
# Once every member has been called, the unit forgets the values (a member
# that is not called leaves them held until the next gather); backward
# keeps what it needs, and the gradients of all members are
# reduce-scattered together. When a variable of the
# unit cannot be gathered then (swapped by a call in progress, or given
# another layout), the call uses its variables as they are, per use.
_UNIT_BYTES = 2**20


def install(model, batch_dim_name):
    """Gather the FSDP-style variables of each unit of `model` per call.

    See NOTE [layer gathers] and NOTE [small layers joined]. Idempotent: a
    layer's hooks are registered once, the units recomputed each time
    (variables may have been added).

    Args:
        model: A built Keras model.
        batch_dim_name: The mesh axis name the batch is sharded over.
    """

    def axis_of(mesh):
        names = mesh.mesh_dim_names or ()
        return names.index(batch_dim_name) if batch_dim_name in names else None

    members, nbytes = [], 0

    def close():
        if not members:
            return
        unique = {id(v): (v, axis) for _, owned in members for v, axis in owned}
        unit = _Unit(
            _groups(list(unique.values())),
            {id(layer): [v for v, _ in owned] for layer, owned in members},
        )
        for layer, _ in members:
            _units[layer] = unit
        members.clear()

    for layer in _unit_layers(model):
        owned = _gathered_variables(layer, axis_of)
        if not owned:
            _units.pop(layer, None)
            continue
        if layer not in _hooked:
            _hooked.add(layer)
            layer.register_forward_pre_hook(_before_call, with_kwargs=True)
            layer.register_forward_hook(
                _after_call, with_kwargs=True, always_call=True
            )
        members.append((layer, owned))
        nbytes += sum(_nbytes(v) for v, _ in owned)
        if nbytes >= _UNIT_BYTES:
            close()
            nbytes = 0
    close()
