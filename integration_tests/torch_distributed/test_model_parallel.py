"""ModelParallel with mixed precision, convolutions and BatchNormalization,
and FSDP-style layouts: the same numbers as one process.

One reference run records every scenario of `workers/model_parallel.py`; a
2-rank run and a 4-rank run (on (2, 2) meshes) record theirs. Each scenario
is compared with the reference at four points: the initial weights, one
pass's loss and gradients (every trainable variable's, non-zero), `fit`'s
history, `evaluate` and `predict`, and the variables (moving statistics
included) and optimizer state after training.
"""

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

TWO_RANKS = [
    "bfloat16",
    "float16",
    "conv",
    "fsdp",
    "fsdp_transformer",
    "fsdp_shared",
]
FOUR_RANKS = ["float16", "conv", "fsdp"]
# Launches on 2 cores, 4 ranks at most: generous.
TIMEOUT = 420

# NOTE [16-bit tolerances]: mixed precision computes in 16-bit floats, and
# a sharded run rounds at other points than one process: each rank rounds
# its partial sums (a row-parallel matmul, a gradient over its rows) before
# they are added. A rounding moves a value by up to 2**-9 of it in bfloat16
# (2**-12 in float16); a gradient is made by a dozen rounded ops and sums
# whose terms cancel, so two correct runs differ by a few 2**-8 of an
# array's largest value, more where cancellation makes the array small
# (logits, biases). A missing or repeated reduction, or a shard in the wrong
# place, is off by the size of the value itself (50% to 100%).
#
# bfloat16: each array gets the tolerance of bfloat16's own error on it.
# The reference also runs the scenario in float32 from the same weights;
# the sharded bfloat16 run may differ from the single-process bfloat16 run
# by 4 times as much as that run differs from float32, and always by 5%
# (13 bfloat16 roundings). Over 6 sets of initial weights, no array above
# that 5% differed by more than 3 times bfloat16's own error on it (the
# largest errors: 3.2% for a gradient, 12% for predictions, 18% for a
# bias's update over training, whose steps cancel).
BFLOAT16_FACTOR, BFLOAT16_FLOOR = 4.0, 5e-2
# float16, whose CPU matmuls Keras runs in float32: measured at most 0.1%.
FLOAT16_RTOL = 1e-2
MIXED = ("bfloat16", "float16")
# After training with SGD, mixed precision scenarios compare how far the
# variables moved (their update, within the tolerance of its largest
# value), not where they are: an update is the sum of 8 to 12 steps, each
# computed in 16-bit precision, while a variable's value is mostly its
# (equal) initial value, which would hide an error in the steps.

# Softmax ignores a shift shared by all keys, so the key bias's gradient is
# exactly zero in exact arithmetic: both runs hold rounding noise (about
# 1e-10 in float32, 1e-6 in bfloat16), and so does the bias after SGD.
KEY_BIAS = ("grad:mha/key/bias", "weight:mha/key/bias")
KEY_BIAS_ATOL = {"bfloat16": 1e-4}

# Step counters, the loss scale (a power of 2) and counts: equal.
EXACT = (
    "opt:sgd/iteration",
    "opt:adam/iteration",
    "opt:loss_scale_optimizer/step_counter",
    "opt:loss_scale_optimizer/dynamic_scale",
    "history:tp",
    "history:fn",
)

# The shard each rank holds, for variables named in a layout map; the rest
# are checked against the full shape (replicated) where listed as None.
LOCAL_SHAPES = {
    "bfloat16": {
        "embed/embeddings": (32, 4),
        "mha/query/kernel": (8, 1, 4),
        "mha/attention_output/kernel": (1, 4, 8),
        "up/kernel": (8, 16),
        "down/kernel": (16, 8),
        "head/kernel": None,
    },
    "float16": {
        "hidden/kernel": (8, 8),
        "hidden/bias": (8,),
        "out/kernel": (8, 4),
        "bn/gamma": None,
    },
    "conv": {
        "conv1/kernel": (3, 3, 3, 4),
        "conv1/bias": (4,),
        "bn1/gamma": (4,),
        "bn1/moving_mean": (4,),
        "bn1/moving_variance": (4,),
        "conv2/kernel": (3, 3, 4, 4),
        "bn2/moving_mean": None,
    },
    "fsdp_transformer": {
        "embed/embeddings": (16, 8),
        "mha/query/kernel": (4, 2, 4),
        "mha/attention_output/kernel": (1, 4, 8),
        "conv/kernel": (3, 4, 8),
        "norm1/gamma": (4,),
        "head/bias": None,
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder, the initial weights' prefix and the reference results."""
    tmp_path = tmp_path_factory.mktemp("model_parallel")
    init = str(tmp_path / "init")
    scenarios = TWO_RANKS + ["bfloat16_in_float32"]
    args = ["--init", init, "--scenarios", ",".join(scenarios)]
    reference = launcher.run_reference(
        "model_parallel.py", tmp_path, args=args, timeout=TIMEOUT
    )
    return tmp_path, init, reference


def _launch(runs, nproc, scenarios):
    tmp_path, init, reference = runs
    args = ["--init", init, "--scenarios", ",".join(scenarios)]
    _, _, results = launcher.run_workers(
        "model_parallel.py", nproc, tmp_path, args=args, timeout=TIMEOUT
    )
    return results, reference


def _keys(reference, prefix):
    return [k for k in reference if k.startswith(prefix)]


def _check_gradients(results, reference, name, tolerances, skip):
    """Every trainable variable gets a non-zero gradient, the reference's."""
    p = f"{name}/"
    grads = [k for k in _keys(reference, p + "grad:") if k not in skip]
    assert grads, name
    for key in grads:
        assert np.max(np.abs(reference[key])) > 0, key
        for rank, result in enumerate(results):
            assert np.max(np.abs(result[key])) > 0, (rank, key)
    parity.assert_results_match(
        results,
        reference,
        [p + "grad:", p + "grad_loss"],
        loose=tolerances,
        skip=skip,
    )


def _relative_error(actual, expected):
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-6)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def _tolerances(reference, name, keys):
    """`{key: (rtol, atol)}` for a mixed precision scenario's `keys`.

    A 16-bit sum's rounding is relative to its largest terms, not to its
    result, so each entry may be off by the tolerance of the array's
    largest value (atol) as well as of its own (rtol).
    """
    tolerances = {}
    for key in keys:
        expected = reference[key]
        if "/weight:" in key:
            initial = reference[key.replace("/weight:", "/initial:")]
            expected = expected - initial
        if name == "float16":
            rtol = FLOAT16_RTOL
        else:
            in_float32 = reference[key.replace(name, f"{name}_in_float32", 1)]
            if "/weight:" in key:
                in_float32 = in_float32 - initial
            noise = _relative_error(in_float32, expected)
            rtol = max(BFLOAT16_FLOOR, BFLOAT16_FACTOR * noise)
        scale = float(np.max(np.abs(expected), initial=0.0))
        tolerances[key] = (rtol, rtol * scale)
    return tolerances


def _check_updates(results, reference, name, tolerances, skip):
    """Variables moved as far as in the reference; see NOTE [16-bit
    tolerances]."""
    p = f"{name}/"
    keys = [k for k in _keys(reference, p + "weight:") if k not in skip]
    for key in keys:
        initial = reference[key.replace("/weight:", "/initial:")]
        expected = reference[key] - initial
        assert np.max(np.abs(expected)) > 0, f"{key} did not train"
        for rank, result in enumerate(results):
            parity.assert_close(
                result[key] - initial,
                expected,
                f"rank {rank} update of {key}",
                *tolerances[key],
            )


def _check_local_shapes(results, reference, name, expected):
    p = f"{name}/local_shape:"
    for path, shape in expected.items():
        full = tuple(reference[p + path])
        for rank, result in enumerate(results):
            local = tuple(result[p + path])
            assert local == (shape or full), (rank, path, local, full)


def _check_halves(results, reference, name, axis_sizes):
    """FSDP: every variable's dimension 0 (and a kernel's dimension 1 over
    "model", if the mesh has it) is split over the batch axis."""
    p = f"{name}/local_shape:"
    keys = _keys(reference, p)
    assert len(keys) == 8, keys
    for key in keys:
        full = list(reference[key])
        full[0] //= axis_sizes[0]
        if key.endswith("kernel") and len(axis_sizes) > 1:
            full[1] //= axis_sizes[1]
        for rank, result in enumerate(results):
            assert list(result[key]) == full, (rank, key, result[key])


def check_scenario(results, reference, name):
    """Compare one scenario's results on every rank with the reference."""
    p = f"{name}/"
    skip = [p + k for k in KEY_BIAS if p + k in reference]
    for key in skip:
        atol = KEY_BIAS_ATOL.get(name, 1e-8)
        assert np.max(np.abs(reference[key])) < atol, key
        for result in results:
            assert np.max(np.abs(result[key])) < atol, key
    # The same initial weights, exactly.
    for key in _keys(reference, p + "initial:"):
        for result in results:
            np.testing.assert_array_equal(result[key], reference[key], key)
    for rank, result in enumerate(results):
        assert result[p + "variable_hooks"] == 0, (rank, name)
    exact = [p + k for k in EXACT if p + k in reference]
    for key in exact:
        for rank, result in enumerate(results):
            np.testing.assert_array_equal(
                result[key], reference[key], f"rank {rank} {key}"
            )
    prefixes = [p + "history:", p + "evaluate", p + "predict"]
    tolerances = {}
    if name in MIXED:
        keys = [
            k
            for k in reference
            if k.startswith((p + "grad", p + "weight:", *prefixes))
            and k not in skip + exact
        ]
        tolerances = _tolerances(reference, name, keys)
        _check_updates(results, reference, name, tolerances, skip)
    else:
        prefixes += [p + "weight:", p + "opt:", p + "after_fit:"]
    _check_gradients(results, reference, name, tolerances, skip)
    parity.assert_results_match(
        results, reference, prefixes, loose=tolerances, skip=skip + exact
    )
    parity.assert_same_on_every_rank(results, [p])


def test_two_ranks_match_single_process(runs):
    results, reference = _launch(runs, 2, TWO_RANKS)
    for name in TWO_RANKS:
        check_scenario(results, reference, name)
        if name in LOCAL_SHAPES:
            _check_local_shapes(results, reference, name, LOCAL_SHAPES[name])
    _check_halves(results, reference, "fsdp", (2,))
    # The float16 run skipped the first step of each of its 3 epochs (the
    # loss scale overflowed), so the non-finite branch ran as well.
    steps = reference["float16/opt:sgd/iteration"]
    assert steps == 9, steps
    assert reference["float16/opt:loss_scale_optimizer/dynamic_scale"] == 64


def test_four_ranks_match_single_process(runs):
    """(2, 2) meshes: data sharded over "batch" (the last batch unevenly)
    and variables over "model"; counts and moving statistics as one
    process's."""
    results, reference = _launch(runs, 4, FOUR_RANKS)
    for name in FOUR_RANKS:
        check_scenario(results, reference, name)
        if name in LOCAL_SHAPES:
            _check_local_shapes(results, reference, name, LOCAL_SHAPES[name])
    _check_halves(results, reference, "fsdp", (2, 2))
