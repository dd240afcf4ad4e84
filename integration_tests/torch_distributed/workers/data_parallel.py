"""DataParallel with every kind of input, against one process.

Each scenario trains a two-input classifier (BatchNormalization, count
metrics) on 99 samples in global batches of 16, so the last batch (3 rows)
does not divide by the number of ranks, and records history, `evaluate`,
`predict` and the final weights under its own key prefix.
"""

import os

import common
import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset
from torch.utils.data import DistributedSampler

import keras
from keras import layers

SAMPLES, BATCH = 99, 16
SCENARIOS = {}
# The number of ranks the reference mimics for per-rank data.
REFERENCE_RANKS = [2]


def scenario(function):
    SCENARIOS[function.__name__] = function
    return function


def make_data():
    a, b, noise = common.data(0, (SAMPLES, 6), (SAMPLES, 3), (SAMPLES,))
    y = ((a[:, 0] + b[:, 0] + 0.5 * noise) > 0).astype("float32")
    (weights,) = common.data(1, (SAMPLES,))
    return {"a": a, "b": b}, y, np.abs(weights) + 0.5


def make_model(init, loss="binary_crossentropy", optimizer=None):
    a, b = keras.Input((6,), name="a"), keras.Input((3,), name="b")
    x = layers.Concatenate()([a, b])
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Dropout(0.3, seed=7)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="out")(x)
    model = keras.Model({"a": a, "b": b}, outputs)
    common.share_initial_weights(model, init)
    model.compile(
        optimizer or keras.optimizers.Adam(0.01),
        loss,
        metrics=[
            "accuracy",
            keras.metrics.TruePositives(name="tp"),
            keras.metrics.FalseNegatives(name="fn"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
        ],
    )
    return model


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return -(-len(self.y) // BATCH)

    def __getitem__(self, index):
        rows = slice(index * BATCH, (index + 1) * BATCH)
        return {k: v[rows] for k, v in self.x.items()}, self.y[rows]


class Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.x.items()}, self.y[index]


def record(prefix, model, history, evaluation, predictions):
    results = {f"{prefix}history:{k}": v for k, v in history.items()}
    results[f"{prefix}evaluate"] = evaluation
    if predictions is not None:
        results[f"{prefix}predict"] = predictions
    for k, v in common.weights_dict(model).items():
        results[f"{prefix}{k}"] = v
    return results


@scenario
def arrays(init, x, y, weights):
    model = make_model(init)
    history = model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=BATCH,
        epochs=2,
        validation_split=0.2,
        shuffle=False,
        verbose=2,
    ).history
    evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    return model, history, evaluation, model.predict(x, batch_size=BATCH)


@scenario
def class_weights(init, x, y, weights):
    model = make_model(init)
    history = model.fit(
        x,
        y,
        class_weight={0: 1.0, 1: 3.0},
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    ).history
    return model, history, model.evaluate(x, y, verbose=0), None


def _fit_arrays(model, x, y):
    """`fit` and `evaluate` on the arrays, in order; a scenario's result."""
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    ).history
    evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    return model, history, evaluation, None


def root_sum_squares(y_true, y_pred):
    # Nonlinear in the sum over the batch.
    y_pred = keras.ops.squeeze(y_pred, axis=-1)
    return keras.ops.sqrt(keras.ops.sum((y_true - y_pred) ** 2) + 1.0)


@scenario
def nonlinear_loss(init, x, y, weights):
    model = make_model(init, loss=root_sum_squares)
    return _fit_arrays(model, x, y)


@scenario
def loss_scale(init, x, y, weights):
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    model = make_model(init, optimizer=optimizer)
    return _fit_arrays(model, x, y)


class ReadsLossOnRankZero(keras.Model):
    """A model whose `compute_loss` reads the loss on rank 0 alone."""

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        # The loss is global already: reading it takes no collective.
        if int(os.environ.get("RANK", 0)) == 0:
            float(loss)
        return loss


@scenario
def own_compute_loss(init, x, y, weights):
    functional = make_model(init)
    model = ReadsLossOnRankZero(functional.inputs, functional.outputs)
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    return _fit_arrays(model, x, y)


@scenario
def py_dataset(init, x, y, weights):
    model = make_model(init)
    data = Batches(x, y)
    history = model.fit(data, validation_data=data, epochs=2, verbose=0).history
    return model, history, model.evaluate(data, verbose=0), model.predict(data)


@scenario
def data_loader(init, x, y, weights):
    model = make_model(init)
    loader = DataLoader(Rows(x, y), batch_size=BATCH)
    history = model.fit(loader, epochs=2, verbose=0).history
    evaluation = model.evaluate(loader, verbose=0)
    return model, history, evaluation, None


def _sampler_order(rows, ranks):
    """The global batches a DistributedSampler's per-rank batches make.

    Rank r takes rows r, r + ranks, ...; a global batch is the concatenation
    of the ranks' batches, so its rows come in that interleaved order.
    """
    per_rank = BATCH // ranks
    order = []
    for start in range(0, rows, BATCH):
        batch = []
        for rank in range(ranks):
            batch += list(range(start + rank, min(start + BATCH, rows), ranks))
        order.append(batch[: ranks * per_rank])
    return order


@scenario
def distributed_sampler(init, x, y, weights):
    # Per-rank data: each rank loads its half of every global batch. The
    # reference loads the same global batches, rows in the same order (the
    # Dropout masks depend on a row's position in the batch).
    model = make_model(init)
    rows = Rows({k: v[:98] for k, v in x.items()}, y[:98])
    if common.is_distributed():
        sampler = DistributedSampler(
            rows, common.WORLD_SIZE, common.RANK, shuffle=False, drop_last=True
        )
        loader = DataLoader(rows, BATCH // common.WORLD_SIZE, sampler=sampler)
    else:
        order = _sampler_order(98, REFERENCE_RANKS[0])
        loader = DataLoader(rows, batch_sampler=order)
    history = model.fit(loader, epochs=2, verbose=0).history
    return model, history, model.evaluate(loader, verbose=0), None


@scenario
def generator(init, x, y, weights):
    model = make_model(init)

    def batches():
        while True:
            for start in range(0, SAMPLES, BATCH):
                rows = slice(start, start + BATCH)
                yield {k: v[rows] for k, v in x.items()}, y[rows]

    history = model.fit(batches(), steps_per_epoch=7, epochs=2, verbose=0)
    evaluation = model.evaluate(batches(), steps=7, verbose=0)
    return model, history.history, evaluation, None


@scenario
def custom_loop(init, x, y, weights):
    # A loop written with keras.ops and optimizer.apply; the global batch
    # is sharded with the public `distribute_tensor` and the data layout.
    # Rank 0 alone reads the loss before backward, every other batch: the
    # loss is reduced when it is computed, a collective every rank joins.
    model = make_model(init)
    optimizer = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.BinaryCrossentropy()
    losses = []
    rank = int(os.environ.get("RANK", 0))
    for start in range(0, SAMPLES, BATCH):
        rows = slice(start, start + BATCH)
        batch = {k: common.shard_global_batch(v[rows]) for k, v in x.items()}
        target = common.shard_global_batch(y[rows][:, None])
        loss = loss_fn(target, model(batch, training=True))
        # A scalar computed from the batch is a plain tensor, the same on
        # every rank (NOTE [scalar results] in `dtensor_promotion`).
        assert not isinstance(loss, DTensor), type(loss)
        early = None
        if start // BATCH % 2 and rank == 0:
            early = float(loss)
        model.zero_grad()
        loss.backward()
        if early is not None:
            assert early == float(loss), (early, float(loss))
        variables = model.trainable_variables
        grads = [v.value.grad for v in variables]
        # Backward leaves every gradient reduced, as DDP does.
        partial = [
            v.path
            for v, g in zip(variables, grads)
            if isinstance(g, DTensor)
            and any(p.is_partial() for p in g.placements)
        ]
        assert not partial, f"Partial after backward: {partial}"
        optimizer.apply(grads, variables)
        losses.append(keras.ops.convert_to_numpy(loss))
    return model, {"loss": np.array(losses)}, [], None


@scenario
def accumulate(init, x, y, weights):
    # Gradient accumulation: two backward passes (two global micro-batches)
    # before each `optimizer.apply`, then the sum halved in place. The
    # first pass leaves reduced gradients; the second adds its own, which
    # must be reduced once too.
    model = make_model(init)
    optimizer = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.BinaryCrossentropy()
    losses = []
    for start in range(0, 96, 2 * BATCH):
        model.zero_grad()
        for micro in (start, start + BATCH):
            rows = slice(micro, micro + BATCH)
            shard = common.shard_global_batch
            batch = {k: shard(v[rows]) for k, v in x.items()}
            loss = loss_fn(shard(y[rows][:, None]), model(batch))
            loss.backward()
            losses.append(keras.ops.convert_to_numpy(loss))
        variables = model.trainable_variables
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            for grad in grads:
                grad.mul_(0.5)
        optimizer.apply(grads, variables)
    return model, {"loss": np.array(losses)}, [], None


def main():
    args = common.parse_args(
        {"--only": {"default": None}, "--reference-ranks": {"default": "2"}}
    )
    REFERENCE_RANKS[0] = int(args.reference_ranks)
    if common.is_distributed():
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y, weights = make_data()
    results = {}
    names = [args.only] if args.only else list(SCENARIOS)
    for name in names:
        # The same seed everywhere, for the Dropout masks.
        keras.utils.set_random_seed(11)
        init = f"{args.init}.{name}.npz"
        model, history, evaluation, predictions = SCENARIOS[name](
            init, x, y, weights
        )
        results.update(
            record(f"{name}/", model, history, evaluation, predictions)
        )
    common.save_results(**results)


if __name__ == "__main__":
    main()
