"""A sharded DTensor in full, and a full value into shards, one shard at a time.

Saving a full file reads each sharded variable in full (`to_global`), and
loading one assigns a full value to it (`value_to_assign`). DTensor's own
routes hold several full-size copies at once: `redistribute` to
`Replicate` gathers every shard into one buffer and then concatenates
them into the full tensor (two full copies), and `distribute_tensor`
splits the value into contiguous chunks for a scatter (a full copy beside
the value, on every rank), and the assignment then copies a new shard
into the old one. On a model whose largest variable is a large part of a
rank's memory, that is what runs out.

Here each shard travels on its own, in pieces of at most `CHUNK_BYTES`:

- `gather` allocates the full tensor once and fills it shard by shard:
  the rank holding each distinct shard broadcasts it and every rank
  writes it into place. A shard of the first dimension is a contiguous
  part of the full tensor and is received in place; a shard of another
  dimension is not, and travels in blocks of its rows through one buffer
  of at most `CHUNK_BYTES`. Beside the shards: the full tensor, and that
  buffer.
- `scatter_into` keeps only the first rank's value, as
  `distribute_tensor` does: that rank sends each other rank its shard,
  block by block, and copies its own; every rank receives straight into
  the shard it already holds. Beside the shards and the value being
  assigned: one buffer of at most `CHUNK_BYTES`.

Both run on the default process group with global ranks, so they serve
meshes that span the whole world (Keras's do); `supports()` says when
they apply, and callers use DTensor's routes otherwise (a `Partial` or
strided placement, a mesh over some of the ranks).
"""

import itertools

import torch

from keras.src.backend.torch import torch_internals

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard
except ImportError:  # torch built without distributed support.
    DTensor = None

# The largest piece of a shard sent or received through a buffer.
CHUNK_BYTES = 8 * 2**20


def supports(mesh, placements):
    """Whether `gather`/`scatter_into` handle a DTensor of this layout."""
    return (
        DTensor is not None
        and any(type(p) is Shard for p in placements)
        and all(type(p) in (Shard, Replicate) for p in placements)
        and dist.is_initialized()
        and mesh.size() == dist.get_world_size()
    )


def _shards(global_shape, mesh, placements):
    """`(rank, coordinate, slices)` for every rank of `mesh`, in order."""
    ranks = mesh.mesh
    for coordinate in itertools.product(*(range(n) for n in ranks.shape)):
        shape, offset = torch_internals.local_shape_and_offset(
            global_shape, ranks.shape, coordinate, placements
        )
        slices = tuple(
            slice(start, start + size) for start, size in zip(offset, shape)
        )
        yield int(ranks[coordinate]), coordinate, slices


def _holds_first_copy(coordinate, placements):
    # Ranks that differ only along replicated mesh axes hold the same
    # shard; the one at coordinate 0 on those axes sends it.
    return all(
        index == 0
        for index, placement in zip(coordinate, placements)
        if placement.is_replicate()
    )


def _row_blocks(global_shape, dtype, slices):
    """Slices of a shard's first dimension, each at most `CHUNK_BYTES`.

    A shard that is a contiguous part of the full tensor (a shard of the
    first dimension) is one block: it is sent or received as it is.
    Otherwise each block is a run of the shard's rows, which is contiguous
    in the shard itself. Computed from the layout alone, so that sender
    and receivers agree.
    """
    shard = torch.empty(global_shape, dtype=dtype, device="meta")[slices]
    if shard.is_contiguous() or shard.dim() == 0:
        return [slice(None)]
    row_bytes = max(1, shard[0].numel() * shard.element_size())
    rows = max(1, CHUNK_BYTES // row_bytes)
    return [slice(start, start + rows) for start in range(0, len(shard), rows)]


def gather(x):
    """The full value of the sharded DTensor `x` on every rank.

    Args:
        x: A DTensor whose layout `supports()`.

    Returns:
        A plain tensor of `x`'s global shape, the same on every rank.
    """
    me = dist.get_rank()
    local = torch_internals.local_tensor(x)
    full = torch.empty(x.shape, dtype=x.dtype, device=local.device)
    placements = tuple(x.placements)
    buffers = []
    for rank, coordinate, slices in _shards(x.shape, x.device_mesh, placements):
        target = full[slices]
        if target.numel() == 0 or not _holds_first_copy(coordinate, placements):
            continue
        if rank == me:
            target.copy_(local)
        for block in _row_blocks(x.shape, x.dtype, slices):
            part = target[block]
            if part.is_contiguous():
                # In place; the sender's was written above.
                dist.broadcast(part, src=rank)
            elif rank == me:
                dist.broadcast(local[block].contiguous(), src=rank)
            else:
                buffer = _buffer(buffers, part, local.device)
                dist.broadcast(buffer, src=rank)
                part.copy_(buffer)
    return full


def _buffer(buffers, part, device):
    """A contiguous tensor shaped like `part`, from one reused allocation.

    Every block but a shard's last has the same size: reusing one buffer
    keeps the allocator from taking (and keeping) a new one per block.
    """
    size = part.numel()
    if not buffers or buffers[0].numel() < size:
        buffers[:] = [torch.empty(size, dtype=part.dtype, device=device)]
    return buffers[0][:size].view(part.shape)


def scatter_into(current, value):
    """Write the first rank's `value` into the shards of `current`.

    Args:
        current: A DTensor whose layout `supports()`: a variable's value.
        value: A plain tensor of `current`'s global shape, on every rank
            (only the first rank of the mesh reads it).
    """
    mesh, placements = current.device_mesh, tuple(current.placements)
    me = dist.get_rank()
    source = int(mesh.mesh.flatten()[0])
    local = torch_internals.local_tensor(current)
    buffers = []
    for rank, _, slices in _shards(value.shape, mesh, placements):
        shard = value[slices]
        if shard.numel() == 0 or me not in (rank, source):
            continue
        if rank == me == source:
            local.copy_(shard)
        elif me == source:
            for block in _row_blocks(value.shape, local.dtype, slices):
                dist.send(shard[block].contiguous(), dst=rank)
        else:
            for block in _row_blocks(value.shape, local.dtype, slices):
                part = local[block]
                if part.is_contiguous():
                    dist.recv(part, src=source)
                else:
                    buffer = _buffer(buffers, part, local.device)
                    dist.recv(buffer, src=source)
                    part.copy_(buffer)
            # Written behind autograd's back: what saved the old value
            # for a backward pass must see that it changed.
            torch.autograd.graph.increment_version(local)
