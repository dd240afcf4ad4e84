"""Callbacks that write files, under DataParallel: one writer.

Every rank passes the same paths (in the shared results folder), as a user
script does. The worker records the final weights; the test reads the files.
"""

import os

import common
import models

import keras


def main():
    args = common.parse_args()
    if common.is_distributed():
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    output = os.environ["RESULTS_DIR"]
    prefix = "distributed" if common.is_distributed() else "reference"
    # Not `models.mlp`: Adam turns the rounding noise in its hidden bias's
    # gradient (exactly zero where a normalization follows) into steps.
    model = models.mlp_normalized_inputs()
    common.share_initial_weights(model, args.init)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x, y = common.data(0, (64, 8), (64, 4))
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(output, f"{prefix}.csv")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(output, f"{prefix}.weights.h5"),
            save_weights_only=True,
        ),
    ]
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    common.save_results(**common.weights_dict(model))


if __name__ == "__main__":
    main()
