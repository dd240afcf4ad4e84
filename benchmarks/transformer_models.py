"""The decoder-only transformer LM of `compare_all.py`, in Keras and in torch.

Both sides build the same architecture: a token embedding plus a learned
position embedding, `blocks` pre-norm blocks (causal multi-head attention,
then a feed-forward layer of 4x the width with exact GELU, each inside a
residual connection), a final LayerNormalization and a Dense (Linear) to the
vocabulary. Dropout is left out on both sides, so one step of each computes
the same function of the same weights: `copy_into_torch` copies a Keras
model's weights into the torch module, and `torch_weights_as_keras` reads
them back in Keras's order and shapes.

The torch attention is written as four `nn.Linear`s (query, key, value,
output) and `scaled_dot_product_attention(is_causal=True)`, as tensor
parallel users write it: the head count is read from the width of the
query projection's output (`-1` in the reshape), so a column-parallel
query/key/value projection runs its local heads with no other change.

Also the layout maps and native plans each distribution of the benchmark
uses, for this LM and for `timing`'s MLP (`keras_mlp` named `up`/`down`).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import keras
from keras import layers

# torch's default; Keras's is 1e-3. Set on both sides.
NORM_EPSILON = 1e-5


class PositionEmbedding(layers.Layer):
    """Adds a learned embedding of each position (`positions`, seq x width)."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )

    def call(self, x):
        return x + self.positions


def keras_lm(vocab, seq, width, heads, blocks):
    """The Keras LM: int tokens (batch, seq) -> logits (batch, seq, vocab).

    Layers are named `embed`, `position`, then per block `i`: `norm{i}a`,
    `attn{i}` (`MultiHeadAttention`, causal), `norm{i}b`, `up{i}`,
    `down{i}`; then `norm_f` and `head`.
    """
    tokens = keras.Input((seq,), dtype="int32")
    x = layers.Embedding(vocab, width, name="embed")(tokens)
    x = PositionEmbedding(name="position")(x)
    for i in range(blocks):
        h = layers.LayerNormalization(epsilon=NORM_EPSILON, name=f"norm{i}a")(x)
        h = layers.MultiHeadAttention(heads, width // heads, name=f"attn{i}")(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = layers.LayerNormalization(epsilon=NORM_EPSILON, name=f"norm{i}b")(x)
        h = layers.Dense(4 * width, activation="gelu", name=f"up{i}")(h)
        x = x + layers.Dense(width, name=f"down{i}")(h)
    x = layers.LayerNormalization(epsilon=NORM_EPSILON, name="norm_f")(x)
    logits = layers.Dense(vocab, name="head")(x)
    return keras.Model(tokens, logits)


class Attention(nn.Module):
    """Causal self-attention: separate q/k/v/out projections and SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        batch, seq, _ = x.shape

        def split(t):
            # -1: the heads this rank holds (all of them without TP).
            return t.view(batch, seq, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm_a = nn.LayerNorm(width, eps=NORM_EPSILON)
        self.attn = Attention(width, heads)
        self.norm_b = nn.LayerNorm(width, eps=NORM_EPSILON)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.norm_a(x))
        return x + self.down(F.gelu(self.up(self.norm_b(x))))


class TorchLM(nn.Module):
    """The torch LM, the same architecture as `keras_lm`."""

    def __init__(self, vocab, seq, width, heads, blocks):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(seq, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(blocks))
        self.norm_f = nn.LayerNorm(width, eps=NORM_EPSILON)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))


def _pairs(module):
    """(torch parameter, Keras weight -> torch array, torch -> Keras) in
    the order of a `keras_lm`'s `get_weights()`."""

    def dense(p):
        return (p, lambda w: w.T, lambda t: t.T)

    def same(p):
        return (p, lambda w: w, lambda t: t)

    def projection(linear, width, heads):
        # Keras query/key/value kernel (width, heads, head_dim), bias
        # (heads, head_dim); torch weight (heads * head_dim, width).
        shape = (width, heads, width // heads)
        return [
            (linear.weight, lambda w: w.reshape(width, -1).T,
             lambda t: t.T.reshape(shape)),
            (linear.bias, lambda w: w.reshape(-1),
             lambda t: t.reshape(shape[1:])),
        ]  # fmt: skip

    width = module.positions.shape[1]
    pairs = [same(module.embed.weight), same(module.positions)]
    for block in module.blocks:
        heads = width // block.attn.head_dim
        pairs += [same(block.norm_a.weight), same(block.norm_a.bias)]
        for linear in (block.attn.q, block.attn.k, block.attn.v):
            pairs += projection(linear, width, heads)
        # attention_output kernel (heads, head_dim, width).
        out_shape = (heads, width // heads, width)
        pairs += [
            (block.attn.out.weight, lambda w: w.reshape(-1, w.shape[-1]).T,
             lambda t, s=out_shape: t.T.reshape(s)),
            same(block.attn.out.bias),
        ]  # fmt: skip
        pairs += [same(block.norm_b.weight), same(block.norm_b.bias)]
        pairs += [dense(block.up.weight), same(block.up.bias)]
        pairs += [dense(block.down.weight), same(block.down.bias)]
    pairs += [same(module.norm_f.weight), same(module.norm_f.bias)]
    pairs += [dense(module.head.weight), same(module.head.bias)]
    return pairs


def copy_into_torch(weights, module):
    """Copy `keras_lm` weights (`get_weights()` order) into a `TorchLM`
    (not yet parallelized)."""
    pairs = _pairs(module)
    if len(pairs) != len(weights):
        raise ValueError(
            f"Expected {len(pairs)} Keras weights, received {len(weights)}."
        )
    with torch.no_grad():
        for (param, to_torch, _), w in zip(pairs, weights):
            param.copy_(torch.from_numpy(np.ascontiguousarray(to_torch(w))))


def torch_weights_as_keras(module):
    """A `TorchLM`'s weights in `keras_lm`'s order and shapes (numpy);
    DTensor parameters are gathered in full."""
    out = []
    for param, _, to_keras in _pairs(module):
        t = param.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out.append(to_keras(t.cpu().numpy()))
    return out


def keras_lm_megatron_layouts(layout_map, m="model"):
    """Megatron-style layouts on mesh axis `m`: heads, FFN hidden units
    and the embedding's vocabulary rows split; the rest (position
    embedding, norms, the row-parallel layers' biases and the `head` to the
    vocabulary) replicated, as `torch_lm_tp_plan` leaves them."""
    layout_map["embed/embeddings"] = (m, None)
    layout_map[r"attn\d+/(query|key|value)/kernel"] = (None, m, None)
    layout_map[r"attn\d+/(query|key|value)/bias"] = (m, None)
    layout_map[r"attn\d+/attention_output/kernel"] = (m, None, None)
    layout_map[r"up\d+/kernel"] = (None, m)
    layout_map[r"up\d+/bias"] = (m,)
    layout_map[r"down\d+/kernel"] = (m, None)
    return layout_map


def keras_lm_fsdp_layouts(layout_map, d="batch"):
    """Every variable split over mesh axis `d` on its first dimension."""
    layout_map["embed/embeddings"] = (d, None)
    layout_map["position/positions"] = (d, None)
    layout_map[r"attn\d+/.*/kernel"] = (d, None, None)
    layout_map[r"attn\d+/(query|key|value)/bias"] = (d, None)
    layout_map[r"attn\d+/attention_output/bias"] = (d,)
    layout_map[r"(up\d+|down\d+|head)/kernel"] = (d, None)
    layout_map[r"(up\d+|down\d+|head)/bias"] = (d,)
    layout_map[r"(norm\d+[ab]|norm_f)/(gamma|beta)"] = (d,)
    return layout_map


def keras_mlp_megatron_layouts(layout_map, m="model"):
    """`up` column-parallel, `down` row-parallel (`timing.keras_mlp`)."""
    layout_map["up/kernel"] = (None, m)
    layout_map["up/bias"] = (m,)
    layout_map["down/kernel"] = (m, None)
    return layout_map


def keras_mlp_fsdp_layouts(layout_map, d="batch"):
    """Both layers' kernels and biases split over `d` on their first dim."""
    layout_map["(up|down)/kernel"] = (d, None)
    layout_map["(up|down)/bias"] = (d,)
    return layout_map


def torch_lm_tp_plan(module):
    """The `parallelize_module` plan matching `keras_lm_megatron_layouts`."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.parallel import RowwiseParallel

    plan = {"embed": RowwiseParallel(input_layouts=Replicate())}
    for i in range(len(module.blocks)):
        for name in ("attn.q", "attn.k", "attn.v", "up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.out", "down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return plan


def torch_mlp_tp_plan(module):
    """The plan matching `keras_mlp_megatron_layouts` (a `Sequential`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.parallel import RowwiseParallel

    return {"0": ColwiseParallel(), "2": RowwiseParallel()}
