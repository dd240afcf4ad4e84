"""fit / evaluate / predict, an eager call and a custom loop, distributed.

`--strategy data` trains the MLP (with BatchNormalization) on 99 samples in
batches of 16, so the last batch does not divide by the number of ranks.
`--strategy model` trains the transformer with Megatron-style layouts on the
mesh given by `--mesh`, after recording the gradients of one pass on 8
rows (every trainable variable's, as the optimizer gets them).
"""

import common
import models
import numpy as np

import keras


def _model_and_data(strategy):
    if strategy == "data":
        x, y = common.data(0, (99, 8), (99, 4))
        return models.mlp(), keras.losses.MeanSquaredError(), ["mae"], x, y
    (x,) = common.data(0, (36, models.SEQ), integer_high=models.VOCAB)
    (y,) = common.data(1, (36,), integer_high=3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return models.transformer_classifier(), loss, ["accuracy"], x, y


def custom_loop(model, loss_fn, x, y):
    """An eager call, then a loop written with keras.ops and apply()."""
    eager = keras.ops.convert_to_numpy(model(common.shard_global_batch(x)))
    optimizer = keras.optimizers.SGD(0.05)
    losses = []
    for start in range(0, 32, 16):
        rows = slice(start, start + 16)
        batch = common.shard_global_batch(x[rows])
        target = common.shard_global_batch(y[rows])
        loss = loss_fn(target, model(batch, training=True))
        model.zero_grad()
        loss.backward()
        variables = model.trainable_variables
        optimizer.apply([v.value.grad for v in variables], variables)
        losses.append(keras.ops.convert_to_numpy(loss))
    return {"eager": eager, "custom_loss": np.array(losses)}


# NOTE [Adam and rounding]: the initial weights are seeded, so the test is
# the same from run to run. Adam divides each gradient by its own running
# magnitude: where a gradient is near zero (an embedding row of a rare
# token, a bias whose shift a normalization cancels), the rounding that
# differs between one process and a sharded run (partial sums added in
# another order) becomes a step of up to the learning rate. Over 8 unseeded
# initializations of the transformer on (2, 2), the largest difference was
# 1.9e-6 to 1.1e-5 of an array's largest value in 7, and 7.6e-5 (an
# embedding row) in one, while gradients agree within 1e-5 whatever the
# initialization (test_gradient_flow draws its own). With this seed: at
# most 1.4e-6 on (1, 2) and (2, 2).
SEED = 3


def main():
    args = common.parse_args({"--strategy": {"default": "data"}})
    keras.utils.set_random_seed(SEED)
    if common.is_distributed():
        n = common.WORLD_SIZE
        if args.strategy == "data":
            distribution = keras.distribution.DataParallel()
        else:
            shape = common.mesh_shape(args.mesh, (1, n))
            mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"])
            distribution = keras.distribution.ModelParallel(
                layout_map=models.transformer_layout_map(mesh)
            )
        keras.distribution.set_distribution(distribution)
    model, loss, metrics, x, y = _model_and_data(args.strategy)
    common.share_initial_weights(model, args.init)
    gradients = {}
    if args.strategy == "model":
        gradients = common.one_pass_gradients(model, loss, x[:8], y[:8])
    model.compile(keras.optimizers.Adam(0.01), loss, metrics=metrics)
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, shuffle=False
    ).history
    evaluation = model.evaluate(x, y, batch_size=16, verbose=0)
    predictions = model.predict(x, batch_size=16, verbose=0)
    results = {f"history:{k}": v for k, v in history.items()}
    results.update(evaluate=evaluation, predict=predictions)
    results.update(custom_loop(model, loss, x, y))
    results.update(common.weights_dict(model))
    results.update(gradients)
    common.save_results(**results)


if __name__ == "__main__":
    main()
