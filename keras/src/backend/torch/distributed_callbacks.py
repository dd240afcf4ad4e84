"""Callbacks under a multi-process distribution: one writer, all in step.

Every rank runs every callback, since saving a model reads distributed
variables, which takes collectives all ranks must join. Only process 0
writes to the paths the user gave: on the other ranks, the callbacks that
write files (`ModelCheckpoint`, `CSVLogger`, `TensorBoard`) write into a
scratch folder of their own, removed at exit. Progress bars print on
process 0 only (see the callback list patch).
"""

import atexit
import os
import shutil
import tempfile

# Callback class name -> the attribute holding the path it writes to.
_OUTPUT_ATTRIBUTES = {
    "ModelCheckpoint": "filepath",
    "CSVLogger": "filename",
    "TensorBoard": "log_dir",
}
_scratch = []


def _scratch_dir():
    if not _scratch:
        from keras.src.backend.torch import distribution_lib

        path = tempfile.mkdtemp(
            prefix=f"keras-rank{distribution_lib.process_id()}-"
        )
        _scratch.append(path)
        atexit.register(shutil.rmtree, path, True)
    return _scratch[0]


def _output_attribute(callback):
    for cls in type(callback).__mro__:
        if cls.__name__ in _OUTPUT_ATTRIBUTES:
            return _OUTPUT_ATTRIBUTES[cls.__name__]
    return None


def redirect_file_outputs(callbacks):
    """Point the file outputs of `callbacks` at this rank's scratch folder.

    Args:
        callbacks: The callbacks of a non-chief process.
    """
    for callback in callbacks:
        attribute = _output_attribute(callback)
        if attribute is None or getattr(callback, "_redirected", False):
            continue
        path = str(getattr(callback, attribute)).rstrip(os.sep)
        name = os.path.basename(path) or "output"
        setattr(callback, attribute, os.path.join(_scratch_dir(), name))
        callback._redirected = True
