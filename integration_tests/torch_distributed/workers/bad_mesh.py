"""A script whose mesh does not fit the world: must fail on every rank."""

import common

import keras


def main():
    n = common.WORLD_SIZE
    mesh = keras.distribution.DeviceMesh(
        (n + 1,), ["batch"], [f"cpu:{i}" for i in range(n + 1)]
    )
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    keras.layers.Dense(4).build((None, 3))


if __name__ == "__main__":
    main()
