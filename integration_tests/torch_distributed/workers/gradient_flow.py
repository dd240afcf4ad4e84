"""Every trainable variable of a sharded model gets the reference gradient.

Run as reference: saves initial weights and per-variable gradients of one
forward/backward pass. Under torchrun: loads the weights into the same model
under ModelParallel (mesh from `--mesh`, default `1,N`), computes the same
gradients (reduced once, as the optimizer receives them) and saves them
gathered, plus the shard shapes each rank holds.
"""

import common
import models
import torch

import keras
from keras.src.backend.torch import distributed_gradients


def main():
    args = common.parse_args()
    if common.is_distributed():
        shape = common.mesh_shape(args.mesh, (1, common.WORLD_SIZE))
        mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"])
        common.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=models.transformer_layout_map(mesh)
            )
        )
    model = models.transformer_classifier()
    common.share_initial_weights(model, args.init)
    (tokens,) = common.data(0, (8, models.SEQ), integer_high=models.VOCAB)
    (labels,) = common.data(1, (8,), integer_high=3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    batch = (tokens, labels)
    if common.is_distributed():
        from keras.src.backend.torch import distributed_data

        batch = distributed_data.shard_batch(batch)
    logits = model(batch[0])
    loss = loss_fn(batch[1], logits)
    loss.backward()
    variables = model.trainable_variables
    grads = distributed_gradients.reduce_gradients(
        [v.value.grad for v in variables]
    )
    results = {"loss": keras.ops.convert_to_numpy(loss)}
    results["logits"] = keras.ops.convert_to_numpy(logits)
    for variable, grad in zip(variables, grads):
        if grad is None:
            raise AssertionError(f"No gradient for {variable.path}")
        results[f"grad:{variable.path}"] = keras.ops.convert_to_numpy(grad)
        value = variable.value
        local = value.to_local() if hasattr(value, "to_local") else value
        results[f"local_shape:{variable.path}"] = tuple(local.shape)
    assert isinstance(loss, torch.Tensor)
    common.save_results(**results)


if __name__ == "__main__":
    main()
