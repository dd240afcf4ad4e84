"""ModelParallel beyond float32 dense layers, against one process.

Each scenario builds a model under its own dtype policy and layouts, then
records under its own key prefix:

- `initial:` every variable as loaded (the reference's initial weights);
- `grad:` the gradient of every trainable variable after one forward and
  backward pass on 7 rows (uneven over 2 batch shards), reduced once as the
  optimizer gets it; `grad_loss`, that pass's loss; `local_shape:` the shard
  of every variable this rank holds;
- `history:`, `evaluate`, `predict` and `weight:` (every variable, moving
  statistics included) after `fit` on 27 or 29 samples in batches of 8, so
  the last batch does not divide by the number of batch shards;
- `opt:` every optimizer variable (step counters, loss scale, moments).

Scenarios (`--scenarios`, comma separated), with their mesh under torchrun
on 2 ranks / on 4 ranks:

- `bfloat16`: the transformer under `mixed_bfloat16`; (1, 2) / (2, 2).
  `bfloat16_in_float32`, in the reference only, runs it in float32.
- `float16`: an MLP under `mixed_float16`, where `compile` wraps the
  optimizer in a `LossScaleOptimizer`; its first step of every epoch
  overflows; (1, 2) / (2, 2).
- `conv`: Conv2D and BatchNormalization with channels sharded on "model",
  and count metrics; (1, 2) / (2, 2).
- `fsdp`: every variable of an MLP sharded on dimension 0 over the batch
  axis, which also shards the data (FSDP / ZeRO-3, Adam's moments sharded
  alike); (2,) / (2, 2), where the kernels are also sharded over "model".
  After `fit`, when each layer gathers its variables (NOTE [layer gathers]),
  `after_fit:` gradients of 7 rows from `loss.backward()` run twice (they
  accumulate) and from `torch.autograd.grad` (returned, never
  accumulated into `.grad`).
- `fsdp_transformer`: the transformer sharded the same way; (2,) only.
- `fsdp_shared`: small layers sharded the same way, one `Dense` called
  twice: one unit (NOTE [small layers joined]), gathered again for the
  shared layer's second call, with Adam; (2,) only.
"""

import common
import models
import numpy as np

import keras

BATCH = 8
SEED = 7


def _mesh_2d():
    """The (1, 2) mesh on 2 ranks, (2, 2) on 4 ranks."""
    n = common.WORLD_SIZE
    shape = (1, n) if n == 2 else (2, n // 2)
    return keras.distribution.DeviceMesh(shape, ["batch", "model"])


def _fsdp_mesh():
    """A ("batch",) mesh on 2 ranks, (2, 2) on 4 ranks."""
    n = common.WORLD_SIZE
    if n == 2:
        return keras.distribution.DeviceMesh((2,), ["batch"])
    return keras.distribution.DeviceMesh((2, n // 2), ["batch", "model"])


def _distribute(layout_map_fn, mesh_fn):
    """Set ModelParallel with `layout_map_fn(mesh_fn())` when distributed."""
    if common.is_distributed():
        layout_map = layout_map_fn(mesh_fn())
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )


def _sgd():
    """The optimizer of the mixed precision scenarios.

    SGD, not Adam: Adam divides each gradient by its own magnitude, so where
    a gradient is smaller than the rounding noise of a 16-bit float (2**-8
    of the values it is computed from in bfloat16, 2**-11 in float16), its
    steps follow the noise by the full learning rate, in either run. SGD's
    steps are proportional to the gradients: their rounding stays rounding.
    """
    return keras.optimizers.SGD(0.1, name="sgd")


def _adam():
    """Adam, whose moments are sharded like their variables."""
    return keras.optimizers.Adam(0.01, name="adam")


def _momentum():
    return keras.optimizers.SGD(0.05, momentum=0.9, name="sgd")


def gradients(model, loss_fn, x, y):
    """Gradients of one pass, reduced as the optimizer gets them, and the
    shard of every variable this rank holds."""
    results = common.one_pass_gradients(model, loss_fn, x, y)
    for variable in model.weights:
        value = variable.value
        local = value.to_local() if hasattr(value, "to_local") else value
        results[f"local_shape:{variable.path}"] = tuple(local.shape)
    return results


def train(model, x, y, epochs=2):
    """fit / evaluate / predict; the recorded results."""
    history = model.fit(
        x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False
    ).history
    evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    predictions = model.predict(x, batch_size=BATCH, verbose=0)
    results = {f"history:{k}": v for k, v in history.items()}
    results.update(evaluate=evaluation, predict=predictions)
    results.update(common.weights_dict(model))
    for variable in model.optimizer.variables:
        results[f"opt:{variable.path}"] = keras.ops.convert_to_numpy(variable)
    # Gradient hooks on the variables themselves (a leak would add one per
    # step): none, in any run.
    results["variable_hooks"] = sum(
        len(variable.value._backward_hooks or {}) for variable in model.weights
    )
    return results


def gradients_after_fit(model, loss_fn, x, y):
    """Gradients once the trainer has installed the layer gathers: two
    `loss.backward()` calls accumulated, and `torch.autograd.grad`."""
    import torch

    from keras.src.backend.torch import distributed_gradients

    variables = model.trainable_variables
    results = {}

    def loss_of_pass():
        outputs = model(common.shard_global_batch(x), training=True)
        return loss_fn(common.shard_global_batch(y), outputs)

    model.zero_grad()
    for _ in range(2):
        loss_of_pass().backward()
    twice = [v.value.grad for v in variables]
    model.zero_grad()
    returned = torch.autograd.grad(loss_of_pass(), [v.value for v in variables])
    leaked = [v.path for v in variables if v.value.grad is not None]
    if leaked:
        raise AssertionError(f"torch.autograd.grad set .grad of {leaked}")
    for name, grads in (("twice", twice), ("returned", returned)):
        grads = distributed_gradients.reduce_gradients(list(grads))
        for variable, grad in zip(variables, grads):
            if grad is None:
                raise AssertionError(f"No {name} gradient for {variable.path}")
            key = f"after_fit:{name}:{variable.path}"
            results[key] = keras.ops.convert_to_numpy(grad)
    return results


def _build(model_fn, init, load=False):
    """The model with the reference's initial weights.

    The reference draws them (seeded, so the same ones from run to run)
    and saves them to `init`; the distributed run, or a reference scenario
    with `load=True`, loads them from there.
    """
    keras.utils.set_random_seed(SEED)
    model = model_fn()
    if load:
        with np.load(init) as data:
            model.set_weights([data[f"w{i}"] for i in range(len(data))])
    else:
        common.share_initial_weights(model, init)
    return model, common.weights_dict(model, prefix="initial")


def _tokens():
    (x,) = common.data(0, (27, models.SEQ), integer_high=models.VOCAB)
    (y,) = common.data(1, (27,), integer_high=3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return x, y, loss


def _transformer_sgd(init, policy, load=False):
    _distribute(models.transformer_layout_map, _mesh_2d)
    keras.config.set_dtype_policy(policy)
    model, results = _build(models.transformer_classifier, init, load)
    x, y, loss = _tokens()
    results.update(gradients(model, loss, x[:7], y[:7]))
    # No accuracy: bfloat16 rounding moves logits by a few 2**-8, enough to
    # flip the argmax of a sample whose two largest logits nearly tie.
    model.compile(_sgd(), loss)
    results.update(train(model, x, y))
    return results


def bfloat16(init):
    return _transformer_sgd(init, "mixed_bfloat16")


def bfloat16_in_float32(init):
    """`bfloat16` in float32, from its initial weights: in the reference,
    how far bfloat16 itself is from float32 (the test's tolerance)."""
    if common.is_distributed():
        raise ValueError(
            "bfloat16_in_float32 is a reference scenario: run it without "
            "torchrun, after `bfloat16`."
        )
    return _transformer_sgd(
        init.replace("bfloat16_in_float32", "bfloat16"), "float32", load=True
    )


def float16(init):
    _distribute(models.mlp_layout_map, _mesh_2d)
    keras.config.set_dtype_policy("mixed_float16")
    # Not `mlp`: there a hidden unit active on almost no row of a batch of 3
    # is normalized by a tiny variance, and its updates depend on rounding.
    model, results = _build(models.mlp_normalized_inputs, init)
    x, y = common.data(2, (27, 8), (27, 4))
    loss = keras.losses.MeanSquaredError()
    results.update(gradients(model, loss, x[:7], y[:7]))
    # The first batch's targets are so large that the gradient of its loss
    # overflows float16 as soon as it is scaled by 2**5 or more: elementwise,
    # before any sum, so in every run whatever the sharding. The float16
    # values in the other batches' backward stay below 3 unscaled
    # (measured), 192 at the largest scale used, 2**6: far from float16's
    # largest value, 65504, however they are summed. So every epoch skips
    # its first step and halves the scale, then doubles it again after 2
    # finite steps. (Near that largest value, whether a step overflows
    # depends on rounding and on partial sums, which differ between runs.)
    # No metric: one on such targets would overflow float16 itself.
    y[:BATCH] *= 1e5
    model.compile(_sgd(), loss)
    optimizer = model.optimizer
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise AssertionError(f"compile did not wrap {optimizer}")
    optimizer.initial_scale = 2.0**6
    optimizer.dynamic_growth_steps = 2
    results.update(train(model, x, y, epochs=3))
    return results


def conv(init):
    _distribute(models.conv_layout_map, _mesh_2d)
    model, results = _build(models.conv_classifier, init)
    x, noise = common.data(3, (29, 6, 6, 3), (29,))
    y = (x[:, :3, :3, 0].mean(axis=(1, 2)) + 0.3 * noise > 0).astype("float32")
    loss = keras.losses.BinaryCrossentropy()
    results.update(gradients(model, loss, x[:7], y[:7]))
    metrics = [
        "accuracy",
        keras.metrics.TruePositives(name="tp"),
        keras.metrics.FalseNegatives(name="fn"),
    ]
    model.compile(_momentum(), loss, metrics=metrics)
    results.update(train(model, x, y))
    return results


def _mlp_with_adam(model, results, seed, metrics=()):
    """One pass's gradients on 7 rows, then `train` with Adam on an MSE
    loss; returns the data and the loss."""
    x, y = common.data(seed, (29, 8), (29, 4))
    loss = keras.losses.MeanSquaredError()
    results.update(gradients(model, loss, x[:7], y[:7]))
    model.compile(_adam(), loss, metrics=list(metrics))
    results.update(train(model, x, y))
    return x, y, loss


def fsdp(init):
    _distribute(models.mlp_fsdp_layout_map, _fsdp_mesh)
    model, results = _build(models.mlp_normalized_inputs, init)
    x, y, loss = _mlp_with_adam(model, results, 4, metrics=["mae"])
    results.update(gradients_after_fit(model, loss, x[:7], y[:7]))
    return results


def fsdp_transformer(init):
    _distribute(models.transformer_fsdp_layout_map, _fsdp_mesh)
    model, results = _build(models.transformer_classifier, init)
    x, y, loss = _tokens()
    results.update(gradients(model, loss, x[:7], y[:7]))
    # SGD: the key bias's gradient is rounding noise around zero (see
    # test_training), which Adam would turn into steps of the learning rate.
    model.compile(_sgd(), loss)
    results.update(train(model, x, y))
    return results


def fsdp_shared(init):
    _distribute(models.mlp_shared_layer_fsdp_layout_map, _fsdp_mesh)
    model, results = _build(models.mlp_shared_layer, init)
    _mlp_with_adam(model, results, 5)
    return results


SCENARIOS = {
    f.__name__: f
    for f in (
        bfloat16,
        bfloat16_in_float32,
        float16,
        conv,
        fsdp,
        fsdp_transformer,
        fsdp_shared,
    )
}


def main():
    args = common.parse_args({"--scenarios": {"required": True}})
    results = {}
    for name in args.scenarios.split(","):
        try:
            scenario_results = SCENARIOS[name](f"{args.init}-{name}.npz")
        finally:
            keras.config.set_dtype_policy("float32")
        for key, value in scenario_results.items():
            value = np.asarray(value)
            if value.dtype.kind in "fV":
                # float16 and bfloat16 (an ml_dtypes type, which `np.load`
                # cannot read back) are saved as the float32 they convert to.
                value = value.astype("float32")
            results[f"{name}/{key}"] = value
    common.save_results(**results)


if __name__ == "__main__":
    main()
