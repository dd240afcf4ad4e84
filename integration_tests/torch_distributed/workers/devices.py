"""Records what device detection reports, in one process or under torchrun."""

import common

import keras
from keras.src.backend.torch import distribution_lib


def main():
    devices = keras.distribution.list_devices()
    common.save_results(
        devices=devices,
        cpu_devices=keras.distribution.list_devices("cpu"),
        count=keras.distribution.get_device_count(),
        num_processes=distribution_lib.num_processes(),
        process_id=distribution_lib.process_id(),
    )


if __name__ == "__main__":
    main()
