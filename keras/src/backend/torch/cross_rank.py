"""Values the ranks exchange to agree, sent as tensors, never pickled.

`torch.distributed`'s object collectives (`broadcast_object_list`,
`all_gather_object`) pickle what they send, and unpickling data received
from another process runs whatever that process chose. The distribution
code exchanges only integers and text (JSON), as plain tensors, so a rank
never unpickles anything another rank sent. (torch's own code, e.g.
`torch.distributed.checkpoint`'s planning, still uses its object
collectives; see the guide's security section,
`docs/distributed_training_torch.md`.)

`check_same` is how ranks detect that they disagree (different model code,
layouts, shapes, batch sizes): every rank sends a short digest, and only
when digests differ do they exchange the values themselves, so that the
error, raised on every rank, shows what differs.
"""

import hashlib
import json

import torch
import torch.distributed as dist


def _device():
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value, src=0):
    """Rank `src`'s integer (int64), on every rank."""
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(tensor, src=src)
    return int(tensor.item())


def all_gather_ints(values):
    """Every rank's list of integers (each rank sends as many)."""
    tensor = torch.tensor(list(values), dtype=torch.int64, device=_device())
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def all_gather_text(text):
    """Every rank's string, in rank order."""
    data = text.encode("utf-8")
    (sizes,) = zip(*all_gather_ints([len(data)]))
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=_device())
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [
        bytes(t[:size].cpu().numpy()).decode("utf-8")
        for t, size in zip(gathered, sizes)
    ]


def _digest(text):
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=7).digest(), "big"
    )


def disagreement(value, labels=None):
    """Where the ranks' values differ; None when all ranks agree.

    Collective: every rank of the world calls it with its own value. One
    integer per rank is exchanged when they agree.

    Args:
        value: A JSON-serialisable value (e.g. a dict).
        labels: Optional JSON-serialisable names for the entries, exchanged
            only when the values differ and left out of the comparison
            (e.g. variable paths, which may differ between ranks that
            build the same model).

    Returns:
        None, or a list with each rank's `(value, labels)`, decoded from
        JSON.
    """
    text = json.dumps(value, default=str)
    digests = [d[0] for d in all_gather_ints([_digest(text)])]
    if len(set(digests)) == 1:
        return None
    both = json.dumps([value, labels], default=str)
    return [json.loads(t) for t in all_gather_text(both)]


def _entries(value):
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {"": value}


def _shown(value):
    return "(none)" if value is None else value


def _entry_name(key, first_label, label, rank):
    """`"3 (dense/kernel): "`, with each rank's label where they differ."""
    if first_label == label:
        named = f"{key} ({label})" if label else key
    else:
        named = f"{key} (rank 0: {first_label}, rank {rank}: {label})"
    return f"{named}: " if named else ""


def _differences(values, most=10):
    """Lines naming each entry where a rank differs from rank 0."""
    first, first_labels = values[0]
    first = _entries(first)
    lines = []
    for rank, (theirs, labels) in enumerate(values[1:], 1):
        theirs = _entries(theirs)
        for key in list(first) + [k for k in theirs if k not in first]:
            mine, other = first.get(key), theirs.get(key)
            if mine == other:
                continue
            name = _entry_name(
                key,
                (first_labels or {}).get(key),
                (labels or {}).get(key),
                rank,
            )
            lines.append(
                f"  {name}rank 0 has {_shown(mine)}, rank {rank} has "
                f"{_shown(other)}"
            )
            if len(lines) >= most:
                return lines
    return lines


def check_same(what, value, fix, labels=None):
    """Raise the same `ValueError` on every rank if their `value`s differ.

    Collective: every rank calls it. The message names each rank whose
    value differs from rank 0's, with the entries that differ (at most
    10).

    Args:
        what: What the value is, e.g. `"variables in model 'mlp'"`.
        value: This rank's value: a dict (compared entry by entry) or any
            JSON-serialisable value, with the same key order on every rank.
        fix: How to make the ranks agree, appended to the message.
        labels: Optional names of the entries (see `disagreement`).
    """
    values = disagreement(value, labels)
    if values is None:
        return
    lines = _differences(values) or [
        f"  rank {rank} has {theirs}" for rank, (theirs, _) in enumerate(values)
    ]
    raise ValueError(
        f"Every rank must have the same {what}, but they differ:\n"
        + "\n".join(lines)
        + f"\n{fix}"
    )
