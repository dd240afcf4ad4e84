"""Every Keras optimizer trains the same under a distribution.

Trains `models.mlp_normalized_inputs` for 4 steps on 99 rows in batches of
32 (the last batch of 3 rows does not divide by the ranks) with each
optimizer of `OPTIMIZERS`, from the same initial weights, and records the
weights and the optimizer's variables (slots, iterations) after training.
`--strategy` picks the distribution: `data` (`DataParallel`), `fsdp`
(every variable but `out/bias` split over "batch": the update mixes
sharded and replicated variables) or `model` (Megatron-style layouts on a
`(1, N)` mesh).
"""

import common
import models

import keras

# Each built-in optimizer, with the options that change its update.
OPTIMIZERS = {
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "lion": lambda: keras.optimizers.Lion(0.001),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(
        0.01, momentum=0.5, centered=True
    ),
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_nesterov": lambda: keras.optimizers.SGD(
        0.05, momentum=0.9, nesterov=True
    ),
    "sgd_clipnorm": lambda: keras.optimizers.SGD(0.05, global_clipnorm=0.1),
    "adam_accumulate": lambda: keras.optimizers.Adam(
        0.01, gradient_accumulation_steps=2
    ),
    "adam_ema": lambda: keras.optimizers.Adam(0.01, use_ema=True),
    # Not element by element: norms and row means over whole variables.
    "adafactor": lambda: keras.optimizers.Adafactor(0.05),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "ftrl": lambda: keras.optimizers.Ftrl(0.05),
}


def main():
    args = common.parse_args({"--strategy": {"default": "data"}})
    if common.is_distributed():
        distribution = common.strategy_distribution(
            args.strategy, models.mlp_fsdp_layout_map, models.mlp_layout_map
        )
        keras.distribution.set_distribution(distribution)
    (x, y) = common.data(0, (99, 8), (99, 4))
    results = {}
    for index, (name, make) in enumerate(OPTIMIZERS.items()):
        keras.utils.set_random_seed(index)
        model = models.mlp_normalized_inputs()
        common.share_initial_weights(model, f"{args.init}.{name}.npz")
        model.compile(make(), "mse")
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        steps = model.optimizer.iterations
        results[f"iterations:{name}"] = keras.ops.convert_to_numpy(steps)
        results.update(common.weights_dict(model, f"weight:{name}"))
        for variable in model.optimizer.variables:
            key = f"optimizer:{name}:{variable.path}"
            results[key] = keras.ops.convert_to_numpy(variable)
    common.save_results(**results)


if __name__ == "__main__":
    main()
