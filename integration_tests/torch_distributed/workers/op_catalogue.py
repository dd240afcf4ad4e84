"""The table of `keras.ops` the parity sweep runs (`op_sweep.py`).

Each row is `(name, function, input specs)`. A spec is a string:
`"f:5,4"` normal floats of shape (5, 4); `"p:5,4"` positive floats;
`"u:5,4"` floats in (-0.9, 0.9); `"i:5,4:7"` integers in [0, 7); `"b:5,4"`
booleans; `"spd:5,3"` a batch of 5 symmetric positive-definite 3x3
matrices. Dimension 0 is 5 where it can be, so sharding it over 2 ranks is
uneven (3 and 2 rows).
"""

from keras import ops
from keras import random

F = "f:5,4"
P = "p:5,4"
F3 = "f:5,4,6"
IMG = "p:5,6,6,3"


def _two(name, fn, a=F, b=F):
    return (name, fn, (a, b))


NUMPY = [
    ("abs", ops.abs, (F,)),
    _two("add", ops.add),
    _two("subtract", ops.subtract),
    _two("multiply", ops.multiply),
    _two("divide", ops.divide, F, P),
    _two("power", ops.power, P, F),
    _two("add(broadcast)", ops.add, F3, "f:4,1"),
    ("sqrt", ops.sqrt, (P,)),
    ("exp", ops.exp, (F,)),
    ("log", ops.log, (P,)),
    ("log1p", ops.log1p, (P,)),
    ("sin", ops.sin, (F,)),
    ("arctan", ops.arctan, (F,)),
    ("arcsin", ops.arcsin, ("u:5,4",)),
    ("tanh", ops.tanh, (F,)),
    ("square", ops.square, (F,)),
    ("reciprocal", ops.reciprocal, (P,)),
    ("sign", ops.sign, (F,)),
    ("floor", ops.floor, (F,)),
    ("round", lambda x: ops.round(x, 1), (F,)),
    ("sum(axis=0)", lambda x: ops.sum(x, axis=0), (F3,)),
    ("sum(axis=-1)", lambda x: ops.sum(x, axis=-1), (F3,)),
    ("sum", ops.sum, (F3,)),
    ("mean(axis=0)", lambda x: ops.mean(x, axis=0), (F,)),
    ("var", lambda x: ops.var(x, axis=1), (F3,)),
    ("std", lambda x: ops.std(x, axis=0), (F,)),
    ("max(axis=0)", lambda x: ops.max(x, axis=0), (F,)),
    ("min(axis=-1)", lambda x: ops.min(x, axis=-1), (F,)),
    ("amax", lambda x: ops.amax(x, axis=(0, 2)), (F3,)),
    ("argmax(axis=0)", lambda x: ops.argmax(x, axis=0), (F,)),
    ("argmin(axis=-1)", lambda x: ops.argmin(x, axis=-1), (F,)),
    ("prod", lambda x: ops.prod(x, axis=0), (F,)),
    ("cumsum(axis=0)", lambda x: ops.cumsum(x, axis=0), (F,)),
    ("cumprod", lambda x: ops.cumprod(x, axis=1), (F,)),
    ("sort(axis=0)", lambda x: ops.sort(x, axis=0), (F,)),
    ("argsort", lambda x: ops.argsort(x, axis=-1), (F,)),
    ("median", lambda x: ops.median(x, axis=0), (F,)),
    ("quantile", lambda x: ops.quantile(x, 0.3, axis=1), (F,)),
    ("logsumexp(numpy)", lambda x: ops.logsumexp(x, axis=0), (F,)),
    ("transpose", ops.transpose, (F3,)),
    ("reshape", lambda x: ops.reshape(x, (5, 24)), (F3,)),
    ("reshape(merge batch)", lambda x: ops.reshape(x, (20, 6)), (F3,)),
    ("moveaxis", lambda x: ops.moveaxis(x, 0, -1), (F3,)),
    ("swapaxes", lambda x: ops.swapaxes(x, 1, 2), (F3,)),
    ("expand_dims", lambda x: ops.expand_dims(x, 1), (F,)),
    ("squeeze", lambda x: ops.squeeze(x, 1), ("f:5,1,4",)),
    ("flip", lambda x: ops.flip(x, 0), (F,)),
    ("roll", lambda x: ops.roll(x, 2, axis=0), (F,)),
    ("tile", lambda x: ops.tile(x, (2, 1)), (F,)),
    ("repeat", lambda x: ops.repeat(x, 2, axis=0), (F,)),
    ("broadcast_to", lambda x: ops.broadcast_to(x, (3, 5, 4)), (F,)),
    _two("concatenate(axis=0)", lambda a, b: ops.concatenate([a, b], 0)),
    _two("concatenate(axis=1)", lambda a, b: ops.concatenate([a, b], 1)),
    _two("stack", lambda a, b: ops.stack([a, b], axis=1)),
    ("split", lambda x: ops.split(x, 2, axis=1), (F,)),
    ("pad", lambda x: ops.pad(x, ((1, 2), (0, 1))), (F,)),
    ("pad(reflect)", lambda x: ops.pad(x, ((0, 0), (2, 1)), "reflect"), (F,)),
    (
        "pad(symmetric)",
        lambda x: ops.pad(x, ((0, 0), (1, 1), (2, 2)), "symmetric"),
        (F3,),
    ),
    ("take", lambda x, i: ops.take(x, i, axis=0), (F, "i:3:5")),
    (
        "take_along_axis",
        lambda x, i: ops.take_along_axis(x, i, axis=1),
        (F, "i:5,2:4"),
    ),
    (
        "take_along_axis(last)",
        lambda x, i: ops.take_along_axis(x, i, axis=-1),
        (F3, "i:5,4,2:6"),
    ),
    ("getitem(slice)", lambda x: x[1:4, ::2], (F,)),
    ("getitem(index tensor)", lambda x, i: x[i], (F, "i:6:5")),
    ("getitem(bool mask)", lambda x: x[x > 0], (F,)),
    _two("where", lambda a, b: ops.where(a > 0, a, b)),
    ("clip", lambda x: ops.clip(x, -0.5, 0.5), (F,)),
    _two("maximum", ops.maximum),
    _two("minimum", ops.minimum),
    _two("matmul", ops.matmul, F, "f:4,6"),
    _two("matmul(batched)", ops.matmul, F3, "f:5,6,2"),
    _two("dot", ops.dot, F, "f:4,3"),
    _two(
        "einsum", lambda a, b: ops.einsum("bij,bjk->bik", a, b), F3, "f:5,6,2"
    ),
    _two("tensordot", lambda a, b: ops.tensordot(a, b, axes=1), F, "f:4,3"),
    _two("outer", ops.outer, "f:5", "f:4"),
    _two("cross", ops.cross, "f:5,3", "f:5,3"),
    _two("kron", ops.kron, "f:5,2", "f:2,3"),
    ("triu", ops.triu, ("f:5,5",)),
    ("tril", lambda x: ops.tril(x, -1), ("f:5,5",)),
    ("diagonal", lambda x: ops.diagonal(x, axis1=1, axis2=2), ("f:5,3,3",)),
    ("trace", lambda x: ops.trace(x, axis1=1, axis2=2), ("f:5,3,3",)),
    ("diff", lambda x: ops.diff(x, axis=0), (F,)),
    ("any", lambda x: ops.any(x > 1.0, axis=0), (F,)),
    ("all", lambda x: ops.all(x > -1.0, axis=1), (F,)),
    _two("equal", ops.equal, "i:5,4:3", "i:5,4:3"),
    _two("logical_and", ops.logical_and, "b:5,4", "b:5,4"),
    ("count_nonzero", lambda x: ops.count_nonzero(x > 0, axis=0), (F,)),
    ("isfinite", lambda x: ops.isfinite(ops.log(x)), (F,)),
    ("nan_to_num", lambda x: ops.nan_to_num(ops.log(x), nan=0.0), (F,)),
    _two("arctan2", ops.arctan2),
    _two("logaddexp", ops.logaddexp),
    _two("hypot", ops.hypot),
    ("average", lambda x, w: ops.average(x, axis=1, weights=w), (F, "p:4")),
    ("norm(numpy)", lambda x: ops.norm(x, axis=-1), (F3,)),
    (
        "zeros_like+full_like",
        lambda x: ops.zeros_like(x) + ops.full_like(x, 2.0) * x,
        (F,),
    ),
    ("ones+arange", lambda x: x * ops.ones((4,)) + ops.arange(4.0), (F,)),
    ("cast", lambda x: ops.cast(x, "float16"), (F,)),
    ("searchsorted", lambda s, v: ops.searchsorted(s, v), ("f:6", "f:5")),
    ("digitize", lambda x: ops.digitize(x, [-1.0, 0.0, 1.0]), (F,)),
    ("bincount", lambda i: ops.bincount(i, minlength=6), ("i:9:6",)),
    (
        "correlate",
        lambda a, b: ops.correlate(a, b, mode="same"),
        ("f:8", "f:3"),
    ),
    ("vstack", lambda a, b: ops.vstack([a, b]), (F, F)),
    ("select", lambda x: ops.select([x > 0.5, x < -0.5], [x, -x], 0.0), (F,)),
    ("nonzero", lambda x: ops.nonzero(x > 0)[0], (F,)),
]

NN = [
    ("relu", ops.relu, (F,)),
    ("relu6", ops.relu6, (F,)),
    ("sigmoid", ops.sigmoid, (F,)),
    ("softplus", ops.softplus, (F,)),
    ("silu", ops.silu, (F,)),
    ("gelu", ops.gelu, (F,)),
    ("gelu(approximate=False)", lambda x: ops.gelu(x, False), (F,)),
    ("elu", ops.elu, (F,)),
    ("selu", ops.selu, (F,)),
    ("leaky_relu", ops.leaky_relu, (F,)),
    ("hard_sigmoid", ops.hard_sigmoid, (F,)),
    ("log_sigmoid", ops.log_sigmoid, (F,)),
    ("glu", ops.glu, (F,)),
    ("sparsemax", ops.sparsemax, (F,)),
    ("softmax(axis=-1)", ops.softmax, (F3,)),
    ("softmax(axis=0)", lambda x: ops.softmax(x, axis=0), (F,)),
    ("log_softmax", ops.log_softmax, (F3,)),
    ("one_hot", lambda i: ops.one_hot(i, 6), ("i:5,3:6",)),
    ("multi_hot", lambda i: ops.multi_hot(i, 6), ("i:5,3:6",)),
    (
        "categorical_crossentropy",
        lambda t, x: ops.categorical_crossentropy(
            ops.softmax(t), x, from_logits=True
        ),
        (F, F),
    ),
    (
        "sparse_categorical_crossentropy",
        lambda i, x: ops.sparse_categorical_crossentropy(
            i, x, from_logits=True
        ),
        ("i:5:4", F),
    ),
    (
        "sparse_categorical_crossentropy(sequence)",
        lambda i, x: ops.sparse_categorical_crossentropy(
            i, x, from_logits=True
        ),
        ("i:5,4:6", F3),
    ),
    (
        "binary_crossentropy",
        lambda t, x: ops.binary_crossentropy(
            ops.sigmoid(t), x, from_logits=True
        ),
        (F, F),
    ),
    (
        "binary_crossentropy(probabilities)",
        lambda t, x: ops.binary_crossentropy(ops.sigmoid(t), ops.sigmoid(x)),
        (F, F),
    ),
    (
        "conv",
        lambda x, k: ops.conv(x, k, padding="same"),
        ("f:5,6,6,2", "f:3,3,2,4"),
    ),
    (
        "depthwise_conv",
        lambda x, k: ops.depthwise_conv(x, k),
        ("f:5,6,6,2", "f:3,3,2,2"),
    ),
    (
        "conv_transpose",
        lambda x, k: ops.conv_transpose(x, k, 2),
        ("f:5,4,4,2", "f:3,3,4,2"),
    ),
    ("max_pool", lambda x: ops.max_pool(x, 2), ("f:5,6,6,2",)),
    (
        "average_pool",
        lambda x: ops.average_pool(x, 2, padding="same"),
        ("f:5,5,5,2",),
    ),
    ("moments", lambda x: ops.moments(x, axes=[0, 1]), (F3,)),
    (
        "batch_normalization",
        lambda x, m, v: ops.batch_normalization(x, m, v, axis=-1),
        (F, "f:4", "p:4"),
    ),
    ("normalize", lambda x: ops.normalize(x, axis=-1), (F,)),
    ("rms_normalization", lambda x: ops.rms_normalization(x), (F3,)),
    ("layer_normalization", lambda x: ops.layer_normalization(x), (F3,)),
    (
        "dot_product_attention",
        lambda q, k, v: ops.dot_product_attention(q, k, v),
        ("f:5,4,2,6", "f:5,4,2,6", "f:5,4,2,6"),
    ),
    (
        "dot_product_attention(causal)",
        lambda q, k, v: ops.dot_product_attention(q, k, v, is_causal=True),
        ("f:5,4,2,6", "f:5,4,2,6", "f:5,4,2,6"),
    ),
    ("psnr", lambda a, b: ops.psnr(a, b, 4.0), (F, F)),
    (
        "ctc_loss",
        lambda t, x: ops.ctc_loss(
            t, x, ops.full((5,), 2, "int32"), ops.full((5,), 6, "int32")
        ),
        ("i:5,2:3", "f:5,6,4"),
    ),
    ("random.dropout(seed)", lambda x: random.dropout(x, 0.5, seed=3), (F,)),
]

MATH = [
    ("segment_sum", lambda x, i: ops.segment_sum(x, i, 3), (F, "i:5:3")),
    ("segment_max", lambda x, i: ops.segment_max(x, i, 3), (F, "i:5:3")),
    ("top_k", lambda x: ops.top_k(x, 2), (F,)),
    ("in_top_k", lambda i, x: ops.in_top_k(i, x, 2), ("i:5:4", F)),
    ("logsumexp", lambda x: ops.logsumexp(x, axis=-1), (F,)),
    ("rsqrt", ops.rsqrt, (P,)),
    ("erf", ops.erf, (F,)),
    ("erfinv", ops.erfinv, ("u:5,4",)),
    ("extract_sequences", lambda x: ops.extract_sequences(x, 4, 2), ("f:5,8",)),
    ("fft", lambda a, b: ops.fft((a, b)), (F, F)),
    ("rfft", lambda x: ops.rfft(x), ("f:5,8",)),
    ("irfft", lambda a, b: ops.irfft((a, b)), ("f:5,5", "f:5,5")),
    ("stft", lambda x: ops.stft(x, 4, 2, 4), ("f:5,16",)),
    (
        "istft",
        lambda a, b: ops.istft((a, b), 4, 2, 4),
        ("f:5,9,3", "f:5,9,3"),
    ),
]

LINALG = [
    ("cholesky", ops.cholesky, ("spd:5,3",)),
    ("det", ops.det, ("spd:5,3",)),
    ("inv", ops.inv, ("spd:5,3",)),
    ("eigh", ops.eigh, ("spd:5,3",)),
    ("solve", ops.solve, ("spd:5,3", "f:5,3,2")),
    (
        "solve_triangular",
        lambda a, b: ops.solve_triangular(a, b, lower=True),
        ("spd:5,3", "f:5,3,2"),
    ),
    ("qr", lambda x: ops.qr(x), ("f:5,4,3",)),
    ("svd", lambda x: ops.svd(x, compute_uv=False), ("f:5,4,3",)),
    ("norm(linalg)", lambda x: ops.norm(x, axis=(1, 2)), ("f:5,4,3",)),
    ("logdet", ops.logdet, ("spd:5,3",)),
    ("lstsq", lambda a, b: ops.lstsq(a, b), ("f:6,3", "f:6,2")),
    ("lu_factor", lambda x: ops.lu_factor(x)[0], ("spd:5,3",)),
]

IMAGE = [
    ("resize(bilinear)", lambda x: ops.image.resize(x, (4, 4)), (IMG,)),
    (
        "resize(nearest)",
        lambda x: ops.image.resize(x, (9, 9), "nearest"),
        (IMG,),
    ),
    ("rgb_to_grayscale", ops.image.rgb_to_grayscale, (IMG,)),
    ("rgb_to_hsv", ops.image.rgb_to_hsv, (IMG,)),
    ("pad_images", lambda x: ops.image.pad_images(x, 1, 1, 8, 8), (IMG,)),
    ("crop_images", lambda x: ops.image.crop_images(x, 1, 1, 4, 4), (IMG,)),
    (
        "affine_transform",
        lambda x, t: ops.image.affine_transform(x, t * 0.1 + 0.0),
        (IMG, "u:5,8"),
    ),
    (
        "extract_patches",
        lambda x: ops.image.extract_patches(x, 3),
        (IMG,),
    ),
    (
        "map_coordinates",
        lambda x, c: ops.image.map_coordinates(x, c * 2.0 + 2.0, 1),
        ("f:6,6", "u:2,5,4"),
    ),
    ("gaussian_blur", lambda x: ops.image.gaussian_blur(x), (IMG,)),
]

CORE = [
    (
        "fori_loop",
        lambda x: ops.fori_loop(0, 3, lambda i, v: v * 0.5 + ops.sin(v), x),
        (F,),
    ),
    (
        "scan",
        lambda x: ops.scan(lambda c, v: (c + v, c * v), ops.zeros((4,)), x),
        (F,),
    ),
    ("vectorized_map", lambda x: ops.vectorized_map(ops.softmax, x), (F3,)),
    (
        "cond",
        lambda x: ops.cond(True, lambda: x * 2.0, lambda: x),
        (F,),
    ),
    ("slice_update", lambda x, u: ops.slice_update(x, (1, 0), u), (F, "f:2,4")),
    (
        "scatter_update",
        lambda x: ops.scatter_update(x, [[0, 1], [3, 2]], ops.ones((2,))),
        (F,),
    ),
]

FAMILIES = {
    "core": CORE,
    "numpy": NUMPY,
    "nn": NN,
    "math": MATH,
    "linalg": LINALG,
    "image": IMAGE,
}
