"""Where input batches are sharded over the batch axis.

Keras's training loops hand every rank the same global batch (every rank
iterates the same arrays, `PyDataset` or `DataLoader`). Each rank keeps its
slice of the batch axis, with `torch.chunk`'s split (so a final batch that
does not divide by the number of ranks gives some ranks one row fewer), and
the batch becomes a DTensor of the global shape. No data moves between
ranks, and each rank's rows are sliced where the batch is (numpy arrays,
tensors on the host) before they move to its device: a GPU receives its
own rows, not the global batch.

When the data is already per rank, each rank's rows are assembled into the
global batch instead (`from_process_local`): with `auto_shard_dataset=False`,
or when a torch `DataLoader` samples with a `DistributedSampler`.

When the batch is not sharded at all (a model-parallel mesh without a batch
axis), the trainer computes loss and metrics on local tensors instead
(`local_if_replicated`).

NOTE [same batches]: the global batch must be the same on every rank, or
each rank trains on different data and nothing says so. Ranks shuffle
alike when they share Keras's seed (`process_group` gives them one unless
the user set a seed), but a user may seed each rank differently (for
different dropout masks, as with DDP). So, under an auto-sharding
distribution:

- a `RandomSampler` without a generator of its own (arrays with
  `shuffle=True`, a `DataLoader(shuffle=True)`) draws each epoch's order
  from a seed rank 0 draws as the sampler itself would, and broadcasts:
  the order is the one a single process seeded like rank 0 would use;
- the first batch of every epoch is fingerprinted on every rank and
  compared (one small all-gather per epoch): batches that still differ
  (`shuffle="batch"`, a shuffled `PyDataset`, a generator reading
  rank-dependent data) raise `ValueError` on every rank.
"""

import hashlib

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard
from torch.distributed.tensor import distribute_tensor

from keras.src import tree
from keras.src.backend.torch import cross_rank
from keras.src.backend.torch import dtensor_utils


def _is_batch_leaf(x):
    return isinstance(x, (torch.Tensor, np.ndarray)) and len(x.shape) > 0


def _distributed_sampler(data_adapter):
    """The `DistributedSampler` of an adapter's `DataLoader`, if any."""
    from torch.utils.data import DistributedSampler

    loader = getattr(data_adapter, "_dataloader", None)
    for sampler in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _check_sampler(sampler, distribution):
    mesh = distribution.device_mesh
    axis = list(mesh.axis_names).index(distribution.batch_dim_name)
    shards = mesh.shape[axis]
    if sampler.num_replicas != shards:
        raise ValueError(
            f"The DataLoader's DistributedSampler splits the data "
            f"{sampler.num_replicas} ways, but the batch axis "
            f"{distribution.batch_dim_name!r} of the mesh {mesh} has {shards} "
            "shards. Build it with `DistributedSampler(dataset, "
            f"num_replicas={shards}, rank=<this process's position on the "
            "batch axis>)`, or pass the DataLoader without one: every "
            "batch is then the global batch."
        )


def shard_batches(data_adapter, batches):
    """Shard every batch an epoch iterator yields; see `shard_batch`.

    Args:
        data_adapter: The `DataAdapter` the batches come from.
        batches: The iterable of batches it produced.

    Returns:
        `batches` itself without a multi-device distribution, else an
        iterator of sharded batches.
    """
    from keras.src.backend.torch import distribution_lib

    distribution = distribution_lib.active_distribution()
    if distribution is None:
        return batches
    _check_same_number_of_batches(data_adapter)
    per_process = not distribution.auto_shard_dataset
    sampler = _distributed_sampler(data_adapter)
    if sampler is not None:
        _check_sampler(sampler, distribution)
        per_process = True
    if per_process:
        return (shard_batch(batch, True) for batch in batches)
    _agree_on_order(batches)
    # Iterated now, as Keras iterates a `DataLoader` it is handed (a new
    # iterator draws from the global generator): the draws, and so the
    # shuffles, stay those of a single process.
    return _shard_checked(iter(batches))


def _check_same_number_of_batches(data_adapter):
    """Raise on every rank if the ranks' epochs have different lengths.

    A rank that runs out of batches first would leave the others waiting
    in their next step's collectives until the timeout.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    count = getattr(data_adapter, "num_batches", None)
    cross_rank.check_same(
        "number of batches per epoch",
        -1 if count is None else int(count),
        "Give every rank data of the same size (the same global dataset, "
        "or per-rank parts with the same number of batches), the same "
        "`batch_size` and the same `steps_per_epoch`.",
    )


def _shard_checked(batches):
    for index, batch in enumerate(batches):
        if index == 0:
            _check_same_batch(batch)
        yield shard_batch(batch, False)


def _agree_on_order(loader):
    """Make a shuffling `DataLoader` draw rank 0's order; see NOTE [same
    batches]."""
    from torch.utils.data import RandomSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    if isinstance(sampler, RandomSampler):
        batch_sampler.sampler = _RankZeroOrder(sampler)


class _RankZeroOrder:
    """Iterates a `RandomSampler` in the order rank 0 draws.

    Without a generator of its own, a `RandomSampler` seeds one from the
    global generator each time it is iterated. This draws that seed at the
    same moment, the same way, and every rank uses rank 0's: the order is
    the one a single process seeded like rank 0 would use.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        sampler = self.sampler
        if sampler.generator is not None:
            # The user's own generator: the user's choice (checked by
            # `_check_same_batch`).
            yield from sampler
            return
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        seed = cross_rank.broadcast_int(seed, src=0)
        sampler.generator = torch.Generator()
        sampler.generator.manual_seed(seed)
        try:
            # `RandomSampler.__iter__` reads its generator when it starts.
            indices = iter(sampler)
            first = next(indices, None)
        finally:
            sampler.generator = None
        if first is None:
            return
        yield first
        yield from indices


def _fingerprint(batch):
    """A hash of a batch's arrays: shapes, dtypes and up to 65,536 evenly
    spaced elements of each (rows in another order change them)."""
    digest = hashlib.blake2b(digest_size=8)
    for leaf in tree.flatten(batch):
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().reshape(-1)
            flat = flat[:: max(1, flat.numel() // 65536)].contiguous().cpu()
            data = flat.view(torch.uint8).numpy().tobytes()
        elif isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biufc":
            flat = leaf.reshape(-1)
            data = np.ascontiguousarray(flat[:: max(1, flat.size // 65536)])
            data = data.tobytes()
        else:
            continue
        digest.update(f"{tuple(leaf.shape)} {leaf.dtype}".encode())
        digest.update(data)
    return int.from_bytes(digest.digest(), "big") >> 1


def _check_same_batch(batch):
    """Raise on every rank if the ranks' first batches differ."""
    mine = _fingerprint(batch)
    everyone = cross_rank.all_gather_ints([mine])
    differ = [rank for rank, theirs in enumerate(everyone) if theirs != [mine]]
    if differ:
        raise ValueError(
            "Under a distribution, every rank must read the same global "
            "batches (each keeps its slice), but the first batch of this "
            f"epoch differs between rank {dist.get_rank()} and ranks "
            f"{differ}. Received data that differs by rank: typically a "
            "shuffle seeded differently on each rank (`shuffle='batch'`, a "
            "shuffled `PyDataset`, a DataLoader sampler with a generator of "
            "its own) or a source that reads rank-dependent data. Seed every "
            "rank alike, or give each rank its own rows with "
            "`auto_shard_dataset=False` or a `DistributedSampler`."
        )


def shard_batch(data, per_process=None):
    """Turn a batch (any nest of arrays) into DTensors sharded on axis 0.

    Leaves that are DTensors already are kept as they are.

    Args:
        data: The batch `Trainer` steps receive, e.g. `(x, y, sample_weight)`.
        per_process: Whether `data` holds only this process's rows. Defaults
            to `not distribution.auto_shard_dataset`.

    Returns:
        The same structure with each array a DTensor when a distribution with
        more than one device is set; `data` unchanged otherwise.
    """
    from keras.src.backend.torch import core
    from keras.src.backend.torch import distribution_lib

    distribution = distribution_lib.active_distribution()
    if distribution is None:
        return data

    if per_process is None:
        per_process = not distribution.auto_shard_dataset

    def shard(x):
        if isinstance(x, DTensor) or not _is_batch_leaf(x):
            return x
        shape = tuple(x.shape)
        layout = distribution.get_data_layout(shape).backend_layout
        if per_process:
            return from_process_local(
                core.convert_to_tensor(x), layout, distribution.batch_dim_name
            )
        rows = _rows_of_this_rank(x, layout)
        if rows is None:
            return distribution_lib.distribute_tensor(
                core.convert_to_tensor(x), layout
            )
        return dtensor_utils.from_local(
            core.convert_to_tensor(rows),
            layout.device_mesh,
            layout.placements,
            shape,
        )

    return tree.map_structure(shard, data)


def _rows_of_this_rank(x, layout):
    """The rows of the global batch `x` this rank keeps, as `distribute_
    tensor` would split them, sliced from `x` where it is; None for a layout
    other than rows split over one mesh axis."""
    placements = layout.placements
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if len(sharded) != 1 or placements[sharded[0]] != Shard(0):
        return None
    mesh_axis = sharded[0]
    mesh = layout.device_mesh
    sizes = chunk_sizes(x.shape[0], mesh.size(mesh_axis))
    index = mesh.get_coordinate()[mesh_axis]
    start = sum(sizes[:index])
    return x[start : start + sizes[index]]


def chunk_sizes(size, parts):
    """Row counts `torch.chunk` gives each of `parts` shards of `size` rows."""
    step = -(-size // parts) if size else 0
    return [max(0, min(step, size - i * step)) for i in range(parts)]


def from_process_local(local, layout, batch_dim_name):
    """Assemble the global batch from each rank's rows; see module doc.

    Args:
        local: This rank's rows, a `torch.Tensor`.
        layout: The `DTensorLayout` of the global batch.
        batch_dim_name: The mesh axis that shards the batch.

    Returns:
        A DTensor of the global batch.
    """
    mesh = layout.device_mesh
    names = list(mesh.mesh_dim_names)
    local = torch.as_tensor(local)
    if batch_dim_name not in names:
        # A batch axis of size 1 is not in the torch mesh (see NOTE
        # [size-1 axes] in `distribution_lib`): every rank holds the whole
        # batch.
        return distribute_tensor(
            local, mesh, layout.placements, src_data_rank=None
        )
    batch_axis = names.index(batch_dim_name)
    group = mesh.get_group(batch_axis)
    parts = mesh.size(batch_axis)
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(parts)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c.item()) for c in counts]
    total = sum(counts)
    if counts == chunk_sizes(total, parts):
        placements = list(layout.placements)
        placements[batch_axis] = Shard(0)
        return dtensor_utils.from_local(
            local, mesh, placements, (total, *local.shape[1:])
        )
    # Sizes that do not follow DTensor's split: gather every row, then keep
    # this rank's slice of the global batch.
    padded = torch.zeros(
        (max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device
    )
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(pieces, padded, group=group)
    full = torch.cat([p[:n] for p, n in zip(pieces, counts)])
    return distribute_tensor(full, mesh, layout.placements, src_data_rank=None)


def _is_replicated(x):
    return isinstance(x, DTensor) and all(
        p.is_replicate() for p in x.placements
    )


def local_if_replicated(*values):
    """The local tensors of batch values that every rank holds in full.

    Under a model-parallel mesh without a batch axis, predictions and
    targets are replicated DTensors: each rank holds the same full value.
    Keras computes the loss and metrics from them with a few dozen small
    ops, each of which costs DTensor's dispatch on DTensors (the loss of a
    512-4096-512 MLP on a `(1, 2)` mesh took 2.6 ms of a 34 ms step, 0.8 ms
    on plain tensors). On the local tensors the same ops give the same
    values on every rank; their gradient flows back into the DTensor graph
    as a replicated one. Values with any sharded or `Partial` DTensor among
    them (a batch-sharded prediction) are returned as they are: their loss
    needs DTensor's global reductions.

    Args:
        *values: Nests of tensors, e.g. `y, y_pred, sample_weight`.

    Returns:
        `values`, as a tuple, with every DTensor replaced by its local
        tensor if every DTensor among them is replicated; else unchanged.
    """
    leaves = [x for x in tree.flatten(values) if isinstance(x, DTensor)]
    if not leaves or not all(_is_replicated(x) for x in leaves):
        return values

    def local(x):
        if isinstance(x, DTensor):
            return x.to_local(grad_placements=x.placements)
        return x

    return tuple(tree.map_structure(local, value) for value in values)
