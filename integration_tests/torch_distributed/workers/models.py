"""Small models used by the workers, and the layouts that shard them."""

import keras
from keras import layers

VOCAB, SEQ, DIM, HEADS = 32, 6, 8, 2


def transformer_classifier():
    """Embedding, attention, norm, MLP, EinsumDense, Conv1D and a head."""
    tokens = keras.Input((SEQ,), dtype="int32")
    x = layers.Embedding(VOCAB, DIM, name="embed")(tokens)
    attention = layers.MultiHeadAttention(HEADS, DIM // HEADS, name="mha")
    x = layers.LayerNormalization(name="norm1")(x + attention(x, x))
    h = layers.Dense(4 * DIM, activation="gelu", name="up")(x)
    h = layers.Dense(DIM, name="down")(h)
    x = layers.LayerNormalization(name="norm2")(x + h)
    x = layers.EinsumDense("bsd,de->bse", (SEQ, DIM), name="mix")(x)
    x = layers.Conv1D(DIM, 3, padding="same", name="conv")(x)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = layers.Dense(3, name="head")(x)
    return keras.Model(tokens, outputs)


def transformer_layout_map(device_mesh, model_axis="model"):
    """Megatron-style layouts for `transformer_classifier`."""
    m = model_axis
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["embed/embeddings"] = (None, m)
    layout_map["mha/(query|key|value)/kernel"] = (None, m, None)
    layout_map["mha/(query|key|value)/bias"] = (m, None)
    layout_map["mha/attention_output/kernel"] = (m, None, None)
    layout_map["up/kernel"] = (None, m)
    layout_map["up/bias"] = (m,)
    layout_map["down/kernel"] = (m, None)
    layout_map["mix/kernel"] = (None, m)
    return layout_map


def mlp(width=16):
    inputs = keras.Input((8,))
    x = layers.Dense(width, activation="relu", name="hidden")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    outputs = layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs)


def mlp_layout_map(device_mesh, model_axis="model"):
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["hidden/kernel"] = (None, model_axis)
    layout_map["hidden/bias"] = (model_axis,)
    layout_map["out/kernel"] = (model_axis, None)
    return layout_map


def mlp_normalized_inputs(width=16):
    """`mlp`'s layers, with BatchNormalization first.

    In `mlp`, a hidden unit whose ReLU is active on every row of a batch
    passes a shift of its bias on to the normalization, which cancels it:
    its bias gets a gradient of exactly zero, rounding noise that Adam
    turns into steps of the learning rate. Here no bias is followed by a
    normalization.
    """
    inputs = keras.Input((8,))
    x = layers.BatchNormalization(name="bn")(inputs)
    x = layers.Dense(width, activation="relu", name="hidden")(x)
    outputs = layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs)


def mlp_fsdp_layout_map(device_mesh, data_axis="batch", model_axis="model"):
    """Every variable of `mlp` or `mlp_normalized_inputs` split on dimension
    0 over the data axis, as FSDP / ZeRO-3 does; kernels also over
    `model_axis` if the mesh has it."""
    d = data_axis
    m = model_axis if model_axis in device_mesh.axis_names else None
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["(hidden|out)/kernel"] = (d, m)
    layout_map["(hidden|out)/bias"] = (d,)
    layout_map["bn/(gamma|beta|moving_mean|moving_variance)"] = (d,)
    return layout_map


def mlp_shared_layer():
    """Layer norms around a `Dense` called twice (`shared`): small layers,
    which FSDP-style layouts gather as one unit."""
    inputs = keras.Input((8,))
    x = layers.LayerNormalization(name="norm1")(inputs)
    x = layers.Dense(8, activation="tanh", name="hidden")(x)
    shared = layers.Dense(8, activation="tanh", name="shared")
    x = shared(x)
    x = layers.LayerNormalization(name="norm2")(x)
    x = shared(x)
    x = layers.LayerNormalization(name="norm3")(x)
    outputs = layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs)


def mlp_shared_layer_fsdp_layout_map(device_mesh, data_axis="batch"):
    """Every variable of `mlp_shared_layer` split on dimension 0 over the
    data axis."""
    d = data_axis
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[".*/kernel"] = (d, None)
    layout_map[".*/(bias|gamma|beta)"] = (d,)
    return layout_map


def transformer_fsdp_layout_map(device_mesh, data_axis="batch"):
    """`transformer_classifier`'s variables split over the data axis (FSDP),
    each on its first dimension that 2 divides (`head/bias` has 3 rows)."""
    d = data_axis
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["embed/embeddings"] = (d, None)
    layout_map["mha/.*/kernel"] = (d, None, None)
    layout_map["mha/(query|key|value)/bias"] = (d, None)
    layout_map["mha/attention_output/bias"] = (d,)
    layout_map["(up|down|mix|head)/kernel"] = (d, None)
    layout_map["(up|down)/bias"] = (d,)
    layout_map["conv/kernel"] = (None, d, None)
    layout_map["conv/bias"] = (d,)
    layout_map["norm[12]/(gamma|beta)"] = (d,)
    return layout_map


def conv_classifier():
    """Two Conv2D layers, each followed by BatchNormalization, and a head.

    A ReLU sits between conv1 and bn1, and between bn1 and conv2: otherwise
    a batch normalization would cancel any shift of its input, and conv1's
    bias and bn1's beta would get gradients of exactly zero (rounding noise,
    which optimizers amplify). conv2 has no bias for the same reason.
    """
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = layers.Activation("relu")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(4, 3, use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inputs, outputs)


def conv_layout_map(device_mesh, model_axis="model"):
    """conv1's output channels (and bn1's) sharded over `model_axis`;
    conv2's input channels sharded; bn2 and the head replicated."""
    m = model_axis
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["conv1/kernel"] = (None, None, None, m)
    layout_map["conv1/bias"] = (m,)
    layout_map["bn1/(gamma|beta|moving_mean|moving_variance)"] = (m,)
    layout_map["conv2/kernel"] = (None, None, m, None)
    return layout_map
