"""Runs the Python snippets of the guide, in order, as a user would.

Each ```python block of docs/distributed_training_torch.md runs in a fresh
namespace holding what the guide says its snippets assume: `keras`, `np`,
`make_model()` (a small classifier, built from the initial weights the
single-process run saved, so both runs start alike) and its data `x`, `y`
(250 rows: the last batch of 64 is uneven), in a fresh session
(`clear_session`: model names start again). A block preceded by an HTML
comment `<!-- not run: <why> -->` is skipped; one preceded by
`<!-- continues the block above -->` runs as part of the block before it
(the prose between them explains the first).

After each snippet, for snippet `i`:

- `snippet{i}/weight:<path>`: the weights of the `model` it left, if
  `make_model()` built it (a model a snippet builds itself has initial
  values of its own in each run);
- `snippet{i}/trained:<path>` and `snippet{i}/loss`: a fresh `make_model()`
  trained for 2 epochs under the distribution the snippet set (none for a
  snippet that sets none), so a snippet that only configures shows that
  its configuration trains one process's numbers;
- `snippet{i}/printed`: what it printed (rank 0 prints Keras's messages).

The distribution is unset before the next snippet. The same worker runs
as one process (the reference: a mesh of one device) and under torchrun.
"""

import contextlib
import io
import os
import re
import sys
from pathlib import Path

import common
import numpy as np

import keras

GUIDE = (
    Path(__file__).resolve().parents[3] / "docs/distributed_training_torch.md"
)
BLOCK = re.compile(
    r"(?:<!-- (?:not run: (?P<why>.*?)|(?P<more>continues the block above))"
    r" -->\n)?```python\n(?P<code>.*?)```",
    re.S,
)
ROWS, FEATURES, CLASSES = 250, 8, 2


def snippets():
    """`{i: (code, why_not_run)}` for each snippet of the guide: block `i`
    and the blocks that continue it."""
    found = {}
    for i, match in enumerate(BLOCK.finditer(GUIDE.read_text())):
        if match["more"]:
            first = max(found)
            code, why = found[first]
            found[first] = (code + match["code"], why)
        else:
            found[i] = (match["code"], match["why"])
    return found


def make_data():
    x = np.random.default_rng(0).normal(size=(ROWS, FEATURES))
    labels = (x[:, 0] + x[:, 1] > 0).astype("int64")
    return x.astype("float32"), np.eye(CLASSES, dtype="float32")[labels]


def model_maker(init_path, made):
    def make_model():
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(CLASSES, activation="softmax"),
            ]
        )
        if os.path.exists(init_path):
            with np.load(init_path) as data:
                model.set_weights([data[f"w{i}"] for i in range(len(data))])
        elif common.is_distributed():
            raise FileNotFoundError(f"No initial weights at {init_path}.")
        else:
            weights = model.get_weights()
            np.savez(init_path, **{f"w{i}": w for i, w in enumerate(weights)})
        made.add(id(model))
        return model

    return make_model


def train_fresh(make_model, x, y):
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit(
        x, y, batch_size=64, epochs=2, shuffle=False, verbose=0
    ).history
    return model, history["loss"]


def main():
    args = common.parse_args()
    made = set()
    make_model = model_maker(args.init, made)
    x, y = make_data()
    results = {}
    for i, (code, why) in snippets().items():
        if why:
            continue
        keras.backend.clear_session()
        namespace = {
            "__name__": "__guide__",
            "keras": keras,
            "np": np,
            "make_model": make_model,
            "x": x,
            "y": y,
        }
        keras.utils.set_random_seed(0)  # `fit`'s shuffle.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"guide snippet {i}", "exec"), namespace)
        sys.stdout.write(printed.getvalue())
        snippet_model = namespace.get("model")
        if id(snippet_model) in made:
            for key, value in common.weights_dict(snippet_model).items():
                results[f"snippet{i}/{key}"] = value
        model, losses = train_fresh(make_model, x, y)
        results[f"snippet{i}/loss"] = np.array(losses)
        for key, value in common.weights_dict(model, "trained").items():
            results[f"snippet{i}/{key}"] = value
        results[f"snippet{i}/printed"] = np.array(printed.getvalue())
        keras.distribution.set_distribution(None)
    common.save_results(**results)


if __name__ == "__main__":
    main()
