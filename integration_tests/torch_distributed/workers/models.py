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
