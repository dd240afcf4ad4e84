"""Resume training from a sharded checkpoint after a crash.

    torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 --max-restarts 1 \
        examples/resume_from_checkpoint.py --dir /tmp/resume-demo --crash

`ShardedCheckpoint` writes each process's shards of the model and of the
optimizer at the end of every epoch (`torch.distributed.checkpoint`);
`resume=True` restores the newest one when `fit` begins. With `--crash`,
process 1 kills itself in epoch 3 of the first attempt, once the
checkpoint of epoch 2 is on disk; torchrun
(`--max-restarts 1`) starts the processes again, and they go on from the
end of epoch 2. Run it without `--crash` (and another `--dir`) to compare:
the final loss is the same.
"""

import argparse
import os
import signal
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch.distributed  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402

EPOCHS = 4


class CrashInEpoch3(keras.callbacks.Callback):
    """Kills process 1 in the middle of epoch 3 of the first attempt.

    It first waits, on every process, for the checkpoint of epoch 2 to be
    complete on disk: `ShardedCheckpoint` writes in the background, and a
    crash before a save is complete resumes from the one before it.
    """

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_train_batch_end(self, batch, logs=None):
        epoch_3 = self.model.optimizer.iterations.numpy() == 2 * 8 + 4
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not (epoch_3 and first_attempt):
            return
        self.checkpoint.wait_until_finished()
        # Process 0 marks the checkpoint complete: wait for it too.
        torch.distributed.barrier()
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="Checkpoint folder.")
    parser.add_argument("--crash", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")
    layout_map["hidden/bias"] = ("model",)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    hidden = layers.Dense(64, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, layers.Dense(1, name="out")(hidden))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x[:, :1] * x[:, 1:2]).astype("float32")
    checkpoint = keras.callbacks.ShardedCheckpoint(
        folder / "checkpoints", resume=True
    )
    callbacks = [checkpoint]
    if args.crash:
        callbacks.append(CrashInEpoch3(checkpoint))
    history = model.fit(
        x, y, batch_size=32, epochs=EPOCHS, shuffle=False, callbacks=callbacks
    )
    rank = os.environ.get("RANK", "0")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    print(
        f"[rank {rank}] attempt {int(restart) + 1}: trained epochs "
        f"{[e + 1 for e in history.epoch]}, final loss "
        f"{history.history['loss'][-1]:.6f}"
    )


if __name__ == "__main__":
    main()
