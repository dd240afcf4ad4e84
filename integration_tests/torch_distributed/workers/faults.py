"""A rank that fails in the middle of DataParallel training.

Every rank trains a small MLP under DataParallel. At step 3 of the first
epoch, rank 1 does what `--fault` says:

- `raise`: raises a `RuntimeError` (an error in user code on one rank);
- `kill`: kills itself with SIGKILL, as the out-of-memory killer does;
- `stall`: sleeps for an hour outside any collective (a rank stuck in its
  input pipeline); the test kills it;
- `none`: nothing. Every step then sleeps a little, so that training lasts
  minutes, and rank 0 writes `$RESULTS_DIR/started` at step 3: the test
  kills a host from outside once it is there.

Just before its fault, rank 1 writes the time (`time.time()`) to
`$RESULTS_DIR/fault`, so that the test measures the time to failure from
the fault, not from the launch. With `FAULTS_DUMP_AFTER` set, every rank
prints the traceback of each of its threads after that many seconds: a
rank that hangs instead of failing shows where it hangs.
"""

import faulthandler
import os
import signal
import time
from pathlib import Path

import common
import numpy as np

import keras

FAULT_STEP = 3
MESSAGE = "rank 1 failed on purpose at step 3"
RESULTS_DIR = Path(os.environ.get("RESULTS_DIR", "."))


def _mark(name):
    (RESULTS_DIR / name).write_text(repr(time.time()))


class Fault(keras.callbacks.Callback):
    """Makes rank 1 fail, once, at the end of step `FAULT_STEP`."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault
        self.done = False

    def on_train_batch_end(self, batch, logs=None):
        if self.fault == "none":
            time.sleep(0.05)
            if batch == FAULT_STEP and common.RANK == 0 and not self.done:
                _mark("started")
        if self.done or batch != FAULT_STEP or common.RANK != 1:
            return
        self.done = True
        if self.fault == "none":
            return
        _mark("fault")
        if self.fault == "raise":
            raise RuntimeError(MESSAGE)
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "stall":
            time.sleep(3600)


def main():
    args = common.parse_args({"--fault": {"required": True}})
    dump_after = os.environ.get("FAULTS_DUMP_AFTER")
    if dump_after:
        faulthandler.dump_traceback_later(float(dump_after), exit=False)
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y = common.data(0, (64, 8), (64, 1))
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    print(f"rank {common.RANK} starts training", flush=True)
    model.fit(
        x, y, batch_size=8, epochs=300, verbose=0, callbacks=[Fault(args.fault)]
    )
    print(f"rank {common.RANK} finished training", flush=True)
    common.save_results(steps=np.asarray(model.optimizer.iterations))


if __name__ == "__main__":
    main()
