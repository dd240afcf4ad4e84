"""A keras-hub preset saved in one process, loaded into a sharded model.

The reference (one process) builds a tiny Gemma backbone, saves it with
`save_to_preset` into `--shared`, and records its output on padded
tokens. The distributed run loads that preset with `from_preset` under
ModelParallel with the backbone's own `get_layout_map`: the weights are
read one variable at a time into each rank's shards. It records the
output and each variable's local shard shape.
"""

import os

import common
import keras_hub
import numpy as np

import keras

CONFIG = {
    "vocabulary_size": 64,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "head_dim": 8,
}


def _inputs():
    (tokens,) = common.data(0, (4, 8), integer_high=64)
    lengths = np.array([8, 5, 8, 3])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype("int32")
    return {"token_ids": (tokens * mask).astype("int32"), "padding_mask": mask}


def main():
    args = common.parse_args({"--shared": {"required": True}})
    preset = os.path.join(args.shared, "gemma_preset")
    results = {}
    if common.is_distributed():
        mesh = keras.distribution.DeviceMesh(
            common.mesh_shape(args.mesh, (1, 2)),
            ("batch", "model"),
            keras.distribution.list_devices(),
        )
        layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
        )
        backbone = keras_hub.models.GemmaBackbone.from_preset(preset)
        for variable in backbone.weights:
            value = variable.value
            local = value.to_local() if hasattr(value, "to_local") else value
            results[f"local_shape:{variable.path}"] = np.asarray(
                tuple(local.shape)
            )
            results[f"global_shape:{variable.path}"] = np.asarray(
                tuple(variable.shape)
            )
    else:
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GemmaBackbone(**CONFIG)
        backbone.save_to_preset(preset)
    results["output"] = keras.ops.convert_to_numpy(backbone(_inputs()))
    common.save_results(**results)


if __name__ == "__main__":
    main()
