"""What a distribution does to a model: `keras.distribution.sharding_summary`.

A `LayoutMap` key that matches the wrong variables, or none, shows only as
memory that is not saved. The summary says, from the model's variables and
their layouts (no collective, nothing gathered): which variables each
`LayoutMap` key matched, each variable's layout and the shape of the shard
each process holds, and how much memory the parameters and the optimizer's
state take on each process against one process holding them all.

A shard's shape is the global shape with each dimension divided by the size
of the mesh axes that shard it (rounded up: the first shards of an uneven
split are the larger ones), so the figures are those of the process with
the largest shards.
"""

import math
import re

import numpy as np

from keras.src.api_export import keras_export
from keras.src.backend.common import global_state
from keras.src.distribution import process_output

# How many variable paths are listed under each LayoutMap key.
_PATHS_PER_KEY = 3


def key_matches(key, path):
    """Whether a `LayoutMap` key selects the variable path `path`.

    A key is an exact path or a regular expression that matches the whole
    path (`re.fullmatch`), as `LayoutMap` looks variables up.
    """
    return key == path or re.fullmatch(key, path) is not None


def _axes_sizes(layout):
    if layout is None or getattr(layout, "device_mesh", None) is None:
        return None
    mesh = layout.device_mesh
    return dict(zip(mesh.axis_names, mesh.shape))


def shard_shape(shape, layout):
    """The largest shard of a tensor of `shape` under `layout`.

    Args:
        shape: The global shape.
        layout: A `TensorLayout`, or None for a replicated tensor.

    Returns:
        A tuple: `shape` with each sharded dimension divided (rounded up) by
        the size of the mesh axis that shards it.
    """
    sizes = _axes_sizes(layout)
    if sizes is None:
        return tuple(shape)
    axes = tuple(layout.axes) + (None,) * (len(shape) - len(layout.axes))
    return tuple(
        -(-dim // sizes[axis]) if axis is not None else dim
        for dim, axis in zip(shape, axes)
    )


def _nbytes(shape, dtype):
    return math.prod(shape) * np.dtype(dtype).itemsize


def _layout_text(layout):
    if _axes_sizes(layout) is None:
        return "replicated"
    if all(axis is None for axis in layout.axes):
        return "replicated"
    return "(" + ", ".join(str(axis) for axis in layout.axes) + ")"


def _size(nbytes):
    if nbytes < 1024:
        return f"{nbytes} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}"


def _rows(variables):
    rows = []
    for variable in variables:
        layout = getattr(variable, "_layout", None)
        shape = tuple(variable.shape)
        local = shard_shape(shape, layout)
        rows.append(
            (
                variable.path,
                shape,
                _layout_text(layout),
                local,
                _nbytes(shape, variable.dtype),
                _nbytes(local, variable.dtype),
            )
        )
    return rows


def _key_lines(layout_map, paths):
    lines = []
    for key in layout_map.keys():
        matched = [path for path in paths if key_matches(key, path)]
        if not matched:
            lines.append(f"  {key!r}: matches no variable (nothing sharded)")
            continue
        shown = ", ".join(matched[:_PATHS_PER_KEY])
        if len(matched) > _PATHS_PER_KEY:
            shown += f", ... ({len(matched) - _PATHS_PER_KEY} more)"
        lines.append(f"  {key!r}: {len(matched)} variable(s): {shown}")
    return lines


def _table(rows):
    header = ("variable", "shape", "layout", "per-process shard", "bytes")
    body = [
        (path, str(shape), layout, str(local), _size(local_bytes))
        for path, shape, layout, local, _, local_bytes in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(5)]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
        for r in [header, *body]
    ]


def _totals(name, rows):
    full = sum(row[4] for row in rows)
    local = sum(row[5] for row in rows)
    share = f"{local / full:.0%} of " if full else ""
    return (
        f"{name}: {_size(local)} per process ({share}the {_size(full)} one "
        "process holds)"
    )


@keras_export("keras.distribution.sharding_summary")
def sharding_summary(model, print_fn=None):
    """Describe how the current distribution lays out `model`'s variables.

    Lists which variables each `LayoutMap` key matched (and keys that match
    none), each variable's layout and the shape of the shard each process
    holds, and the memory of the parameters and of the optimizer's state
    on each process. It reads only the variables' layouts: nothing is
    gathered and no collective runs, so it may be called on one process.

    Args:
        model: A built model (its optimizer's state is included once
            built, e.g. after `fit` or `optimizer.build`).
        print_fn: Called with the summary's text. Defaults to `print` on
            process 0 only; pass `print` to print on every process.

    Returns:
        The summary, as a string.
    """
    distribution = global_state.get_global_attribute("distribution")
    lines = [f"Sharding of model {model.name!r}"]
    if distribution is None:
        lines.append("No distribution is set: every variable is whole.")
    else:
        mesh = distribution.device_mesh
        lines.append(
            f"{type(distribution).__name__} over a mesh of shape "
            f"{tuple(mesh.shape)}, axes {list(mesh.axis_names)}, batch axis "
            f"{distribution.batch_dim_name!r}"
        )
    rows = _rows(model.variables)
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is not None and len(layout_map):
        lines.append("LayoutMap keys:")
        lines.extend(_key_lines(layout_map, [row[0] for row in rows]))
    lines.append("Variables:")
    lines.extend(_table(rows))
    lines.append(_totals("Parameters", rows))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        lines.append(_totals("Optimizer state", _rows(optimizer.variables)))
    text = "\n".join(lines)
    if print_fn is None:
        if process_output.process_id() == 0:
            print(text)
    else:
        print_fn(text)
    return text
