"""Which processes print: process 0 alone, unless asked for all.

Under a multi-process distribution every process runs the same script, so
every message Keras prints (progress bars, `model.summary()`, callbacks'
messages) would appear once per process. Keras prints them on process 0
only; set `KERAS_DISTRIBUTION_PRINT_ALL_PROCESSES=1` to print on every
process (e.g. to compare their progress). A print function passed
explicitly (`model.summary(print_fn=...)`) is always called: the caller
chose it. Warnings are never muted; on the torch backend they name their
process (`[process 1] ...: UserWarning: ...`).

The check is backend-neutral: it asks the backend's `distribution_lib` for
the process id, which a backend without multi-process support lacks.
"""

import os

from keras.src.backend.common import global_state

ALL_PROCESSES_ENV = "KERAS_DISTRIBUTION_PRINT_ALL_PROCESSES"


def process_id():
    """This process's id in the distribution (0 when there is one)."""
    from keras.src.backend import distribution_lib

    if distribution_lib is None or not hasattr(distribution_lib, "process_id"):
        return 0
    return distribution_lib.process_id()


def prints():
    """Whether this process prints Keras's messages.

    Without a distribution set, every process prints (and the question
    never forms a process group: a script that prints on one process only
    must not start a rendezvous there).
    """
    if os.environ.get(ALL_PROCESSES_ENV, "").lower() in ("1", "true"):
        return True
    if global_state.get_global_attribute("distribution") is None:
        return True
    return process_id() == 0
