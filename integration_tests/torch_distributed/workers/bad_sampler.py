"""A DataLoader sampled for the wrong number of ranks: a clear error."""

import common
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import DistributedSampler
from torch.utils.data import TensorDataset

import keras


def main():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    rows = TensorDataset(torch.ones(12, 4), torch.ones(12, 2))
    wrong = common.WORLD_SIZE + 1
    sampler = DistributedSampler(rows, wrong, common.RANK, shuffle=False)
    model.fit(DataLoader(rows, 2, sampler=sampler), epochs=1, verbose=0)
    np.zeros(1)


if __name__ == "__main__":
    main()
