"""The table of Keras layers the parity sweep runs (`layer_sweep.py`).

Each `Case` builds a small functional model around one layer and says what
its inputs are and how `ModelParallel` shards its variables. The sweep runs
every case the same way, so adding a layer is adding a row here.

Inputs are described by `Spec`s: float features, integer ids, or padded
token ids (the last positions of each row are 0, for `mask_zero`). Layouts
are `{variable path regex: layout}` over a "model" mesh axis; every
dimension they shard has an even size, so a (1, 2) and a (2, 2) mesh split
it evenly.
"""

import dataclasses
from typing import Callable

import keras
from keras import layers

M = "model"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model input: `shape` without the batch dimension.

    `kind` is "float", "int" (ids below `high`) or "tokens" (ids below
    `high`, each row padded with 0 after a random length of at least 2).
    """

    shape: tuple
    kind: str = "float"
    high: int = 0


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the sweep.

    Attributes:
        name: Unique name, used in result keys and the report.
        family: Group in the report (core, convolution, ...).
        make: Function of the model's `keras.Input`s returning its output.
        inputs: One `Spec` per model input.
        layouts: `{variable path regex: layout}` for `ModelParallel`.
        fit: Whether the case also takes one optimizer step with `fit`
            (every case with trainable variables does).
        grid: Whether the case also runs on a (2, 2) mesh.
    """

    name: str
    family: str
    make: Callable
    inputs: tuple
    layouts: dict = dataclasses.field(default_factory=dict)
    fit: bool = True
    grid: bool = False


def _dense_head(h):
    return layers.Dense(4, name="head")(layers.Flatten()(h))


def _kernel_out(dims, name):
    """Shard a kernel of `dims` dimensions on its last (output) one."""
    return {f"{name}/kernel": (None,) * (dims - 1) + (M,), f"{name}/bias": (M,)}


F1, F2, F3 = Spec((8, 4)), Spec((6, 6, 4)), Spec((4, 4, 4, 2))
TOKENS = Spec((8,), "tokens", 20)


def _layer(name, family, layer, spec, layouts=None, head=True, **kwargs):
    """A case that applies `layer` to one input, then a dense head."""

    def make(x):
        h = layer()(x)
        return _dense_head(h) if head else h

    return Case(name, family, make, (spec,), layouts or {}, **kwargs)


def _conv(name, cls, spec, dims, **kwargs):
    return _layer(
        name,
        "convolution",
        lambda: cls(4, 3, padding="same", name="conv", **kwargs),
        spec,
        _kernel_out(dims, "conv"),
    )


def _transposed(name, cls, spec, dims):
    # A transposed kernel is (*window, filters, channels): shard filters.
    layout = (None,) * (dims - 2) + (M, None)
    return _layer(
        name,
        "convolution",
        lambda: cls(4, 3, strides=2, padding="same", name="conv"),
        spec,
        {"conv/kernel": layout, "conv/bias": (M,)},
        grid=dims == 4,
    )


def _depthwise(name, cls, spec, dims):
    # (*window, channels, multiplier): shard the channels.
    layout = (None,) * (dims - 2) + (M, None)
    return _layer(
        name,
        "convolution",
        lambda: cls(3, depth_multiplier=2, padding="same", name="conv"),
        spec,
        {"conv/kernel": layout, "conv/bias": (M,)},
    )


def _separable(name, cls, spec, dims):
    return _layer(
        name,
        "convolution",
        lambda: cls(4, 3, depth_multiplier=2, padding="same", name="conv"),
        spec,
        {
            "conv/depthwise_kernel": (None,) * (dims - 2) + (M, None),
            "conv/pointwise_kernel": (None,) * (dims - 1) + (M,),
            "conv/bias": (M,),
        },
        grid=dims == 4,
    )


def _pool(name, cls, spec, **kwargs):
    return _layer(name, "pooling", lambda: cls(**kwargs), spec)


def _norm(name, layer, spec, layouts, **kwargs):
    return _layer(name, "normalization", layer, spec, layouts, **kwargs)


def _reshape(name, layer, spec):
    return _layer(name, "reshaping", layer, spec)


def _activation(name, layer, layouts=None):
    return _layer(name, "activation", layer, F1, layouts)


def _noise(name, layer, spec=F1):
    return _layer(name, "noise and dropout", layer, spec)


def _merge(name, layer, shapes=((8, 4), (8, 4))):
    def make(a, b):
        return _dense_head(layer()([a, b]))

    specs = tuple(Spec(s) for s in shapes)
    return Case(name, "merging", make, specs)


def _recurrent(name, layer, layouts, masked=True, grid=False):
    """A recurrent layer on embedded tokens, padded when `masked`."""

    def make(ids):
        h = layers.Embedding(20, 4, mask_zero=masked, name="emb")(ids)
        return layers.Dense(4, name="head")(layer()(h))

    return Case(name, "recurrent", make, (TOKENS,), layouts, grid=grid)


def _rnn_layouts(name):
    """Input and recurrent kernels and biases sharded over their gates
    (units times gates is even for every cell here)."""
    return {f"{name}/.*kernel": (None, M), f"{name}/.*bias": (M,)}


def _attention(name, make, inputs, layouts=None, grid=False):
    return Case(name, "attention", make, inputs, layouts or {}, grid=grid)


def _masked_mha(ids):
    h = layers.Embedding(20, 8, mask_zero=True, name="emb")(ids)
    h = layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    return layers.Dense(4, name="head")(layers.GlobalAveragePooling1D()(h))


def _causal_gqa(ids):
    h = layers.Embedding(20, 8, mask_zero=True, name="emb")(ids)
    h = layers.GroupQueryAttention(4, 4, 2, name="gqa")(
        h, h, use_causal_mask=True
    )
    return layers.Dense(4, name="head")(layers.GlobalAveragePooling1D()(h))


def _dot_attention(cls, call_kwargs=None, **kwargs):
    def make(ids):
        q = layers.Embedding(20, 8, mask_zero=True, name="emb")(ids)
        v = layers.Dense(8, name="proj")(q)
        h = cls(name="attention", **kwargs)([q, v], **(call_kwargs or {}))
        return layers.Dense(4, name="head")(layers.GlobalAveragePooling1D()(h))

    return make


def _masking(x):
    h = layers.Masking(mask_value=0.0)(x)
    h = layers.LSTM(6, name="lstm")(h)
    return layers.Dense(4, name="head")(h)


def _embedding_pool(ids):
    h = layers.Embedding(20, 8, mask_zero=True, name="emb")(ids)
    return layers.Dense(4, name="head")(layers.GlobalAveragePooling1D()(h))


def _time_distributed(x):
    h = layers.TimeDistributed(layers.Dense(6, name="inner"), name="td")(x)
    return _dense_head(h)


def _spectral(x):
    dense = layers.Dense(6, name="dense")
    return layers.Dense(4, name="head")(
        layers.SpectralNormalization(dense, name="sn")(layers.Flatten()(x))
    )


def _normalization_adapted(x):
    norm = layers.Normalization(axis=-1, name="norm")
    norm.adapt(keras.random.normal((32, 8, 4), seed=3) * 3.0 + 1.0)
    return _dense_head(norm(x))


def _lookup(layer_fn, high):
    def make(ids):
        h = layer_fn()(ids)
        h = layers.Embedding(high + 2, 4, name="emb")(h)
        return _dense_head(h)

    return make


def _category_encoding(ids):
    h = layers.CategoryEncoding(8, output_mode="count")(ids)
    return layers.Dense(4, name="head")(h)


def _discretization(x):
    h = layers.Discretization(bin_boundaries=[-1.0, 0.0, 1.0])(x)
    h = layers.Embedding(4, 4, name="emb")(h)
    return _dense_head(h)


def _conv_lstm(x):
    h = layers.ConvLSTM2D(4, 3, padding="same", name="convlstm")(x)
    return _dense_head(h)


def _conv_lstm1d(x):
    h = layers.ConvLSTM1D(4, 3, padding="same", name="convlstm")(x)
    return _dense_head(h)


def _torch_module(x):
    import torch

    linear = torch.nn.Linear(4, 6)
    h = layers.TorchModuleWrapper(
        linear, output_shape=(None, 8, 6), name="wrapped"
    )(x)
    return _dense_head(h)


CASES = [
    # Core.
    _layer(
        "Dense",
        "core",
        lambda: layers.Dense(6, name="dense"),
        F1,
        _kernel_out(2, "dense"),
        grid=True,
    ),
    _layer(
        "EinsumDense",
        "core",
        lambda: layers.EinsumDense(
            "btc,cd->btd", (8, 6), bias_axes="d", name="einsum"
        ),
        F1,
        {"einsum/kernel": (None, M), "einsum/bias": (M,)},
    ),
    Case(
        "Embedding(mask_zero)",
        "core",
        _embedding_pool,
        (TOKENS,),
        {"emb/embeddings": (None, M)},
        grid=True,
    ),
    _layer("Identity", "core", lambda: layers.Identity(), F1),
    _layer(
        "Lambda", "core", lambda: layers.Lambda(lambda t: t * 2.0 + 1.0), F1
    ),
    Case("Masking", "core", _masking, (F1,), _rnn_layouts("lstm")),
    # Convolution.
    _conv("Conv1D", layers.Conv1D, F1, 3),
    _conv("Conv2D", layers.Conv2D, F2, 4),
    _conv("Conv3D", layers.Conv3D, F3, 5),
    _layer(
        "Conv1D(causal,dilated)",
        "convolution",
        lambda: layers.Conv1D(
            4, 3, padding="causal", dilation_rate=2, name="conv"
        ),
        F1,
        _kernel_out(3, "conv"),
    ),
    _layer(
        "Conv2D(strided,grouped)",
        "convolution",
        lambda: layers.Conv2D(4, 3, strides=2, groups=2, name="conv"),
        F2,
        _kernel_out(4, "conv"),
        grid=True,
    ),
    _transposed("Conv1DTranspose", layers.Conv1DTranspose, F1, 3),
    _transposed("Conv2DTranspose", layers.Conv2DTranspose, F2, 4),
    _transposed("Conv3DTranspose", layers.Conv3DTranspose, F3, 5),
    _depthwise("DepthwiseConv1D", layers.DepthwiseConv1D, F1, 3),
    _depthwise("DepthwiseConv2D", layers.DepthwiseConv2D, F2, 4),
    _separable("SeparableConv1D", layers.SeparableConv1D, F1, 3),
    _separable("SeparableConv2D", layers.SeparableConv2D, F2, 4),
    # Pooling.
    _pool("MaxPooling1D", layers.MaxPooling1D, F1, pool_size=2),
    _pool("MaxPooling2D", layers.MaxPooling2D, F2, pool_size=2),
    _pool("MaxPooling3D", layers.MaxPooling3D, F3, pool_size=2),
    _pool(
        "AveragePooling1D",
        layers.AveragePooling1D,
        F1,
        pool_size=3,
        strides=2,
        padding="same",
    ),
    _pool("AveragePooling2D", layers.AveragePooling2D, F2, pool_size=2),
    _pool("AveragePooling3D", layers.AveragePooling3D, F3, pool_size=2),
    _pool("GlobalMaxPooling1D", layers.GlobalMaxPooling1D, F1),
    _pool("GlobalMaxPooling2D", layers.GlobalMaxPooling2D, F2),
    _pool("GlobalMaxPooling3D", layers.GlobalMaxPooling3D, F3),
    _pool("GlobalAveragePooling1D", layers.GlobalAveragePooling1D, F1),
    _pool("GlobalAveragePooling2D", layers.GlobalAveragePooling2D, F2),
    _pool("GlobalAveragePooling3D", layers.GlobalAveragePooling3D, F3),
    _pool(
        "AdaptiveAveragePooling2D",
        layers.AdaptiveAveragePooling2D,
        F2,
        output_size=3,
    ),
    _pool(
        "AdaptiveMaxPooling1D", layers.AdaptiveMaxPooling1D, F1, output_size=3
    ),
    # Normalization.
    _norm(
        "BatchNormalization",
        lambda: layers.BatchNormalization(name="bn"),
        F2,
        {"bn/.*": (M,)},
        grid=True,
    ),
    _norm(
        "LayerNormalization",
        lambda: layers.LayerNormalization(name="ln"),
        F1,
        {"ln/.*": (M,)},
        grid=True,
    ),
    _norm(
        "GroupNormalization",
        lambda: layers.GroupNormalization(2, name="gn"),
        F2,
        {"gn/.*": (M,)},
    ),
    _norm(
        "RMSNormalization",
        lambda: layers.RMSNormalization(name="rms"),
        F1,
        {"rms/scale": (M,)},
    ),
    _norm("UnitNormalization", lambda: layers.UnitNormalization(), F1, {}),
    Case(
        "SpectralNormalization",
        "normalization",
        _spectral,
        (F1,),
        _kernel_out(2, "dense"),
    ),
    # Attention.
    _attention(
        "MultiHeadAttention(mask_zero)",
        _masked_mha,
        (TOKENS,),
        {
            "mha/(query|key|value)/kernel": (None, M, None),
            "mha/attention_output/kernel": (M, None, None),
        },
        grid=True,
    ),
    _attention(
        "GroupQueryAttention(causal)",
        _causal_gqa,
        (TOKENS,),
        {
            "gqa/query/kernel": (None, M, None),
            "gqa/(key|value)/kernel": (None, M, None),
            "gqa/output_dense/kernel": (M, None, None),
        },
        grid=True,
    ),
    _attention(
        "Attention(mask_zero)",
        _dot_attention(layers.Attention, use_scale=True),
        (TOKENS,),
        _kernel_out(2, "proj"),
    ),
    _attention(
        "Attention(causal)",
        _dot_attention(
            layers.Attention,
            {"use_causal_mask": True},
            score_mode="concat",
        ),
        (TOKENS,),
    ),
    _attention(
        "AdditiveAttention(mask_zero)",
        _dot_attention(layers.AdditiveAttention),
        (TOKENS,),
        _kernel_out(2, "proj"),
    ),
    # Recurrent.
    _recurrent(
        "LSTM(mask_zero)",
        lambda: layers.LSTM(6, name="lstm"),
        _rnn_layouts("lstm"),
        grid=True,
    ),
    _recurrent(
        "GRU(mask_zero)",
        lambda: layers.GRU(6, name="gru"),
        _rnn_layouts("gru"),
    ),
    _recurrent(
        "SimpleRNN(mask_zero)",
        lambda: layers.SimpleRNN(6, name="rnn"),
        _rnn_layouts("rnn"),
    ),
    _recurrent(
        "LSTM(return_sequences,no mask)",
        lambda: layers.LSTM(6, return_sequences=True, name="lstm"),
        _rnn_layouts("lstm"),
        masked=False,
    ),
    _recurrent(
        "Bidirectional(GRU,mask_zero)",
        lambda: layers.Bidirectional(layers.GRU(6), name="bidi"),
        _rnn_layouts("bidi"),
    ),
    _recurrent(
        "RNN(StackedRNNCells)",
        lambda: layers.RNN(
            layers.StackedRNNCells(
                [layers.SimpleRNNCell(6), layers.GRUCell(4)]
            ),
            name="stacked",
        ),
        {},
    ),
    Case(
        "ConvLSTM2D",
        "recurrent",
        _conv_lstm,
        (Spec((3, 4, 4, 2)),),
        {
            "convlstm/kernel": (None, None, None, M),
            "convlstm/recurrent_kernel": (None, None, None, M),
        },
    ),
    Case(
        "ConvLSTM1D",
        "recurrent",
        _conv_lstm1d,
        (Spec((3, 6, 2)),),
        {
            "convlstm/kernel": (None, None, M),
            "convlstm/recurrent_kernel": (None, None, M),
        },
    ),
    Case(
        "TimeDistributed(Dense)",
        "recurrent",
        _time_distributed,
        (F1,),
        _kernel_out(2, "inner"),
    ),
    # Reshaping.
    _reshape("Reshape", lambda: layers.Reshape((4, 8)), F1),
    _reshape("Flatten", lambda: layers.Flatten(), F2),
    _reshape("Permute", lambda: layers.Permute((2, 1)), F1),
    _reshape("RepeatVector", lambda: layers.RepeatVector(3), Spec((5,))),
    _reshape("Cropping1D", lambda: layers.Cropping1D((1, 2)), F1),
    _reshape("Cropping2D", lambda: layers.Cropping2D(((1, 0), (0, 2))), F2),
    _reshape("Cropping3D", lambda: layers.Cropping3D(1), F3),
    _reshape("UpSampling1D", lambda: layers.UpSampling1D(2), F1),
    _reshape(
        "UpSampling2D(bilinear)",
        lambda: layers.UpSampling2D(2, interpolation="bilinear"),
        F2,
    ),
    _reshape("UpSampling3D", lambda: layers.UpSampling3D(2), F3),
    _reshape("ZeroPadding1D", lambda: layers.ZeroPadding1D(2), F1),
    _reshape("ZeroPadding2D", lambda: layers.ZeroPadding2D(1), F2),
    _reshape("ZeroPadding3D", lambda: layers.ZeroPadding3D(1), F3),
    # Merging.
    _merge("Add", layers.Add),
    _merge("Subtract", layers.Subtract),
    _merge("Multiply", layers.Multiply),
    _merge("Average", layers.Average),
    _merge("Maximum", layers.Maximum),
    _merge("Minimum", layers.Minimum),
    _merge("Concatenate", lambda: layers.Concatenate(axis=1), ((8, 4), (3, 4))),
    _merge("Dot", lambda: layers.Dot(axes=(2, 2)), ((8, 4), (5, 4))),
    # Activations.
    _activation("ReLU", lambda: layers.ReLU(max_value=1.0)),
    _activation("LeakyReLU", lambda: layers.LeakyReLU(0.2)),
    _activation(
        "PReLU",
        lambda: layers.PReLU(shared_axes=[1], name="prelu"),
        {"prelu/alpha": (None, M)},
    ),
    _activation("ELU", lambda: layers.ELU()),
    _activation("Softmax", lambda: layers.Softmax(axis=1)),
    _activation("Activation(gelu)", lambda: layers.Activation("gelu")),
    # In-model preprocessing.
    Case(
        "Normalization(adapt)", "preprocessing", _normalization_adapted, (F1,)
    ),
    _layer(
        "Rescaling", "preprocessing", lambda: layers.Rescaling(0.5, 1.0), F2
    ),
    _layer("CenterCrop", "preprocessing", lambda: layers.CenterCrop(4, 4), F2),
    _layer("Resizing", "preprocessing", lambda: layers.Resizing(4, 4), F2),
    Case("Discretization", "preprocessing", _discretization, (F1,)),
    Case(
        "CategoryEncoding",
        "preprocessing",
        _category_encoding,
        (Spec((5,), "int", 8),),
    ),
    Case(
        "Hashing",
        "preprocessing",
        _lookup(lambda: layers.Hashing(6), 6),
        (Spec((5,), "int", 50),),
    ),
    Case(
        "IntegerLookup",
        "preprocessing",
        _lookup(lambda: layers.IntegerLookup(vocabulary=[1, 3, 5, 7]), 4),
        (Spec((5,), "int", 9),),
    ),
    _layer(
        "RandomFlip(seed)",
        "preprocessing",
        lambda: layers.RandomFlip(seed=5),
        F2,
    ),
    _layer(
        "RandomTranslation(seed)",
        "preprocessing",
        lambda: layers.RandomTranslation(0.2, 0.2, seed=5),
        F2,
    ),
    _layer(
        "RandomContrast(seed)",
        "preprocessing",
        lambda: layers.RandomContrast(0.5, seed=5),
        F2,
    ),
    _layer(
        "RandomRotation(seed)",
        "preprocessing",
        lambda: layers.RandomRotation(0.2, seed=5),
        F2,
    ),
    _layer(
        "RandomZoom(seed)",
        "preprocessing",
        lambda: layers.RandomZoom(0.3, seed=5),
        F2,
    ),
    _layer(
        "MelSpectrogram",
        "preprocessing",
        lambda: layers.MelSpectrogram(
            fft_length=16,
            sequence_stride=4,
            num_mel_bins=8,
            sampling_rate=800,
        ),
        Spec((32,)),
    ),
    _layer(
        "STFTSpectrogram",
        "preprocessing",
        lambda: layers.STFTSpectrogram(
            frame_length=8, frame_step=4, fft_length=8
        ),
        Spec((32, 1)),
    ),
    Case(
        "TorchModuleWrapper(Linear)",
        "core",
        _torch_module,
        (F1,),
        # The wrapper names the module's parameters `variable`, ...
        {"^variable$": (M, None), "^variable_1$": (M,)},
    ),
    # Noise and dropout, seeded.
    _noise("Dropout(seed)", lambda: layers.Dropout(0.5, seed=1)),
    _noise(
        "SpatialDropout1D(seed)", lambda: layers.SpatialDropout1D(0.5, seed=1)
    ),
    _noise(
        "SpatialDropout2D(seed)",
        lambda: layers.SpatialDropout2D(0.5, seed=1),
        F2,
    ),
    _noise(
        "GaussianDropout(seed)", lambda: layers.GaussianDropout(0.3, seed=1)
    ),
    _noise("GaussianNoise(seed)", lambda: layers.GaussianNoise(0.3, seed=1)),
    _noise("AlphaDropout(seed)", lambda: layers.AlphaDropout(0.3, seed=1)),
    _noise(
        "ActivityRegularization",
        lambda: layers.ActivityRegularization(l1=0.01, l2=0.01),
    ),
]
