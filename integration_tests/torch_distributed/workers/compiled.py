"""`jit_compile=True` trains as eager Keras does, and compiles once.

Trains `models.transformer_classifier` (embedding, attention, norms, MLP,
EinsumDense, Conv1D, pooling) for 2 epochs of 45 rows in batches of 16:
3 steps an epoch, the last of 13 rows, which does not divide by the ranks.
It runs twice from the same initial weights, eager (`jit_compile=False`)
and compiled (`True`), then evaluates and predicts the same way, and
records each run's weights, per-epoch loss and accuracy, evaluation and
predictions.

For the compiled run it also records, after each step, how many frames
dynamo has been asked to compile (`counters["frames"]["total"]`: every
new frame and every recompile counts one), and the functions for which
dynamo hit its recompile limit and fell back to eager (from its warning).
`--strategy` picks the distribution: `data` (`DataParallel`), `fsdp`
(every variable split over "batch") or `model` (Megatron-style layouts on
a `(1, N)` mesh).
"""

import logging

import common
import models
import numpy as np

import keras

ROWS, BATCH, EPOCHS = 45, 16, 3


class _RecompileLimitHits(logging.Handler):
    """Collects the functions named in dynamo's recompile-limit warnings."""

    def __init__(self):
        super().__init__()
        self.functions = []

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message:
            self.functions.append(message.split("function: ")[1].split()[0])


class _CompiledFrames(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_step = []

    def on_train_batch_end(self, batch, logs=None):
        from torch._dynamo.utils import counters

        self.after_step.append(
            (counters["stats"]["unique_graphs"], counters["frames"]["total"])
        )


def _train(jit_compile, init, x, y, x_test, y_test):
    keras.utils.set_random_seed(0)
    model = models.transformer_classifier()
    common.share_initial_weights(model, init)
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    frames = _CompiledFrames()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[frames],
    )
    name = "compiled" if jit_compile else "eager"
    results = common.weights_dict(model, f"weight:{name}")
    for key, values in history.history.items():
        results[f"history:{name}:{key}"] = np.asarray(values)
    evaluation = model.evaluate(x_test, y_test, batch_size=BATCH, verbose=0)
    results[f"evaluate:{name}"] = np.asarray(evaluation)
    predictions = model.predict(x_test, batch_size=BATCH, verbose=0)
    results[f"predict:{name}"] = predictions
    return results, frames.after_step


def main():
    args = common.parse_args({"--strategy": {"default": "data"}})
    if common.is_distributed():
        distribution = common.strategy_distribution(
            args.strategy,
            models.transformer_fsdp_layout_map,
            models.transformer_layout_map,
        )
        keras.distribution.set_distribution(distribution)
    hits = _RecompileLimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    (x,) = common.data(0, (ROWS, models.SEQ), integer_high=models.VOCAB)
    (y,) = common.data(1, (ROWS,), integer_high=3)
    (x_test,) = common.data(2, (21, models.SEQ), integer_high=models.VOCAB)
    (y_test,) = common.data(3, (21,), integer_high=3)
    results, _ = _train(False, f"{args.init}.npz", x, y, x_test, y_test)
    compiled, frames = _train(True, f"{args.init}.npz", x, y, x_test, y_test)
    results.update(compiled)
    results["frames_after_step"] = np.asarray(frames)
    results["recompile_limit_hits"] = np.asarray(hits.functions, dtype=str)
    common.save_results(**results)


if __name__ == "__main__":
    main()
