"""Sharding rules for the ops DTensor cannot shard the way Keras needs.

`dtensor_promotion`'s mode sends a call here when its function has a rule
and a DTensor is among its arguments (after plain tensors were promoted).

- Convolutions: DTensor only shards them along spatial dimensions (its
  tensor-parallel convolution) and fails on a batch-sharded input. The rule
  here keeps the batch sharding of the input and the output-channel sharding
  of the kernel, runs the convolution on local shards, and returns the
  output sharded on batch and channels; backward is the local convolution's
  backward, with the input's gradient `Partial` over channel shards and the
  kernel's `Partial` over batch shards.
- Embedding lookups with batch-sharded indices: DTensor may keep a table
  sharded on that axis and gather the indices instead, and when the table
  is also sharded by rows on another axis, it computes the row mask from the
  local indices before gathering them (a mask of the wrong shape; torch
  2.13). The rule gathers the table over the axes that shard the indices,
  as data parallelism needs, so the indices are never redistributed.
- `scaled_dot_product_attention`: attention is independent for each
  sequence and each head, so the rule runs the op on each rank's local
  rows and heads, with the kernel one process would choose (NOTE
  [attention]).
- Indexing and views DTensor gets wrong or cannot do: a write into a
  sharded dim through `__setitem__` (DTensor writes it into a
  redistributed copy and loses it), a boolean-mask read (its shape
  depends on the values), `unbind` along a sharded dim, and `rms_norm`
  over sharded dims (its decomposition adds in place to a `Partial` mean):
  each is run replicated or has the dims it needs gathered first. A rule
  returns `AS_USUAL` for a call it leaves to DTensor.
- Backward kernels DTensor has no strategy for (pooling, hard
  activations, reflection padding): strategies registered with DTensor
  itself, since they run inside autograd where no call reaches this
  module (NOTE [backward strategies] in `dtensor_strategies`).
- Any other op DTensor has no sharding rule for: `run_replicated` makes its
  DTensor arguments replicated (a no-op for replicated ones, a gather for
  sharded ones), runs it on the local values and returns replicated
  DTensors. Correct for every deterministic op; the gather costs memory, so
  it is logged once per op when a sharded argument had to be gathered. An
  in-place op (`index_put_` into a batch-sharded tensor, which DTensor
  refuses since it would change the tensor's placements) writes its result
  back into its first argument, in that argument's layout.
"""

import logging

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import torch_internals

_logger = logging.getLogger(__name__)
# What a rule returns for a call it leaves to the usual path (DTensor,
# then NOTE [fallback] in `dtensor_promotion`).
AS_USUAL = object()
_gathered_ops = set()

_CONVOLUTIONS = {
    torch.conv1d: False,
    torch.conv2d: False,
    torch.conv3d: False,
    torch.conv_transpose1d: True,
    torch.conv_transpose2d: True,
    torch.conv_transpose3d: True,
}


def _convolution(func, input, weight, bias=None, *args, **kwargs):
    if input.ndim == weight.ndim - 1:
        # Unbatched `(channels, *spatial)` (`ops.correlate` convolves so):
        # a batch of one, so that dim 0 is the batch as below.
        output = _convolution(
            func, input.unsqueeze(0), weight, bias, *args, **kwargs
        )
        return output.squeeze(0)
    transposed = _CONVOLUTIONS[func]
    groups = kwargs.get("groups", args[-1] if len(args) >= 4 else 1)
    mesh = weight.device_mesh
    # The kernel's output channels: dim 0, or dim 1 for a transposed kernel.
    out_dim = 1 if transposed else 0
    input_placements, weight_placements = [], []
    for axis in range(mesh.ndim):
        batch_split = input.placements[axis] == Shard(0)
        channel_split = (
            weight.placements[axis] == Shard(out_dim)
            and not batch_split
            and groups == 1
        )
        input_placements.append(Shard(0) if batch_split else Replicate())
        weight_placements.append(
            Shard(out_dim) if channel_split else Replicate()
        )
    input = input.redistribute(mesh, input_placements)
    weight = weight.redistribute(mesh, weight_placements)
    input_grad = [
        Partial() if w.is_shard() else p
        for p, w in zip(input_placements, weight_placements)
    ]
    weight_grad = [
        Partial() if i.is_shard() else p
        for p, i in zip(weight_placements, input_placements)
    ]
    local_bias = None
    if bias is not None:
        bias_placements = [
            Shard(0) if w.is_shard() else w for w in weight_placements
        ]
        bias = bias.redistribute(mesh, bias_placements)
        local_bias = bias.to_local(
            grad_placements=[
                Partial() if i.is_shard() else p
                for p, i in zip(bias_placements, input_placements)
            ]
        )
    output = func(
        input.to_local(grad_placements=input_grad),
        weight.to_local(grad_placements=weight_grad),
        local_bias,
        *args,
        **kwargs,
    )
    channels = weight.shape[1] * groups if transposed else weight.shape[0]
    shape = (input.shape[0], channels, *output.shape[2:])
    output_placements = [
        Shard(0) if i.is_shard() else Shard(1) if w.is_shard() else Replicate()
        for i, w in zip(input_placements, weight_placements)
    ]
    return dtensor_utils.from_local(output, mesh, output_placements, shape)


def _embedding(func, input, weight, *args, **kwargs):
    if isinstance(input, DTensor) and isinstance(weight, DTensor):
        placements = [
            Replicate() if i.is_shard() else w
            for i, w in zip(input.placements, weight.placements)
        ]
        if placements != list(weight.placements):
            weight = weight.redistribute(weight.device_mesh, placements)
    output = func(input, weight, *args, **kwargs)
    # A table sharded by rows gives each rank the rows it holds, the rest
    # masked (`Partial` with a mask): reduced now, while the mask is this
    # op's. Left `Partial` over the batch axis, where NOTE [partial
    # results] leaves sums to DTensor, a later op would reduce it with
    # another op's mask (`ops.take` of a row-sharded array by replicated
    # indices failed so).
    if isinstance(output, DTensor) and any(
        p.is_partial() for p in output.placements
    ):
        output = output.redistribute(
            output.device_mesh,
            [Replicate() if p.is_partial() else p for p in output.placements],
        )
    return output


# NOTE [attention]: DTensor runs `scaled_dot_product_attention` on CPU
# through its math kernel, a composite of matmuls and softmax that torch
# decomposes in C++. The causal mask that kernel builds (`is_causal=True`)
# is a plain tensor made below `__torch_function__`, so no promotion sees
# it and DTensor refuses the mixed add. And the math kernel is not the
# kernel one process runs: on CPU that is the fused flash kernel, whose
# gradients differ from the math kernel's where a query row has every key
# masked by a finite large negative (Keras's padding masks do this for
# padded queries): the two kernels agree on outputs and disagree on the
# gradients of queries, keys and values by the size of the gradients
# themselves. So the rule runs the op itself, on local tensors: queries,
# keys, values and the mask are laid out alike, each mesh axis sharding
# the batch or the heads (dims 0 and 1) or nothing, and every rank runs
# the kernel one process would choose on its own sequences and heads. A
# mesh axis that shards anything else (the sequence) is gathered first.
# Uneven batches need nothing special: each rank's rows are a whole
# attention problem.


def _attention_placement(tensors, axis):
    """The placement on mesh `axis` that queries, keys and values share:
    their first `Shard` of the batch or head dim, else `Replicate`."""
    query = tensors[0]
    for x in tensors:
        p = x.placements[axis]
        if (
            p.is_shard()
            and p.dim in (0, 1)
            and all(t.shape[p.dim] == query.shape[p.dim] for t in tensors)
        ):
            return Shard(p.dim)
    return Replicate()


def _attention_mask_placements(mask, placements, ndim):
    """Placements of a mask broadcast against `ndim`-D queries, and of its
    gradient: a mask dim of size 1 broadcast over sharded queries stays
    replicated, its gradient `Partial` there."""
    offset = ndim - mask.ndim
    layout, grad = [], []
    for p in placements:
        dim = p.dim - offset if p.is_shard() else -1
        if p.is_shard() and dim >= 0 and mask.shape[dim] != 1:
            layout.append(Shard(dim))
            grad.append(Shard(dim))
        else:
            layout.append(Replicate())
            grad.append(Partial() if p.is_shard() else Replicate())
    return layout, grad


def _attention(func, query, key, value, attn_mask=None, *args, **kwargs):
    tensors = [x for x in (query, key, value) if isinstance(x, DTensor)]
    if len(tensors) != 3:
        return func(query, key, value, attn_mask, *args, **kwargs)
    mesh = query.device_mesh
    placements = [
        _attention_placement(tensors, axis) for axis in range(mesh.ndim)
    ]
    local = [
        x.redistribute(mesh, placements).to_local(grad_placements=placements)
        for x in tensors
    ]
    if isinstance(attn_mask, DTensor):
        layout, grad = _attention_mask_placements(
            attn_mask, placements, query.ndim
        )
        attn_mask = attn_mask.redistribute(mesh, layout).to_local(
            grad_placements=grad
        )
    output = func(*local, attn_mask, *args, **kwargs)
    shape = (*query.shape[:-1], value.shape[-1])
    return dtensor_utils.from_local(output, mesh, placements, shape)


# NOTE [gathers along a whole dim]: `gather` (and `take_along_dim`, which
# Keras's `take_along_axis` and sparse cross-entropy call) picks entries
# along one dim. When the input and the indices are split alike on the
# other dims (the batch, under data parallelism) each rank's indices point
# into its own rows, so the rule gathers on local tensors. DTensor would
# compute the same values, but its gradient is the composite
# `grad.new_zeros(input.shape).scatter_add_(...)`, whose zeros DTensor
# lays out replicated, at the global shape: each rank filled and then
# sliced a full batch's logits (a transformer LM's largest tensor) every
# backward. On local tensors the gradient is this rank's rows only.


def _split_alike(input, index, dim):
    """Whether `input` and `index` are DTensors on one mesh, laid out alike
    on every axis: replicated, or split on a dim other than `dim` that
    both have whole and of the same size."""
    if not (isinstance(input, DTensor) and isinstance(index, DTensor)):
        return False
    if input.device_mesh != index.device_mesh or input.ndim != index.ndim:
        return False
    for p, q in zip(input.placements, index.placements):
        if p != q or not (p.is_replicate() or p.is_shard()):
            return False
        if p.is_shard() and (
            p.dim == dim or input.shape[p.dim] != index.shape[p.dim]
        ):
            return False
    return True


def _gather_local(func, input, dim, index, *args, **kwargs):
    placements = list(input.placements)
    output = func(
        input.to_local(grad_placements=placements),
        dim,
        torch_internals.local_tensor(index),
        *args,
        **kwargs,
    )
    return dtensor_utils.from_local(
        output, input.device_mesh, placements, index.shape
    )


def _gather(func, input, dim, index, *args, **kwargs):
    # NOTE [gathers along a whole dim].
    if "out" in kwargs or not isinstance(dim, int):
        return AS_USUAL
    if not _split_alike(input, index, dim % max(input.ndim, 1)):
        return AS_USUAL
    return _gather_local(func, input, dim, index, *args, **kwargs)


def _take_along_dim(func, input, indices, dim=None):
    # NOTE [gathers along a whole dim]: without broadcasting (same shapes
    # but on `dim`), `take_along_dim` is `gather`.
    if dim is None or not isinstance(dim, int):
        return AS_USUAL
    if not _split_alike(input, indices, dim % max(input.ndim, 1)):
        return AS_USUAL
    same = all(
        a == b
        for d, (a, b) in enumerate(zip(input.shape, indices.shape))
        if d != dim % input.ndim
    )
    if not same:
        return AS_USUAL
    return _gather_local(torch.gather, input, dim, indices)


def _replicate_dims(x, dims):
    """`x` with no mesh axis sharding any of `dims` (gathered there)."""
    dims = {d % x.ndim for d in dims}
    placements = [
        Replicate() if p.is_shard() and p.dim in dims else p
        for p in x.placements
    ]
    if placements == list(x.placements):
        return x
    return x.redistribute(x.device_mesh, placements)


def _unbind(func, input, dim=0):
    # DTensor cannot split a tensor along a sharded dim into its slices
    # (`image.map_coordinates` unbinds its coordinates so): gather it.
    return func(_replicate_dims(input, [dim]), dim)


def _rms_norm(func, input, normalized_shape, *args, **kwargs):
    # The mean over the normalized (last) dims is `Partial` when one is
    # sharded, and the decomposition adds epsilon to it in place, which
    # DTensor refuses: those dims are gathered first, as DTensor's own
    # layer norm does.
    dims = range(input.ndim - len(normalized_shape), input.ndim)
    return func(_replicate_dims(input, dims), normalized_shape, *args, **kwargs)


def _is_mask(index):
    return isinstance(index, torch.Tensor) and index.dtype in (
        torch.bool,
        torch.uint8,
    )


def _getitem(func, input, index):
    # A boolean mask selects a number of values only its values say, which
    # sharding propagation cannot infer: run replicated (NOTE [fallback]).
    indices = index if isinstance(index, tuple) else (index,)
    if any(_is_mask(i) for i in indices):
        return run_replicated(func, input.device_mesh, (input, index), {})
    return AS_USUAL


def _indexed_dims(index, ndim):
    """The dims of an `ndim`-D tensor that `tensor[index]` selects from
    (every dim but those a bare `:` keeps whole)."""
    items = index if isinstance(index, tuple) else (index,)

    def width(item):
        if item is None or item is Ellipsis:
            return 0
        return item.ndim if _is_mask(item) else 1

    dims, dim = set(), 0
    for item in items:
        if item is Ellipsis:
            dim += ndim - sum(width(i) for i in items)
            continue
        if not (isinstance(item, slice) and item == slice(None)):
            dims.update(range(dim, dim + width(item)))
        dim += width(item)
    return dims


def _setitem(func, input, index, value):
    # Writing into a sharded dim (`transform[:, 0] = b1` with `transform`
    # sharded by columns) makes DTensor redistribute the view it writes
    # to, and the write lands in that copy: `input` keeps its old values,
    # with no error. So such a write runs replicated, which writes the
    # result back into `input` (`run_replicated`). Writes that keep every
    # sharded dim whole (a cache's sequence slot of a batch-sharded
    # cache) write each rank's own shard.
    if isinstance(input, DTensor):
        indexed = _indexed_dims(index, input.ndim)
        if any(p.is_shard() and p.dim in indexed for p in input.placements):
            return run_replicated(
                func, input.device_mesh, (input, index, value), {}
            )
    return AS_USUAL


def is_missing_rule(error):
    """Whether `error` is DTensor's sharding propagation finding no
    strategy for an op: a `NotImplementedError` raised in
    `torch.distributed.tensor._sharding_prop`, alone or as the cause of
    the error DTensor wraps it in."""
    while error is not None:
        if isinstance(error, NotImplementedError):
            if torch_internals.raised_by_sharding_propagation(
                error.__traceback__
            ):
                return True
        error = error.__cause__
    return False


def has_uneven_shards(args, kwargs):
    """Whether a DTensor argument has a dimension split unevenly (a last
    batch of 7 rows on 2 ranks), which some DTensor ops cannot handle
    (merging that dimension with another in a view)."""
    for arg in dtensor_utils.arguments(args, kwargs):
        if not isinstance(arg, DTensor):
            continue
        parts = {}
        for axis, p in enumerate(arg.placements):
            if p.is_shard():
                parts[p.dim] = parts.get(p.dim, 1) * arg.device_mesh.size(axis)
        if any(arg.shape[dim] % n for dim, n in parts.items()):
            return True
    return False


_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__"
    for op in (
        "add sub mul matmul truediv floordiv mod pow and or xor lshift rshift"
    ).split()
) | {"__setitem__"}


def is_in_place(func):
    """Whether `func` writes to its first argument (`add_`, `x[i] = v`)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name in _IN_PLACE_OPERATORS
    return name.endswith("_")


def _mutated_argument(func, args):
    """The DTensor an in-place op writes to (its first argument), or None."""
    if is_in_place(func) and args and isinstance(args[0], DTensor):
        return args[0]
    return None


def run_replicated(func, mesh, args, kwargs):
    """Run `func` on replicated local values; return replicated DTensors."""
    replicate = [Replicate()] * mesh.ndim

    def to_local(x):
        if isinstance(x, (list, tuple)):
            return type(x)(to_local(item) for item in x)
        if not isinstance(x, DTensor):
            return x
        if not all(p.is_replicate() for p in x.placements):
            name = getattr(func, "__name__", str(func))
            if name not in _gathered_ops:
                _gathered_ops.add(name)
                _logger.warning(
                    "DTensor has no sharding rule for %s: its sharded "
                    "arguments are gathered and it runs replicated.",
                    name,
                )
            x = x.redistribute(mesh, replicate)
        return x.to_local(grad_placements=replicate)

    def to_dtensor(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return dtensor_utils.from_local(x, mesh, replicate)
        if isinstance(x, (list, tuple)):
            return type(x)(to_dtensor(item) for item in x)
        return x

    local_args = to_local(tuple(args))
    target = _mutated_argument(func, args)
    if target is not None:
        # Autograd refuses in-place writes to a view that `to_local`'s
        # backward needs (`transform[:, 0:2, 2] = 0` in
        # `image.affine_transform`): the op writes to a copy.
        local_args = (local_args[0].clone(), *local_args[1:])
    output = func(*local_args, **{k: to_local(v) for k, v in kwargs.items()})
    if target is not None:
        # The op wrote to a replicated copy of `target`: write the new value
        # back into `target`, in its own layout, for the caller to see it.
        written = dtensor_utils.from_local(local_args[0], mesh, replicate)
        target.copy_(written.redistribute(mesh, target.placements))
        return target if output is local_args[0] else to_dtensor(output)
    return to_dtensor(output)


# Calls that DTensor cannot run sharded, for which it raises some other
# error than a missing rule: run replicated at once (NOTE [fallback] in
# `dtensor_promotion`). Each has an output whose shape depends on the
# values (which sharding propagation cannot infer, even for replicated
# arguments) or no shape rule at all: `repeat_interleave` with tensor
# repeats (metrics' `ops.repeat`), `bincount`, `nonzero`, and
# `linalg.lstsq`; `ctc_loss`, whose missing strategy DTensor reports as a
# failed propagation; and `quantile` (`ops.median` too), whose decomposition
# in C++ has a backward that fails on DTensors even when replicated.
RUN_REPLICATED = frozenset(
    (
        torch.quantile,
        torch.Tensor.quantile,
        torch.nanquantile,
        torch.repeat_interleave,
        torch.Tensor.repeat_interleave,
        torch.bincount,
        torch.Tensor.bincount,
        torch.nonzero,
        torch.Tensor.nonzero,
        torch.linalg.lstsq,
        torch.nn.functional.ctc_loss,
    )
)

RULES = dict.fromkeys(_CONVOLUTIONS, _convolution)
RULES[torch.nn.functional.scaled_dot_product_attention] = _attention
RULES[torch.nn.functional.embedding] = _embedding
RULES[torch.unbind] = RULES[torch.Tensor.unbind] = _unbind
RULES[torch.nn.functional.rms_norm] = _rms_norm
RULES[torch.Tensor.__getitem__] = _getitem
RULES[torch.Tensor.__setitem__] = _setitem
RULES[torch.gather] = RULES[torch.Tensor.gather] = _gather
RULES[torch.take_along_dim] = _take_along_dim
RULES[torch.Tensor.take_along_dim] = _take_along_dim
