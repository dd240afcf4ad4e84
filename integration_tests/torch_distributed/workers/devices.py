"""Records what device detection reports, in one process or under torchrun.

Under torchrun it also records what `shard_batch` converts with
`convert_to_tensor` (where a batch moves to the device, a GPU on CUDA)
when it shards a numpy batch of 7 rows under `DataParallel`: each rank's
own rows, sliced on the host, never the global batch.
"""

import common
import numpy as np

import keras
from keras.src.backend.torch import core
from keras.src.backend.torch import distributed_data
from keras.src.backend.torch import distribution_lib


def rows_moved_to_the_device():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x = np.arange(21, dtype="float32").reshape(7, 3)
    converted = []
    convert_to_tensor = core.convert_to_tensor

    def recording(value, *args, **kwargs):
        converted.append(np.shape(value)[0])
        return convert_to_tensor(value, *args, **kwargs)

    core.convert_to_tensor = recording
    try:
        (batch,) = distributed_data.shard_batch((x,))
    finally:
        core.convert_to_tensor = convert_to_tensor
        keras.distribution.set_distribution(None)
    return {
        "converted_rows": converted,
        "local_rows": batch.to_local().shape[0],
        "global_batch": batch.full_tensor().numpy(),
        "batch": x,
    }


def main():
    devices = keras.distribution.list_devices()
    results = dict(
        devices=devices,
        cpu_devices=keras.distribution.list_devices("cpu"),
        count=keras.distribution.get_device_count(),
        num_processes=distribution_lib.num_processes(),
        process_id=distribution_lib.process_id(),
    )
    if common.is_distributed():
        results.update(rows_moved_to_the_device())
    common.save_results(**results)


if __name__ == "__main__":
    main()
