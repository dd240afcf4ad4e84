"""Each rank seeded differently, and the data shuffled.

`--case shuffle`: `fit(shuffle=True)` on arrays, then on a
`DataLoader(shuffle=True)`. Each epoch's order comes from a seed rank 0
draws (NOTE [same batches] in `distributed_data`): every rank trains on the
same batches, in the order one process seeded like rank 0 uses.
`--case batch`: `shuffle="batch"` reorders the rows of each batch with each
rank's own generator: `ValueError` on every rank.
"""

import common
import models
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

import keras


def main():
    args = common.parse_args({"--case": {"default": "shuffle"}})
    # Rank 0's seed is the single process's.
    keras.utils.set_random_seed(100 + common.RANK)
    common.set_distribution(keras.distribution.DataParallel())
    x, y = common.data(0, (64, 8), (64, 4))
    model = models.mlp()
    if args.init:
        common.share_initial_weights(model, args.init)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    if args.case == "batch":
        model.fit(x, y, batch_size=16, epochs=1, shuffle="batch", verbose=0)
        return
    arrays = model.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)
    rows = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    loader = DataLoader(rows, batch_size=16, shuffle=True)
    loaded = model.fit(loader, epochs=2, verbose=0)
    common.save_results(
        **{
            "history:arrays": np.array(arrays.history["loss"]),
            "history:loader": np.array(loaded.history["loss"]),
        },
        **common.weights_dict(model),
    )


if __name__ == "__main__":
    main()
