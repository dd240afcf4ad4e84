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
from torch.distributed.tensor import _sharding_prop

from keras.src.backend.torch import dtensor_utils

_logger = logging.getLogger(__name__)
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
    return func(input, weight, *args, **kwargs)


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


def is_missing_rule(error):
    """Whether `error` is DTensor's sharding propagation finding no
    strategy for an op: a `NotImplementedError` raised in
    `torch.distributed.tensor._sharding_prop`, alone or as the cause of
    the error DTensor wraps it in."""
    while error is not None:
        if isinstance(error, NotImplementedError):
            tb = error.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None and tb.tb_frame.f_code.co_filename == (
                _sharding_prop.__file__
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
    output = func(*local_args, **{k: to_local(v) for k, v in kwargs.items()})
    target = _mutated_argument(func, args)
    if target is not None:
        # The op wrote to a replicated copy of `target`: write the new value
        # back into `target`, in its own layout, for the caller to see it.
        written = dtensor_utils.from_local(local_args[0], mesh, replicate)
        target.copy_(written.redistribute(mesh, target.placements))
        return target if output is local_args[0] else to_dtensor(output)
    return to_dtensor(output)


# Calls that DTensor cannot run sharded, for which it raises some other
# error than a missing rule: run replicated at once (NOTE [fallback] in
# `dtensor_promotion`).
# `repeat_interleave` with tensor repeats (metrics' `ops.repeat`) has an
# output shape that depends on the values, which sharding propagation
# cannot infer.
RUN_REPLICATED = frozenset(
    (torch.repeat_interleave, torch.Tensor.repeat_interleave)
)

RULES = dict.fromkeys(_CONVOLUTIONS, _convolution)
RULES[torch.nn.functional.scaled_dot_product_attention] = _attention
RULES[torch.nn.functional.embedding] = _embedding
