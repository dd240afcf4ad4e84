"""keras-hub's layout maps shard Gemma, Llama and Qwen on torch.

One reference process runs the three tiny models without a distribution.
The same worker then runs them under `ModelParallel` with the layout map
each backbone ships (`get_layout_map`): all three on a (1, 2) mesh of 2
ranks, and with KERAS_TORCH_TEST_KERAS_HUB_2D=1 Gemma also on a (2, 2)
mesh of 4 ranks, where its layout map shards weights over the batch axis
too. Every run starts from the reference's
initial weights. Compared: the gathered initial weights, the backbone's
output, the gradient of every trainable variable, the loss and metrics of
`fit`, the weights after it, `predict`'s logits and greedy `generate`'s
tokens.
"""

import importlib.util
import os

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

# keras-hub's `fit` and `predict` feed numpy inputs through grain. Looked up,
# not imported: importing keras-hub here would import TensorFlow where it is
# installed, and an install that is there but broken should fail, not skip.
for _module in ("keras_hub", "grain"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

WORKER = "keras_hub_layouts.py"
KERAS_HUB_ATOL = 1e-5
MODELS = ["gemma", "llama", "qwen"]
# mesh -> (ranks, models run on it). A (2, 2) run takes about a minute and
# a half on 2 cores, mostly DTensor choosing shardings on a 2-D mesh: one
# model only, and only with KERAS_TORCH_TEST_KERAS_HUB_2D=1 (the default
# suite keeps under 20 minutes; 2-D meshes are covered there by the
# training, model-parallel and mesh tests).
MESHES = {"1,2": (2, MODELS)}
if os.environ.get("KERAS_TORCH_TEST_KERAS_HUB_2D") == "1":
    MESHES["2,2"] = (4, ["gemma"])
CASES = [(mesh, name) for mesh, (_, names) in MESHES.items() for name in names]
# Variables each layout map shards: the token embedding, and in each of the
# 2 decoder layers the query, key, value and output kernels of attention
# and the three kernels of the MLP.
SHARDED_COUNT = 1 + 2 * 7


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference's results, and a function that runs a mesh once."""
    folder = tmp_path_factory.mktemp("keras_hub")
    init = ["--init", str(folder)]
    reference = launcher.run_reference(WORKER, folder, args=init)
    done = {}

    def run(mesh):
        if mesh not in done:
            nproc, names = MESHES[mesh]
            args = init + ["--mesh", mesh, "--models", ",".join(names)]
            _, _, results = launcher.run_workers(
                WORKER, nproc, folder / mesh, args=args
            )
            done[mesh] = results
        return done[mesh]

    return reference, run


def _ids(cases):
    return [f"{name}-mesh{mesh.replace(',', 'x')}" for mesh, name in cases]


@pytest.mark.parametrize("mesh,name", CASES, ids=_ids(CASES))
def test_matches_single_process(runs, mesh, name):
    reference, run = runs
    results = run(mesh)
    keys = ["init:", "forward", "grad:", "loss", "history:", "weight:"]
    prefixes = [f"{name}:{key}" for key in keys + ["predict"]]
    # The logits come out of two transformer blocks and a tied-embedding
    # projection: each block's float32 sums, reordered across ranks, keep
    # rounding errors of the size of its activations (Gemma scales its
    # embeddings by sqrt(hidden_dim)), not of each small logit: measured
    # up to 3.2e-6 on logits of 0.01. torch.testing's float32 atol.
    count = parity.assert_results_match(
        results, reference, prefixes, atol=KERAS_HUB_ATOL
    )
    grads = [k for k in reference if k.startswith(f"{name}:grad:")]
    assert count == 3 * len(grads) + 5, count
    for rank, result in enumerate(results):
        np.testing.assert_array_equal(
            result[f"{name}:generate"],
            reference[f"{name}:generate"],
            err_msg=f"rank {rank}: greedy generate",
        )
    parity.assert_same_on_every_rank(results, [f"{name}:"])


@pytest.mark.parametrize("mesh,name", CASES, ids=_ids(CASES))
def test_layout_map_shards_variables(runs, mesh, name):
    _, run = runs
    results = run(mesh)
    axis_sizes = dict(zip(["batch", "model"], map(int, mesh.split(","))))
    prefix = f"{name}:axes:"
    for rank, result in enumerate(results):
        sharded = []
        for key in [k for k in result if k.startswith(prefix)]:
            path = key[len(prefix) :]
            full = tuple(result[f"{name}:global_shape:{path}"])
            local = tuple(result[f"{name}:local_shape:{path}"])
            sizes = [axis_sizes.get(str(a), 1) for a in result[key]]
            sizes += [1] * (len(full) - len(sizes))
            expected = tuple(d // s for d, s in zip(full, sizes))
            assert local == expected, (
                f"rank {rank} {path}: layout {list(result[key])}, global "
                f"{full}, local {local}, expected {expected}"
            )
            if local != full:
                sharded.append(path)
        assert len(sharded) == SHARDED_COUNT, sharded
        # Every key of the map names at least one variable.
        index = 0
        while f"{name}:layout_key:{index}" in result:
            key = str(result[f"{name}:layout_key:{index}"])
            matched = result[f"{name}:layout_matched:{index}"]
            assert len(matched) > 0, f"layout key {key!r} matched nothing"
            index += 1
        assert index >= 5, f"only {index} layout keys recorded"


def test_preset_loads_into_shards(tmp_path):
    # `save_to_preset` in one process; `from_preset` under ModelParallel
    # (1, 2) with Gemma's own layout map: each rank holds half of every
    # sharded variable, and the output is one process's.
    shared = tmp_path / "shared"
    shared.mkdir()
    args = ["--shared", str(shared)]
    reference = launcher.run_reference("keras_hub_preset.py", tmp_path, args)
    _, _, results = launcher.run_workers(
        "keras_hub_preset.py", 2, tmp_path, args
    )
    parity.assert_results_match(
        results, reference, ["output"], atol=KERAS_HUB_ATOL
    )
    halved = [
        key[len("local_shape:") :]
        for key, local in results[0].items()
        if key.startswith("local_shape:")
        and np.prod(local) * 2
        == np.prod(results[0]["global_shape:" + key[len("local_shape:") :]])
    ]
    # The embedding, attention and feed-forward kernels of both layers.
    assert len(halved) >= 9, halved
